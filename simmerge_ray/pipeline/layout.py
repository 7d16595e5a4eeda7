"""The run folder of a pipeline: where each stage writes and where the report, `simmerge
transfer` and the benchmarks read. One place, so that a renamed folder is one edit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def zoo(self) -> Path:
        return self.root / "zoo"

    @property
    def catalog(self) -> Path:
        return self.zoo / "catalog.yaml"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def feature_table(self) -> Path:
        """Structural and functional features joined, one row per (pair, task)."""
        return self.features / "features.parquet"

    @property
    def labels(self) -> Path:
        return self.root / "labels"

    @property
    def pair_labels(self) -> Path:
        """The 2-way labels (one row per pair and arm)."""
        return self.labels / "labels.parquet"

    @property
    def multiway_labels(self) -> Path:
        return self.labels / "labels_multiway.parquet"

    @property
    def label_summary(self) -> Path:
        return self.labels / "label_summary.json"

    @property
    def selector_eval(self) -> Path:
        return self.root / "selector_eval"

    @property
    def selector_report(self) -> Path:
        return self.selector_eval / "selector_report.json"

    @property
    def selector(self) -> Path:
        """The selector fitted on every labelled pair (two-sided utility)."""
        return self.root / "selector"

    @property
    def aux_selector(self) -> Path:
        """The selector of the auxiliary side (aux_gap_closed)."""
        return self.root / "selector_aux"

    @property
    def multiway(self) -> Path:
        return self.root / "multiway"

    @property
    def multiway_calibration(self) -> Path:
        """Calibrators of the planner's multi-way predictions, fitted on the measured merges."""
        return self.multiway / "calibration.json"

    @property
    def bandit(self) -> Path:
        return self.root / "bandit"

    @property
    def transfer(self) -> Path:
        return self.root / "transfer"

    def marker(self, stage: str) -> Path:
        """The file holding the digest of a finished stage's inputs (and its seconds)."""
        return self.root / f".stage-{stage}.json"
