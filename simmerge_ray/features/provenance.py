"""Which checkpoints a features folder was measured from, checked against the catalog a plan
names: a model name now pointing at another checkpoint (a retrained expert, an edited path)
would otherwise be planned, and its merge files written, from another model's features. Each
stage keeps its own record (gram_meta.json, functional_meta.json): after one stage is rerun on a
changed checkpoint, the other's columns are still the old model's until it is rerun too."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import ConfigError
from simmerge_ray.io.checkpoint import Checkpoint

META_FILE = "gram_meta.json"
FUNCTIONAL_META_FILE = "functional_meta.json"
RECORDS = (META_FILE, FUNCTIONAL_META_FILE)


def checkpoint_record(ckpts: dict[str, Checkpoint]) -> dict[str, dict[str, str]]:
    """What a stage records of the checkpoints it measured (gram_meta.json, functional_meta.json):
    paths, content fingerprints and stat signatures, by model name."""
    return {"paths": {n: str(ck.path) for n, ck in ckpts.items()},
            "fingerprints": {n: ck.fingerprint() for n, ck in ckpts.items()},
            "signatures": {n: ck.stat_signature() for n, ck in ckpts.items()}}


def _read_record(path: Path) -> tuple[dict, dict, dict] | None:
    """(fingerprints, signatures, paths) of a stage's record, or None when the stage left none."""
    return _parse(_load(path), path)


def _parse(meta: dict | None, path: Path) -> tuple[dict, dict, dict] | None:
    try:
        return None if meta is None else (dict(meta["fingerprints"]), dict(meta.get("signatures", {})),
                                           dict(meta.get("paths", {})))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _unreadable(path, e) from None


def _load(path: Path) -> dict | None:
    """A stage's record as read, or None when the stage left none."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: Exception) -> ConfigError:
    return ConfigError(f"{path}: unreadable record of the measured checkpoints ({type(e).__name__}: {e})")


def measured_checkpoints(features_dir: str | Path, names: Iterable[str]) -> dict[str, dict[str, str]]:
    """{name: {"fingerprint", "signature"}} of the checkpoints the feature stages measured (the
    structural record first), for a plan to carry: `merge --plan` then checks it merges those.
    Read from the records, never hashed here; a name no record holds is left out."""
    records = [read for r in RECORDS if (read := _read_record(Path(features_dir) / r)) is not None]
    out: dict[str, dict[str, str]] = {}
    for name in names:
        for fingerprints, signatures, _ in records:
            if name in fingerprints:
                out[name] = {"fingerprint": fingerprints[name], "signature": signatures.get(name, "")}
                break
    return out


def measured_base(features_dir: str | Path) -> dict[str, str]:
    """{"fingerprint", "signature"} of the base the structural features measured task vectors
    against (gram_meta.json), for a plan to carry; {} without a base or a record."""
    path = Path(features_dir) / META_FILE
    meta = _load(path)
    try:
        record = _parse(meta, path)
    except ConfigError:  # a record of an older version (no fingerprints): nothing to check the base against
        return {}
    name = meta.get("base") if isinstance(meta, dict) else None
    if record is None or not isinstance(name, str) or name not in record[0]:
        return {}
    return {"fingerprint": str(record[0][name]), "signature": str(record[1].get(name, ""))}


def _same(ck: Checkpoint, recorded: dict[str, str]) -> bool:
    """The recorded checkpoint (the stat signature spares reading unchanged files)."""
    return ck.stat_signature() == recorded.get("signature") or ck.fingerprint() == recorded.get("fingerprint")


def _base_changed(catalog: Catalog, recorded: dict[str, str] | None) -> bool:
    """The catalog's base is not the recorded one ({} or None: nothing recorded, nothing to check)."""
    return bool(recorded) and catalog.base is not None and not _same(Checkpoint.open(catalog.base), recorded)


def check_unchanged(recorded: dict[str, dict[str, str]], catalog: Catalog, where: str,
                    base: dict[str, str] | None = None) -> None:
    """Refuse a catalog model, or base (`base`: measured_base), that is not the checkpoint a plan
    recorded (`measured_checkpoints`): retrained or replaced between `simmerge plan` and `merge
    --plan`, the merge would follow a plan made from another model's features."""
    for name, rec in recorded.items():
        ck = Checkpoint.open(catalog.model(name).path)
        if not _same(ck, rec):
            raise ConfigError(f"{where}: model {name!r} ({ck.path}) is not the checkpoint the plan was made for (its "
                              f"content changed since `simmerge plan`); compute its features and plan again")
    if _base_changed(catalog, base):
        raise ConfigError(f"{where}: the catalog's base ({catalog.base}) is not the checkpoint the plan was made "
                          f"for (another folder, or its content changed since `simmerge plan`); compute the features "
                          f"and plan again")


