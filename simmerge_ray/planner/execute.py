"""Execute a plan with the streaming engine, keeping each intermediate only until the next step."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import replace
from pathlib import Path

from simmerge_ray.catalog import Catalog
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, MergeResult, run_merge
from simmerge_ray.planner.plan import Plan


def execute_plan(plan: Plan, catalog: Catalog, out: Path, opts: ExecOptions = ExecOptions(),
                 out_dtype: str | None = None) -> list[MergeResult]:
    out = Path(out)
    if out.exists() and not opts.overwrite:
        from simmerge_ray.errors import SimMergeError

        raise SimMergeError(f"{out}: output already exists (pass --overwrite to replace it)")
    work = out.parent / f".{out.name}.plan-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    paths = {m.name: m.path for m in catalog.models}
    configs = plan.step_configs(paths, catalog.base, step_dir=str(work / "step-{j}"))
    results = []
    try:
        for j, cfg in enumerate(configs, start=1):
            last = j == len(configs)
            if out_dtype:
                cfg = {**cfg, "out_dtype": out_dtype}
            spec = MergeSpec.from_dict(cfg, root=work, source=f"plan step {j}")
            target = out if last else work / f"step-{j}"
            results.append(run_merge(spec, target, replace(opts, overwrite=opts.overwrite if last else False)))
            if j > 1:
                shutil.rmtree(work / f"step-{j - 1}", ignore_errors=True)  # no longer needed
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results
