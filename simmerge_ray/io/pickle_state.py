"""The tensors of a pickle-based checkpoint folder (pytorch_model*.bin), for `simmerge convert`.

Tensors only (`weights_only`): a pickle that would build any other object, or run code, is refused
by torch's restricted unpickler. The shards are the index's when there is one; a missing shard, or
a tensor the index lists that its shard lacks, is named (converting what is there would write a
model with tensors silently missing), and a tensor found in two files is refused rather than the
later copy silently kept.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from simmerge_ray.errors import CheckpointError, first_line
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.checkpoint_files import INDEX_FILE, PICKLE_FILES, SINGLE_FILE, shards_from_index
from simmerge_ray.io.safetensors_format import TORCH_TO_DTYPE
from simmerge_ray.lazy_torch import torch


def open_pickle_checkpoint(path: str | Path) -> Checkpoint:
    """The folder's .bin checkpoint, for `convert`. Checkpoint.open prefers safetensors, so a
    folder holding both formats was converted from its safetensors, the .bin ignored, and a
    safetensors-only folder was copied as if converted: both refused here, by name."""
    path = Path(path)
    if path.is_dir():
        bins = any((path / n).exists() for n in PICKLE_FILES) or any(path.glob("pytorch_model*.bin"))
        st = [n for n in (INDEX_FILE, SINGLE_FILE) if (path / n).exists()] or sorted(
            p.name for p in path.glob("*.safetensors"))
        if not bins:
            already = f" (it holds {st[0]}: already safetensors, use it as it is)" if st else ""
            raise CheckpointError(f"{path}: no pytorch_model*.bin to convert{already}")
        if st:
            raise CheckpointError(f"{path}: holds safetensors weights ({st[0]}) beside the .bin, and a folder's "
                                  f"safetensors are what is read: use them as they are, or move the .bin to a "
                                  f"folder of its own to convert it")
    return Checkpoint.open(path, allow_pickle=True)


def read_pickle_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensor name -> tensor, tensor name -> the file it came from) of the folder's .bin files."""
    index = path / PICKLE_FILES[1]
    listed = shards_from_index(index) if index.exists() else None
    files = list(listed) if listed is not None else _pickle_files(path)
    state: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for fname in files:
        f = path / fname
        if not f.exists():
            raise CheckpointError(f"{path}: shard {fname} listed in {index.name} is missing")
        loaded = _load_pickle(f)
        absent = sorted(listed[fname] - loaded.keys()) if listed is not None else []
        if absent:
            raise CheckpointError(f"{path}: tensor {absent[0]!r} is listed in {index.name} under {fname} "
                                  f"but absent from that shard ({len(absent)} missing)")
        for name in loaded:
            if name in where:
                raise CheckpointError(f"{path}: tensor {name!r} appears in two shards ({where[name]} and {fname})")
            where[name] = fname
        state.update(loaded)
    if not state:
        raise CheckpointError(f"{path}: the .bin checkpoint holds no tensors")
    return state, where


_PICKLE_SHARD_RE = re.compile(r"pytorch_model-(\d+)-of-(\d+)\.bin")


def _pickle_files(path: Path) -> list[str]:
    """The .bin files of a folder without an index: pytorch_model.bin, or numbered shards
    (`pytorch_model-00001-of-00003.bin`), every one of whose numbers must be there."""
    names = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    for name in names:
        m = _PICKLE_SHARD_RE.fullmatch(name)
        if m:
            total = int(m.group(2))
            want = [f"pytorch_model-{i:0{len(m.group(1))}d}-of-{m.group(2)}.bin" for i in range(1, total + 1)]
            missing = [w for w in want if w not in names]
            if missing:
                raise CheckpointError(f"{path}: shard {missing[0]} is missing ({len(missing)} of the {total} "
                                      f"pytorch_model-*-of-{m.group(2)}.bin shards)")
    return names


def _load_pickle(f: Path) -> dict[str, torch.Tensor]:
    """One .bin file's tensors by name, each a dense tensor with data, of a safetensors dtype,
    under a string name (what safetensors can store), else one line naming the entry."""
    try:  # zip archives (torch >= 1.6) are memory-mapped; the legacy format cannot be
        loaded = torch.load(f, map_location="cpu", mmap=zipfile.is_zipfile(f), weights_only=True)
    except Exception as e:  # pickle and torch raise many types for a refused or corrupt file
        # the cause alone can be bare ("'101'" from a garbage file): say what kinds of file fail so
        raise CheckpointError(f"{f}: not a plain tensor checkpoint, refused: corrupt, truncated, or pickling "
                              f"objects other than tensors ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{f}: expected a dict of tensors, found {type(loaded).__name__}")
    for name, t in loaded.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{f}: entry {name!r} is named by {type(name).__name__}, not by a string")
        if name == "__metadata__":  # the safetensors header's own key: not a tensor name
            raise CheckpointError(f"{f}: a tensor named '__metadata__' cannot be stored as safetensors")
        if not isinstance(t, torch.Tensor) or t.dtype not in TORCH_TO_DTYPE:
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{f}: entry {name!r} is {what}, not a tensor of a safetensors dtype")
        if t.layout != torch.strided or t.is_meta:
            kind = "a meta tensor (no data)" if t.is_meta else f"a {t.layout} tensor"
            raise CheckpointError(f"{f}: entry {name!r} is {kind}; only dense tensors can be stored as safetensors")
    return loaded