def check_labels_measured_alike(features: Path, labels: Path) -> None:
    """Refuse labels and features measured from different checkpoints of one model name (or of
    the base): a selector fitted on them would learn one model's labels from another's features.
    `features`: the folder, or its table (its records lie beside the table a link points to).
    Labels record their checkpoints in label_summary.json beside the table (since the forty-fifth
    session); older labels, or features without readable records, are not checked here."""
    folder = Path(features) if Path(features).is_dir() else Path(features).resolve().parent
    try:
        summary = _load(Path(labels).parent / "label_summary.json")
        base = measured_base(folder)
        records = [(folder / r, read) for r in RECORDS if (read := _read_record(folder / r)) is not None]
    except ConfigError:  # a record of an older version (no fingerprints): plan names it, when it reads one
        return
    labelled = summary.get("checkpoints") if isinstance(summary, dict) else None
    if not isinstance(labelled, dict):
        return
    if base and isinstance(labelled.get("base"), str) and labelled["base"] != base["fingerprint"]:
        raise ConfigError(f"{labels}: labelled against another base than the one {folder / META_FILE} records; run "
                          f"`simmerge label` or the feature stages again, so both describe one catalog")
    for path, (fingerprints, _, _) in records:
        for name in sorted(set(fingerprints) & set(labelled) - {"base"}):
            if fingerprints[name] != labelled[name]:
                raise ConfigError(f"{labels}: model {name!r} was labelled from another checkpoint than the one {path} "
                                  f"records; run `simmerge label` or the feature stages again, so both describe one "
                                  f"catalog")


def check_base_measured(features_dir: str | Path, catalog: Catalog) -> None:
    """Refuse a catalog whose base is not the one the structural features measured task vectors
    against (another folder, or its files changed since): every plan would rest on another base's
    task vectors, while a TIES step merges against this one."""
    if _base_changed(catalog, measured_base(features_dir)):
        raise ConfigError(f"{Path(features_dir) / META_FILE}: the catalog's base ({catalog.base}) is not the checkpoint "
                          f"the structural features measured task vectors against (another folder, or its files "
                          f"changed since); run `simmerge features structural` again for this catalog")


def check_stages_agree(features_dir: Path) -> None:
    """Refuse to join two stages' tables measured from different checkpoints of one model name."""
    records = [(name, _read_record(Path(features_dir) / name)) for name in RECORDS]
    (s_name, s_rec), (f_name, f_rec) = records
    if s_rec is None or f_rec is None:
        return
    for model in sorted(set(s_rec[0]) & set(f_rec[0])):
        if s_rec[0][model] != f_rec[0][model]:
            raise ConfigError(f"{Path(features_dir) / f_name}: model {model!r} was measured from another checkpoint than "
                              f"the one {s_name} records (its content changed between the two feature stages); run "
                              f"`simmerge features functional` again, so both describe the same checkpoint")


def check_measured_from(features_dir: str | Path, catalog: Catalog, names: Iterable[str]) -> None:
    """Refuse when a model of `names` is not the checkpoint a feature stage recorded for it (its
    content fingerprint; the files' stat signature spares reading them when unchanged). A stage
    that left no record (an older folder) is not checked. The catalog's base too (check_base_measured)."""
    check_base_measured(features_dir, catalog)
    for message in stale_models(features_dir, catalog, names).values():
        raise ConfigError(message)


def stale_models(features_dir: str | Path, catalog: Catalog, names: Iterable[str]) -> dict[str, str]:
    """name -> why, for each model of `names` whose features describe another checkpoint (see
    check_measured_from); the records are read once for all of them."""
    records = [(path, read) for path in (Path(features_dir) / r for r in RECORDS)
               if (read := _read_record(path)) is not None]
    stale: dict[str, str] = {}
    for name in dict.fromkeys(names):
        measured = [(path, read) for path, read in records if name in read[0]]  # else the feature lookup names it
        if not measured:
            continue
        ckpt = Checkpoint.open(catalog.model(name).path)
        for meta_path, (fingerprints, signatures, paths) in measured:
            if _same(ckpt, {"signature": signatures.get(name), "fingerprint": fingerprints[name]}):
                continue
            why = ("its files changed since" if paths.get(name) == str(ckpt.path) else
                   f"they were measured from {paths.get(name, 'an unrecorded path')}")
            stale[name] = (f"{meta_path}: model {name!r} ({ckpt.path}) is not the checkpoint its features describe "
                           f"({why}); compute the features again (simmerge features structural / functional) for "
                           f"this catalog")
            break
    return stale
