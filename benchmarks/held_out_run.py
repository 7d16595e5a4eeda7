"""A finished pipeline run's held-out selector evaluation, loaded the way the benchmarks that
re-examine it (oracle_noise, selector_seeds) need it: its pair data, each outer fold's searched
configuration, the outer folds, and the SimMerge utility its report states, to check that a
re-fit reproduces the run before anything is measured on top of it."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from simmerge_ray.pipeline.layout import RunLayout
from simmerge_ray.selector.data import PairData, load_pair_data
from simmerge_ray.selector.folds import Split, group_kfold
from simmerge_ray.selector.model import SelectorConfig


def add_run_arguments(ap: argparse.ArgumentParser, out: str) -> None:
    """--run, --out (default `out`) and --fold-seed."""
    ap.add_argument("--run", default="runs/demo", help="a finished pipeline run (zoo/, features/, labels/, selector_eval/)")
    ap.add_argument("--out", default=out)
    ap.add_argument("--fold-seed", type=int, default=0, help="the outer folds' seed of the run's selector_eval")


@dataclass(frozen=True)
class HeldOutRun:
    run: RunLayout
    data: PairData
    configs: list[SelectorConfig]  # one per outer fold (selector_report.json fold_configs)
    splits: list[Split]  # the outer folds
    reported: float  # SimMerge's mean held-out utility in the report

    @classmethod
    def load(cls, path: str | Path, fold_seed: int) -> "HeldOutRun":
        run = RunLayout(Path(path).resolve())
        data = load_pair_data(run.feature_table, run.pair_labels, "utility")
        report = json.loads(run.selector_report.read_text())
        configs = [SelectorConfig(**c) for c in report["fold_configs"]]
        return cls(run, data, configs, group_kfold(data.pair_keys, len(configs), fold_seed),
                   report["held_out_pairs"]["utility"]["simmerge"]["mean"])

    def check_reproduced(self, utility: float, what: str) -> None:
        """Stop unless `utility` (what `what` gives) is the report's SimMerge utility."""
        if abs(utility - self.reported) > 1e-9:
            raise SystemExit(f"{self.run.selector_report}: {what} {utility:.4f}, the report says "
                             f"{self.reported:.4f} (another --fold-seed?)")
