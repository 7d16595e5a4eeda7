"""What a multi-way plan is predicted to be worth: each model's retention on its own task.

A fold's step j merges the merge so far with model m_j. For a model i of the plan,

    R_i = (share of its gap it keeps when it joins: 1 for the first model, otherwise the step's
           predicted auxiliary-side GapClosed)
          x prod over the later steps of the predicted GapClosed on its task,

each factor and each product clipped to RETENTION_CLIP: predicted gains (GapClosed > 1: 1.5% of
the default zoo's predicted retentions, more of a tiny zoo's out-of-distribution ones) do not
compound, so a plan is not predicted to keep more of a model's gap for holding more models (ten
models of steps at 1.4 kept 20.7 of the expert's gap before the forty-fourth session; the default
zoo's multi-way results are unchanged). The plan's score weighs the expert against the rest, as
the pairwise utility weighs its two sides:

    score = retention_weight x R_expert + aux_weight x mean over the other models of R_i.

Models without a task, or every joining model when no auxiliary selector is available, have no
R_i and leave the mean; where no other model has one, the mean counts 0, as for the expert alone
(nothing measurable of theirs is kept). A model without a task also has no auxiliary side, so its
step's merge side is the selector's U, never 2 U - V (step_model.py). A partial plan without the
expert yet counts R_expert = 1, so its score is comparable only with partials whose expert stands
at the same place: the beam (search.py) ranks them within such strata. Pure: no I/O, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

RETENTION_CLIP = (0.0, 1.5)


def clip(x: float) -> float:
    return min(max(x, RETENTION_CLIP[0]), RETENTION_CLIP[1])


@dataclass(frozen=True)
class StepPrediction:
    """The predictions of one fold step (joining `model` at `share`)."""

    model: str
    share: float | None  # None: an arm without a share, run as declared
    kept: Mapping[str, float]  # task of a model already merged -> predicted GapClosed on it
    joining: float | None = None  # predicted auxiliary-side GapClosed of the joining model


def advance(retention: Mapping[str, float | None], step: StepPrediction, tasks: Mapping[str, str | None]
            ) -> dict[str, float | None]:
    """The models' R after one more step (a new dict)."""
    out: dict[str, float | None] = {}
    for m, r in retention.items():
        t = tasks.get(m)
        out[m] = clip(r * clip(step.kept[t])) if r is not None and t is not None and t in step.kept else r
    out[step.model] = None if step.joining is None or tasks.get(step.model) is None else clip(step.joining)
    return out


def first_retention(first: str, tasks: Mapping[str, str | None]) -> dict[str, float | None]:
    """R of a fold's first model before any step: all of its gap (1), or None for a model
    without a task (it has no gap, and leaves the others' mean, wherever it stands)."""
    return {first: 1.0 if tasks.get(first) is not None else None}


@dataclass(frozen=True)
class Objective:
    retention_weight: float = 1.0
    aux_weight: float = 0.0

    def retention(self, first: str, steps: Sequence[StepPrediction], tasks: Mapping[str, str | None]
                  ) -> dict[str, float | None]:
        """R_i of every model of the plan (None where it cannot be predicted)."""
        out = first_retention(first, tasks)
        for step in steps:
            out = advance(out, step, tasks)
        return out

    def score(self, retention: Mapping[str, float | None], expert: str | None) -> float:
        """`expert` None: a partial plan without the expert yet (R_expert = 1). An expert whose R
        cannot be predicted (it joined later, and no auxiliary selector says what it keeps)
        makes the plan unscorable: -inf."""
        r_e = retention.get(expert) if expert is not None else 1.0
        if r_e is None:
            return -math.inf
        others = [r for m, r in retention.items() if m != expert and r is not None]
        aux = sum(others) / len(others) if others else 0.0
        return self.retention_weight * r_e + self.aux_weight * aux

    def as_dict(self) -> dict[str, float]:
        return {"retention_weight": self.retention_weight, "aux_weight": self.aux_weight}


@dataclass(frozen=True)
class Outcome:
    """A measured plan's expert and mean retention (s_merge / s_model - 1)."""

    expert_retention: float
    mean_retention: float

    @classmethod
    def of(cls, retention: Mapping[str, float | None], expert: str) -> "Outcome":
        vals = [r for r in retention.values() if r is not None]
        e = retention.get(expert)
        return cls(math.nan if e is None else float(e), float(sum(vals) / len(vals)) if vals else math.nan)
