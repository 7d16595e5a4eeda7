"""The whole SimMerge pipeline on a testbed: zoo -> features -> labels -> selector -> plans -> bandit.

Each stage is the same `simmerge` command a user would run, called in-process, writing into
its own folder under OUT. A stage that finished with the same inputs is skipped (a marker file
holds the digest of its inputs), and the stages' own caches make an interrupted run resume.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from simmerge_ray.errors import SimMergeError
from simmerge_ray.io.atomic import atomic_write_text



@dataclass
class PipelineSettings:
    zoo_config: Path
    out: Path
    tune_samples: int = 6
    folds: int = 5
    sim_rounds: int = 200
    sim_repeats: int = 20
    seed: int = 0
    probe_args: list[str] = field(default_factory=list)
    label_args: list[str] = field(default_factory=list)


@dataclass
class Stage:
    name: str
    title: str
    run: Callable[[], None]
    inputs: list[str]  # what the stage's result depends on (digested into its marker)


def _digest(parts: list[str]) -> str:
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=12).hexdigest()


def run_command(argv: list[str]) -> None:
    from simmerge_ray.cli import main

    code = main([str(a) for a in argv])
    if code != 0:
        raise SimMergeError(f"stage command failed (exit {code}): simmerge {' '.join(map(str, argv))}")


def stages(s: PipelineSettings) -> list[Stage]:
    out = s.out
    catalog = out / "zoo" / "catalog.yaml"
    feats = out / "features"
    labels = out / "labels"
    zoo_digest = hashlib.blake2b(Path(s.zoo_config).read_bytes(), digest_size=12).hexdigest()
    common = ["--tune-samples", s.tune_samples, "--seed", s.seed]
    return [
        Stage("zoo", "build the testbed (pretrain a base, fine-tune experts)",
              lambda: run_command(["zoo", "build", "--config", s.zoo_config, "--out", out / "zoo", "--overwrite"]),
              [zoo_digest]),
        Stage("structural", "structural features (one streaming Gram pass)",
              lambda: run_command(["features", "structural", "--catalog", catalog, "--out", feats, "--overwrite"]), []),
        Stage("functional", "probe inference on Ray Data and functional features",
              lambda: run_command(["features", "functional", "--catalog", catalog, "--out", feats, *s.probe_args]),
              s.probe_args),
        Stage("labels", "merge and evaluate 2-, 3- and 4-way merges (ground truth)",
              lambda: run_command(["label", "--catalog", catalog, "--out", labels, *s.label_args]), s.label_args),
        Stage("selector_eval", "selector on held-out pairs (Ray Tune nested), leave-one-task-out, ablation",
              lambda: run_command(["evaluate-selector", "--features", feats, "--labels", labels / "labels.parquet",
                            "--out", out / "selector_eval", "--folds", s.folds, *common]), [str(s.folds), *map(str, common)]),
        Stage("fit", "fit the selectors on all pairs (Ray Tune, then Ray Train)",
              lambda: (run_command(["fit", "--features", feats, "--labels", labels / "labels.parquet",
                             "--out", out / "selector", *common]),
                       run_command(["fit", "--features", feats, "--labels", labels / "labels.parquet",
                             "--out", out / "selector_aux", "--target", "aux_gap_closed", *common])),
              [*map(str, common)]),
        Stage("multiway", "plan 3- and 4-way merges and judge them on measured merges",
              lambda: run_multiway(s), []),
        Stage("bandit", "online bandit replayed on held-out pairs",
              lambda: run_bandit(s), [str(s.sim_rounds), str(s.sim_repeats)]),
    ]


def run(s: PipelineSettings, *, echo: Callable[[str], None] = print, until: str | None = None) -> dict[str, float]:
    """Run every stage, or those up to `until` (skipping finished ones); returns seconds per stage."""
    all_stages = stages(s)
    if until is not None:
        names = [st.name for st in all_stages]
        if until not in names:
            raise SimMergeError(f"no pipeline stage {until!r}; stages: {', '.join(names)}")
        all_stages = all_stages[:names.index(until) + 1]
    s.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    upstream: list[str] = []
    for i, st in enumerate(all_stages, start=1):
        key = _digest([st.name, *st.inputs, *upstream])
        marker = s.out / f".stage-{st.name}.json"  # the digest of this stage's inputs
        prefix = f"[{i}/{len(all_stages)}] {st.name:<13}"
        if marker.exists() and json.loads(marker.read_text()).get("key") == key:
            timings[st.name] = json.loads(marker.read_text())["seconds"]
            echo(f"{prefix} done earlier ({timings[st.name]:.0f} s), reused")
        else:
            echo(f"{prefix} {st.title} ...")
            t0 = time.perf_counter()
            st.run()
            timings[st.name] = time.perf_counter() - t0
            atomic_write_text(marker, json.dumps({"key": key, "seconds": timings[st.name]}))
            echo(f"{prefix} finished in {timings[st.name]:.0f} s")
        upstream.append(key)
    return timings


def run_multiway(s: PipelineSettings) -> None:
    import polars as pl

    from simmerge_ray.planner.request import build_step_model
    from simmerge_ray.planner.evaluate import PlanScorer, evaluate_multiway

    model = build_step_model(str(s.out / "selector"), str(s.out / "features"))
    labels = pl.read_parquet(s.out / "labels" / "labels_multiway.parquet")
    result = evaluate_multiway(labels, PlanScorer(model))
    (s.out / "multiway").mkdir(exist_ok=True)
    atomic_write_text(s.out / "multiway" / "multiway.json", json.dumps(result, indent=2))


def run_bandit(s: PipelineSettings) -> None:
    """Replay: the selector used as encoder and greedy baseline is fitted on the training pairs only."""
    import polars as pl

    from simmerge_ray.bandit.simulate import SimSettings, replay_data, simulate, split_by_pair, write_report
    from simmerge_ray.selector.data import load_pair_data
    from simmerge_ray.selector.encoder import SelectorEncoder
    from simmerge_ray.selector.model import Selector, SelectorConfig
    from simmerge_ray.selector.train import fit_selector

    feats = pl.read_parquet(s.out / "features" / "features.parquet")
    labels = pl.read_parquet(s.out / "labels" / "labels.parquet")
    pairs = load_pair_data(str(s.out / "features"), str(s.out / "labels" / "labels.parquet"))
    usable = pl.DataFrame({"task": pairs.tasks, "expert": pairs.experts, "aux": pairs.auxes})
    labels = labels.join(usable, on=["task", "expert", "aux"], how="semi")  # rows the selector can use
    # The replay needs finite contexts: an undefined feature takes its column mean, which is
    # what the selector (the encoder) imputes too.
    feats = feats.with_columns([pl.col(c).cast(pl.Float64).fill_nan(None).fill_null(pl.col(c).mean())
                                for c in pairs.feature_names])
    data = replay_data(labels, feats, pairs.feature_names)
    train, test = split_by_pair(data, 0.3, s.seed)
    train_keys = set(train.keys)
    rows = [i for i, k in enumerate(zip(pairs.tasks, pairs.experts, pairs.auxes)) if k in train_keys]
    cfg = json.loads((s.out / "selector" / "selector.json").read_text())["config"]
    sel: Selector = fit_selector(pairs.subset(rows), SelectorConfig.from_dict({**cfg, "task_encoding": False}))
    enc = SelectorEncoder(sel)
    settings = SimSettings(rounds=s.sim_rounds, repeats=s.sim_repeats, seed=s.seed)
    results = {"main": simulate(train, test, settings, encoder=enc, offline_predict=lambda x: sel.predict(x))}
    add = max(sel.operators, key=lambda o: float(test.rewards[:, list(test.operators).index(o)].mean()))
    results[f"add_{add}_at_60"] = simulate(train, test, settings, encoder=enc,
                                           offline_predict=lambda x: sel.predict(x), new_operator=add, add_at=60)
    out = s.out / "bandit"
    out.mkdir(exist_ok=True)
    write_report(results, out)
