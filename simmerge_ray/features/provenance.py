"""Which checkpoints a features folder was measured from, checked against the catalog a plan
names: a model name now pointing at another checkpoint (a retrained expert, an edited path)
would otherwise be planned, and its merge files written, from another model's features."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import ConfigError
from simmerge_ray.io.checkpoint import Checkpoint

META_FILE = "gram_meta.json"


def check_measured_from(features_dir: str | Path, catalog: Catalog, names: Iterable[str]) -> None:
    """Refuse when a model of `names` is not the checkpoint the structural features recorded for
    it (its content fingerprint; the files' stat signature spares reading them when unchanged).
    A folder without the structural stage's record (functional features only) is not checked."""
    meta_path = Path(features_dir) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
        fingerprints, signatures = dict(meta["fingerprints"]), dict(meta.get("signatures", {}))
        paths = dict(meta.get("paths", {}))
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{meta_path}: unreadable record of the measured checkpoints ({type(e).__name__}: {e})") from None
    for name in dict.fromkeys(names):
        if name not in fingerprints:
            continue  # not measured: the feature lookup names it
        ckpt = Checkpoint.open(catalog.model(name).path)
        if signatures.get(name) == ckpt.stat_signature() or ckpt.fingerprint() == fingerprints[name]:
            continue
        raise ConfigError(f"{meta_path}: model {name!r} is {ckpt.path} in the catalog, which is not the checkpoint "
                          f"its features were measured from ({paths.get(name, 'unrecorded path')}); compute the "
                          f"features again (simmerge features structural / functional) for this catalog")
