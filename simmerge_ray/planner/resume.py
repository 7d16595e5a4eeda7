"""Resume an interrupted plan: the plan's steps run as a graph of named merges (merge/multi.py),
a chain `step-1`, ..., `step-(k-1)`, then the final step into --out, so an interrupted run keeps
its finished intermediate step and the next run of the same --out resumes after it while its
key matches: the same step configs over the very same model files (merge/resume.py). What is the
plan's own: its steps' configs and names, and how the log names steps."""

from __future__ import annotations

from pathlib import Path

from simmerge_ray.merge.multi import Words
from simmerge_ray.merge.resume import Stage
from simmerge_ray.planner.plan import Plan

STEP = "step-{j}"


def plan_stages(plan: Plan, paths: dict[str, Path], base: Path | None, out_dtype: str | None = None,
                plan_file: Path | None = None) -> list[Stage]:
    """The plan's steps as stages: step j reads step j-1 by its name `step-<j-1>`."""
    return [Stage(STEP.format(j=j), {**cfg, "out_dtype": out_dtype} if out_dtype else cfg,
                  (STEP.format(j=j - 1),) if j > 1 else (), f"{plan_file or 'plan'} step {j}")
            for j, cfg in enumerate(plan.step_configs(paths, base, step_dir=STEP), start=1)]


def plan_words(steps: int) -> Words:
    """'steps 1-2 of 3 of the plan' (kept), 'the plan after step 2 of 3' (resumed)."""
    def deepest(names: list[str]) -> int:
        return max(int(n.rsplit("-", 1)[1]) for n in names)

    return Words(kept=lambda names: f"steps 1-{deepest(names)} of {steps} of the plan",
                 resumed=lambda names: f"the plan after step {deepest(names)} of {steps}")
