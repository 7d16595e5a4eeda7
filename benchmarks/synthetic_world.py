"""A small planning world built in seconds: tiny real checkpoints (base + fine-tune-like
variants), a catalog with tasks, real structural features and Gram matrices, a synthetic
functional feature table and a selector fitted on synthetic labels.

It exercises every input the planner reads, with the real file formats, without the minutes the
tiny testbed takes to train and probe models; tests and benchmarks/bench_plan_batch.py use it. Needs
Ray (the structural pass runs on actors).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from simmerge_ray.catalog import Catalog
from simmerge_ray.features.structural import StructuralOptions, compute_structural
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint
from simmerge_ray.selector.data import build_pair_data
from simmerge_ray.selector.model import SelectorConfig
from simmerge_ray.selector.train import fit_selector

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=3, num_heads=4, vocab_size=64, dtype="float32")
TASKS = ("code", "math", "rag", "chat")
F_COLUMNS = ("f_kl_ab_mean", "f_kl_ba_mean", "f_act_cos_mean")


@dataclass(frozen=True)
class PlanningWorld:
    catalog: Path  # catalog.yaml
    features: Path  # folder: features.parquet, structural.parquet, gram.safetensors, gram_meta.json
    selector: Path  # selector folder
    models: list[str]
    tasks: tuple[str, ...]


def build_world(root: Path, n_models: int = 8, tasks: tuple[str, ...] = TASKS, seed: int = 0,
                spec: SyntheticSpec = SPEC, epochs: int = 60) -> PlanningWorld:
    root = Path(root)
    rng = np.random.default_rng(seed)
    make_checkpoint(root / "ckpt" / "base", spec)
    models = [f"{tasks[i % len(tasks)]}-{i // len(tasks)}" for i in range(n_models)]
    for i, name in enumerate(models):
        make_checkpoint(root / "ckpt" / name, dataclasses.replace(spec, seed=seed + 1 + i),
                        base=root / "ckpt" / "base", delta_std=float(rng.uniform(0.005, 0.04)))
    raw = {"base": "ckpt/base",
           "models": [{"name": m, "path": f"ckpt/{m}", "task": m.rsplit("-", 1)[0]} for m in models],
           "tasks": {t: {} for t in tasks}}
    (root / "catalog.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    catalog = Catalog.load(root / "catalog.yaml")
    feat_dir = root / "features"
    compute_structural(catalog, feat_dir, StructuralOptions(workers=1, use_cache=False))
    structural = pl.read_parquet(feat_dir / "structural.parquet")
    functional = pl.DataFrame([
        {"a": a, "b": b, "task": t, **{c: float(rng.normal()) for c in F_COLUMNS}}
        for a in models for b in models if a != b for t in tasks])
    features = functional.join(structural, on=["a", "b"], how="inner")
    features.write_parquet(feat_dir / "features.parquet")
    sel = fit_selector(build_pair_data(synthetic_labels(features, catalog, rng), features),
                       SelectorConfig(hidden=16, depth=1, epochs=epochs, seed=seed))
    sel.save(root / "selector")
    return PlanningWorld(root / "catalog.yaml", feat_dir, root / "selector", models, tuple(tasks))


def synthetic_labels(features: pl.DataFrame, catalog: Catalog, rng: np.random.Generator) -> pl.DataFrame:
    """Utility per (task, expert of task, aux, operator): a known function of features, so
    the selector learns a rule that depends on the pair."""
    experts = catalog.model_tasks
    rows = []
    for r in features.iter_rows(named=True):
        if experts.get(r["a"]) != r["task"]:
            continue
        x1, x2 = r["s_weight_cos"], r["f_kl_ab_mean"]
        util = {"linear": 0.4 + 0.5 * x1 - 0.1 * x2, "slerp": 0.5 + 0.2 * x2, "ties": 0.3 + 0.8 * x1 * x1}
        rows += [{"task": r["task"], "expert": r["a"], "aux": r["b"], "operator": op,
                  "utility": u + 0.02 * float(rng.normal())} for op, u in util.items()]
    return pl.DataFrame(rows)
