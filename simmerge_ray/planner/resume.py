"""Resume an interrupted plan: the plan's steps run as a graph of named merges (merge/multi.py),
a chain `step-1`, ..., `step-(k-1)`, then the final step into --out, so an interrupted run keeps
its finished intermediate step and the next run of the same --out resumes after it while its
content key matches (merge/resume.py). What is the plan's own: its steps' configs and names, the
fingerprints it recorded for its models, and how the log names steps."""

from __future__ import annotations

from pathlib import Path

from simmerge_ray.catalog import Catalog
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.merge.multi import Words
from simmerge_ray.merge.resume import Stage, StageKeys
from simmerge_ray.planner.plan import Plan

STEP = "step-{j}"


def plan_stages(plan: Plan, paths: dict[str, Path], base: Path | None, out_dtype: str | None = None,
                plan_file: Path | None = None) -> list[Stage]:
    """The plan's steps as stages: step j reads step j-1 by its name `step-<j-1>`."""
    configs = plan.step_configs(paths, base, step_dir=STEP)
    steps = len(configs)
    return [Stage(STEP.format(j=j), {**cfg, "out_dtype": out_dtype} if out_dtype else cfg,
                  (STEP.format(j=j - 1),) if j > 1 else (), f"{plan_file or 'plan'} step {j}")
            for j, cfg in enumerate(configs, start=1)] if steps else []


def plan_words(steps: int) -> Words:
    """'steps 1-2 of 3 of the plan' (kept), 'the plan after step 2 of 3' (resumed)."""
    def deepest(names: list[str]) -> int:
        return max(int(n.rsplit("-", 1)[1]) for n in names)

    return Words(kept=lambda names: f"steps 1-{deepest(names)} of {steps} of the plan",
                 resumed=lambda names: f"the plan after step {deepest(names)} of {steps}")


class RecordedFingerprints:
    """A checkpoint's fingerprint: the plan's record of it while its files' stat signature is the
    recorded one (check_unchanged vouched for it; a 111B checkpoint is not read twice), else
    computed through the stat-keyed digest cache."""

    def __init__(self, plan: Plan, catalog: Catalog) -> None:
        paths = {m.name: m.path for m in catalog.models}
        self._recorded = {Path(paths[m]).resolve(): rec for m, rec in plan.checkpoints.items() if m in paths}

    def __call__(self, path: Path) -> str:
        ck, rec = Checkpoint.open(Path(path)), self._recorded.get(Path(path).resolve(), {})
        same = bool(rec.get("fingerprint")) and ck.stat_signature() == rec.get("signature")
        return rec["fingerprint"] if same else ck.fingerprint()


class StepKeys:
    """The content key of each intermediate step's output (merge/resume.py StageKeys over the
    plan's steps), computed when first asked for."""

    def __init__(self, plan: Plan, catalog: Catalog, out_dtype: str | None, seed: int,
                 compute_dtype: str | None, allow_nonfinite: bool) -> None:
        paths = {m.name: m.path for m in catalog.models}
        stages = plan_stages(plan, paths, catalog.base, out_dtype)
        self.fingerprint = RecordedFingerprints(plan, catalog)
        self._keys = StageKeys(stages, None, seed, compute_dtype, allow_nonfinite, self.fingerprint)

    def key(self, j: int) -> str:
        """Step j's key (1-based), chained to step j-1's."""
        return self._keys.key(STEP.format(j=j))
