"""Reading a features folder's per-tensor Gram matrices (gram.safetensors, described by
gram_meta.json), checked at load: the planner's exact propagation reads every entry, so a
damaged file would otherwise be a traceback, and one NaN would silently change every score."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from simmerge_ray.errors import CheckpointError, ConfigError
from simmerge_ray.io.safetensors_format import read_header

GRAM_FILE = "gram.safetensors"
GRAM_META = "gram_meta.json"
AGAIN = "compute the features again (`simmerge features structural`)"


def gram_files(features_dir: Path) -> tuple[Path, Path]:
    """(gram_meta.json, gram.safetensors) of a features folder; a missing one is named by its path
    (safetensors' reader raises FileNotFoundError without a file name)."""
    meta, gram = features_dir / GRAM_META, features_dir / GRAM_FILE
    for path in (meta, gram):
        if not path.is_file():
            raise ConfigError(f"{features_dir}: per-tensor Gram matrices missing ({path}); "
                              f"run `simmerge features structural` first")
    return meta, gram


@dataclass(frozen=True)
class GramMeta:
    """What gram_meta.json says of gram.safetensors: its rows and, per tensor, the scopes."""

    models: list[str]
    base: str | None
    tensors: list[str]
    groups: list[str]  # per tensor: module group
    thirds: list[int | None]  # per tensor: depth third (None outside the layers)

    @property
    def rows(self) -> list[str]:
        """Row and column order of every Gram matrix: the models, then the base if any."""
        return self.models + ([self.base] if self.base else [])


def read_gram_meta(path: Path) -> GramMeta:
    """gram_meta.json; a file of another shape is one error naming it."""
    try:
        meta = json.loads(path.read_text())
        info = dict(meta["tensors"])
        tensors = list(info)
        return GramMeta(list(meta["models"]), meta["base"], tensors, [info[t]["group"] for t in tensors],
                        [info[t]["third"] for t in tensors])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable Gram metadata ({type(e).__name__}: {e}); {AGAIN}") from None


def read_grams(path: Path, tensors: list[str], rows: int) -> np.ndarray:
    """[T, R, R] float64 Gram matrices of `tensors`, in that order, from `path`. The header is
    checked before any value is read (truncated or corrupt file, a tensor absent, not an F64
    [R, R] matrix, or one gram_meta.json does not list: the two files are of different runs), then
    the values (NaN or Inf, not symmetric, a negative squared norm): each one CheckpointError
    naming the file and, where one is at fault, the tensor."""
    entries, _, _ = read_header(path)  # CheckpointError naming the file: truncated, corrupt
    want = (rows, rows)
    unlisted = sorted(entries.keys() - set(tensors))
    if unlisted:
        raise CheckpointError(f"{path}: tensor {unlisted[0]!r} is not listed in {GRAM_META} (the two files are "
                              f"of different runs?); {AGAIN}")
    for t in tensors:
        entry = entries.get(t)
        if entry is None:
            raise CheckpointError(f"{path}: tensor {t!r} missing ({GRAM_META} lists it); {AGAIN}")
        if entry.dtype != "F64" or entry.shape != want:
            raise CheckpointError(f"{path}: tensor {t!r} is {entry.dtype} {list(entry.shape)}, expected F64 "
                                  f"{list(want)} (one row per model and base of {GRAM_META}); {AGAIN}")
    try:
        grams = load_file(path)
    except (OSError, SafetensorError) as e:  # changed since the header was read
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    gram = np.stack([grams[t] for t in tensors]) if tensors else np.zeros((0, *want))
    bad = nonfinite_tensor(gram)
    if bad is not None:
        values = gram[bad]
        kind = "NaN" if np.isnan(values).any() else "Inf"
        count = int((~np.isfinite(values)).sum())
        raise CheckpointError(f"{path}: tensor {tensors[bad]!r}: Gram matrix holds {kind} ({count} of "
                              f"{values.size} entries not finite); {AGAIN}")
    bad = not_a_gram_matrix(gram)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {tensors[bad]!r}: not a Gram matrix (not symmetric, or a negative "
                              f"squared norm on its diagonal); {AGAIN}")
    return gram


def not_a_gram_matrix(gram: np.ndarray, rtol: float = 1e-9) -> int | None:
    """Index of the first [R, R] matrix of `gram` [T, R, R] that no set of vectors has as inner
    products (asymmetric beyond rounding, or a negative diagonal entry), else None. The writer
    symmetrises exactly, so `rtol` only leaves room for other writers' rounding."""
    scale = np.abs(gram).max(axis=(1, 2), initial=0.0)
    asym = np.abs(gram - gram.transpose(0, 2, 1)).max(axis=(1, 2), initial=0.0) > rtol * scale
    negative = (np.diagonal(gram, axis1=1, axis2=2) < 0).any(axis=1)
    bad = np.flatnonzero(asym | negative)
    return int(bad[0]) if bad.size else None


def nonfinite_tensor(gram: np.ndarray) -> int | None:
    """Index of the first [R, R] matrix of `gram` [T, R, R] with a NaN or Inf entry, else None."""
    bad = np.flatnonzero(~np.isfinite(gram).all(axis=(1, 2)))
    return int(bad[0]) if bad.size else None
