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
    try:
        meta = json.loads(path.read_text())
        return dict(meta["fingerprints"]), dict(meta.get("signatures", {})), dict(meta.get("paths", {}))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable record of the measured checkpoints ({type(e).__name__}: {e})") from None


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


def check_unchanged(recorded: dict[str, dict[str, str]], catalog: Catalog, where: str) -> None:
    """Refuse a catalog model that is not the checkpoint a plan recorded (`measured_checkpoints`):
    retrained or replaced between `simmerge plan` and `merge --plan`, the merge would follow a plan
    made from another model's features. The stat signature spares reading unchanged files."""
    for name, rec in recorded.items():
        ck = Checkpoint.open(catalog.model(name).path)
        if ck.stat_signature() == rec.get("signature") or ck.fingerprint() == rec.get("fingerprint"):
            continue
        raise ConfigError(f"{where}: model {name!r} ({ck.path}) is not the checkpoint the plan was made for (its "
                          f"content changed since `simmerge plan`); compute its features and plan again")


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
    that left no record (an older folder) is not checked."""
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
        signature = ckpt.stat_signature()
        for meta_path, (fingerprints, signatures, paths) in measured:
            if signatures.get(name) == signature or ckpt.fingerprint() == fingerprints[name]:
                continue
            why = ("its files changed since" if paths.get(name) == str(ckpt.path) else
                   f"they were measured from {paths.get(name, 'an unrecorded path')}")
            stale[name] = (f"{meta_path}: model {name!r} ({ckpt.path}) is not the checkpoint its features describe "
                           f"({why}); compute the features again (simmerge features structural / functional) for "
                           f"this catalog")
            break
    return stale
