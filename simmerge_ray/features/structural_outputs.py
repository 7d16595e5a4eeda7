"""The structural pass's outputs: per-pair arrays from Gram blocks, and the parquet tables,
raw Gram matrices and run record written to the stage's folder (no Ray)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch

from simmerge_ray.features.gram_math import FEATURES, PairStats, pair_features, raw_gram, total
from simmerge_ray.features.module_groups import GROUPS, THIRDS, depth_third, module_group
from simmerge_ray.features.provenance import checkpoint_record
from simmerge_ray.features.structural_rows import Rows
from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.io.checkpoint import layer_index
from simmerge_ray.io.safetensors_format import StreamingWriter

if TYPE_CHECKING:
    from simmerge_ray.features.structural import ReadPlan, StructuralRun


def pair_arrays(blocks: dict[str, dict], plan: ReadPlan, tensors: Sequence[str], i: int, j: int) -> dict[str, np.ndarray]:
    """One pair's per-tensor values, taken from whichever side is a computed column."""
    if j in plan.cols and i in plan.read_rows:
        r, c = plan.read_rows.index(i), plan.cols.index(j)
    else:
        r, c = plan.read_rows.index(j), plan.cols.index(i)
    return {k: np.array([blocks[t][k][r, c] for t in tensors]) for k in ("gram", "agree", "disagree")}


def assemble(found: dict[tuple[int, int], dict[str, np.ndarray]], m: int, n_tensors: int) -> list[PairStats]:
    centred = np.zeros((n_tensors, m, m))
    agree = np.zeros((n_tensors, m, m), np.int64)
    disagree = np.zeros((n_tensors, m, m), np.int64)
    for (i, j), arr in found.items():
        for dst, key in ((centred, "gram"), (agree, "agree"), (disagree, "disagree")):
            dst[:, i, j] = arr[key]
            dst[:, j, i] = arr[key]
    return [PairStats(centred[t], agree[t], disagree[t]) for t in range(n_tensors)]


# ---- outputs ----------------------------------------------------------------------------------

def write_outputs(out: Path, rows: Rows, stats: list[PairStats]) -> None:
    m, n = len(rows.names), rows.n_models
    first = rows.ckpts[0]
    n_layers = first.num_layers
    meta: dict[str, dict] = {}
    for t in rows.tensors:
        layer = layer_index(t)
        meta[t] = {"numel": rows.numel(t), "shape": list(rows.shape(t)),
                   "group": module_group(t), "layer": layer,
                   "third": depth_third(layer, n_layers) if layer is not None and layer < n_layers else None}
    writer = StreamingWriter(out / "gram.safetensors", [(t, (m, m), "F64") for t in rows.tensors])
    for t, s in zip(rows.tensors, stats):
        writer.write(t, torch.from_numpy(raw_gram(s.centred, rows.ref)))
    writer.close()
    atomic_write_text(out / "gram_meta.json", json.dumps({
        "models": rows.names[:n],
        "base": rows.names[n] if rows.has_base else None,
        **checkpoint_record(dict(zip(rows.names, rows.ckpts))),
        "num_layers": n_layers,
        "tensors": meta,
    }, indent=1))
    by_t = dict(zip(rows.tensors, stats))

    def scope(pred: Callable[[dict], bool]) -> PairStats | None:
        picked = [by_t[t] for t in rows.tensors if pred(meta[t])]
        return total(picked, m) if picked else None

    scopes: dict[str, PairStats | None] = {"": scope(lambda _: True)}
    for g in GROUPS:
        scopes[f"_{g}"] = scope(lambda d, g=g: d["group"] == g)
    for d in THIRDS:
        scopes[f"_d{d}"] = scope(lambda x, d=d: x["third"] == d)
    columns: dict[str, np.ndarray] = {}
    for suffix, s in scopes.items():
        feats = _features_or_nan(s, rows, n)
        for f in FEATURES:
            columns[f"s_{f}{suffix}"] = feats[f]
    a_idx, b_idx = np.nonzero(~np.eye(n, dtype=bool))
    names = np.array(rows.names[:n])
    table = pl.DataFrame({"a": names[a_idx], "b": names[b_idx],
                          **{c: v[a_idx, b_idx] for c, v in columns.items()}})
    _write_parquet(table, out / "structural.parquet")
    layer_frames = []
    for layer in range(n_layers):
        s = scope(lambda x, layer=layer: x["layer"] == layer)
        if s is None:
            continue
        feats = _features_or_nan(s, rows, n)
        layer_frames.append(pl.DataFrame({
            "a": names[a_idx], "b": names[b_idx],
            "layer": np.full(len(a_idx), layer, np.int64),
            "rel_depth": np.full(len(a_idx), (layer + 0.5) / n_layers),
            "third": np.full(len(a_idx), depth_third(layer, n_layers), np.int64),
            **{f"s_{f}": feats[f][a_idx, b_idx] for f in FEATURES},
        }))
    layers = pl.concat(layer_frames) if layer_frames else pl.DataFrame(
        schema={"a": pl.String, "b": pl.String, "layer": pl.Int64, "rel_depth": pl.Float64, "third": pl.Int64,
                **{f"s_{f}": pl.Float64 for f in FEATURES}})
    _write_parquet(layers, out / "structural_layers.parquet")


def _features_or_nan(s: PairStats | None, rows: Rows, n: int) -> dict[str, np.ndarray]:
    if s is None:  # e.g. a model without norm tensors, or an empty depth third
        return {f: np.full((n, n), np.nan) for f in FEATURES}
    return pair_features(s, rows.ref, n, rows.has_base)


def _write_parquet(df: pl.DataFrame, path: Path) -> None:
    """Float columns with NaN (undefined features) are stored as nulls."""
    df = df.with_columns(pl.col(pl.Float64).fill_nan(None))
    df.write_parquet(path)


def run_json(run: StructuralRun) -> dict:
    return {"models": run.models, "base": run.base, "tensors": run.tensors,
            "tensors_computed": run.tensors_computed, "bytes_read": run.bytes_read,
            "tensor_reads": run.tensor_reads, "entries_computed": run.entries_computed,
            "pairs_cached": run.pairs_cached, "seconds": run.seconds, "stream_seconds": run.stream_seconds}
