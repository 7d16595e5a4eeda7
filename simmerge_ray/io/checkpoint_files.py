"""Which files make a checkpoint folder, read before any tensor: the weight files (an index's
shards, model.safetensors, or every loose .safetensors), the index's tensor map, config.json.
Checkpoint.open indexes what these name; the resume keys and the pickle reader list the same
files, so what is stat-ed or converted is what a merge reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

from simmerge_ray.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder: deltas of a base, not a model
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def read_config(path: Path) -> dict:
    """A model folder's config.json ({} when it has none), checked to be a JSON object."""
    cfg = path / "config.json"
    if not cfg.exists():
        return {}
    try:
        raw = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{cfg}: invalid JSON ({e!r})") from None
    except OSError as e:  # a folder, a dangling link, no permission
        raise CheckpointError(f"{cfg}: cannot read ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object, got {type(raw).__name__}")
    return raw


_SHARD_FILE_RE = re.compile(r".+-\d+-of-(\d+)\.safetensors")


def refuse_shard_file(path: Path) -> None:
    """A lone .safetensors file must be a whole model: one shard of a sharded checkpoint (named
    `...-00001-of-00005.safetensors`, or listed by an index beside it) would be read as a model
    of that shard's tensors only, and a merge of such shards would silently write a part of one."""
    index = path.parent / INDEX_FILE
    listed = False
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
            listed = path.name in shards and len(shards) > 1
        except (OSError, ValueError, AttributeError, TypeError, RecursionError):
            listed = False  # an unreadable index is the folder's problem, reported when it is opened
    named = _SHARD_FILE_RE.fullmatch(path.name)
    if listed or (named and int(named.group(1)) > 1):  # "-00001-of-00001" is a whole model
        raise CheckpointError(f"{path}: one shard of a sharded checkpoint, not a whole model; give its folder "
                              f"{path.parent}")


def weight_files(folder: Path) -> dict[str, set[str] | None] | None:
    """The weight files of a checkpoint folder, as Checkpoint.open reads them: its index's shards
    (with the tensors the index puts in each), else model.safetensors, else every .safetensors
    file; None when it has none of these."""
    if (folder / INDEX_FILE).exists():
        return dict(shards_from_index(folder / INDEX_FILE))
    if (folder / SINGLE_FILE).exists():
        return {SINGLE_FILE: None}
    loose = sorted(p.name for p in folder.glob("*.safetensors"))
    return {name: None for name in loose} if loose else None


def shards_from_index(index: Path) -> dict[str, set[str]]:
    """Tensor names by shard file, from an index's weight_map (each shard a file inside the folder)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{index}: invalid index file ({e!r})") from None
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror or e})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: invalid index file (weight_map is not a mapping)")
    files: dict[str, set[str]] = {}
    for tensor, fname in weight_map.items():
        if not isinstance(fname, str) or not _inside(fname):
            raise CheckpointError(f"{index}: tensor {tensor!r} is mapped to {fname!r}, which is not a file "
                                  f"name inside the model folder")
        files.setdefault(fname, set()).add(tensor)
    return dict(sorted(files.items()))


def _inside(fname: str) -> bool:
    """A shard named in the index must be a plain relative path below the folder (no `..`, not
    absolute), so a crafted index cannot make the reader open a file elsewhere."""
    p = Path(fname)
    return bool(fname) and "\\" not in fname and not p.is_absolute() and ".." not in p.parts and p.name != ""
