"""Execute a plan with the streaming engine.

A plan whose every step is a linear arm is one linear combination of its models, tensor by
tensor: it runs as a single merge with the fold's coefficients multiplied out, in one pass and
with no intermediate checkpoint. Other plans run step by step, each intermediate kept only until
the next step has read it, or, when a run fails, until the next run of the same output resumes
after it (planner/resume.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import ConfigError
from simmerge_ray.features.provenance import check_unchanged
from simmerge_ray.io.out_checks import check_replaceable
from simmerge_ray.io.shared_vocab import output_tokenizer
from simmerge_ray.merge.config import MergeSpec, Provenance
from simmerge_ray.merge.estimate import GraphEstimate, StageEstimate, estimate_merge, estimate_stages
from simmerge_ray.merge.executor import ExecOptions, MergeResult, check_merge, run_merge
from simmerge_ray.planner.plan import Plan
from simmerge_ray.merge.multi import StageGraph, run_stages
from simmerge_ray.merge.resume import Stage
from simmerge_ray.planner.resume import STEP, plan_stages, plan_words


def chain(models: list[str], operators: list[str]) -> str:
    """'code-1 -ties-> math-1 -linear-> rag-1': models merged in order, each step's arm."""
    return models[0] + "".join(f" -{op}-> {m}" for op, m in zip(operators, models[1:]))


def step_provenance(plan: Plan, catalog: Catalog, j: int, step_dir: str, plan_file: Path | None = None
                    ) -> Provenance:
    """Step j's inputs as the user knows them (catalog names; step j-1 by its place in the plan),
    for the model card of its output; `step_dir` is how step j's config names step i's output, with `{j}`."""
    names = {str(m.path): m.name for m in catalog.models if m.name in plan.models}
    if catalog.base is not None:
        names[str(catalog.base)] = "the catalog's base"
    where = f" `{plan_file}`" if plan_file is not None else ""
    steps = {step_dir.format(j=i): f"plan step {i}: {chain(plan.models[:i + 1], plan.operators[:i])}"
             for i in range(1, j)}
    used = [m.name for m in catalog.models if m.name in plan.models[:j + 1]]
    models = tuple(str(m.path) for m in catalog.models if m.name in used)
    if catalog.base is not None:
        models += (str(catalog.base),)
    origin = (f"Step {j} of {len(plan.operators)} of the plan{where} for task `{plan.task}`: "
              f"{chain(plan.models, plan.operators)}.")
    return Provenance(origin=origin, names=names, steps=steps, models=models)


def folded_config(plan: Plan, coef: dict[str, float], paths: dict[str, Path]) -> dict:
    """The mergekit config of a linear plan as one merge, with its Fold.linear_coefficients."""
    missing = [m for m in plan.models if m not in paths]
    if missing:
        raise ConfigError(f"plan names models absent from the catalog: {', '.join(missing)}")
    return {"merge_method": "linear", "parameters": {"normalize": False},
            "models": [{"model": str(paths[m]), "parameters": {"weight": w}} for m, w in coef.items()],
            **output_tokenizer([paths[m] for m in coef])}


def check_catalog(plan: Plan, catalog: Catalog, plan_file: Path | None = None) -> None:
    """A ConfigError naming the plan file and the catalog when the plan names a model the catalog
    lacks (a hand-edited plan, or another catalog), or runs an arm that needs a base the catalog
    has none of (the step configs could not be written), or a model is no longer the checkpoint
    the plan recorded."""
    where, cat = plan_file or "plan", catalog.source or "the catalog"
    known = [m.name for m in catalog.models]
    missing = [m for m in plan.models if m not in known]
    if missing:
        raise ConfigError(f"{where}: models: {', '.join(missing)} not in {cat} (it has: {', '.join(known)})")
    if catalog.base is None:
        for j, arm in enumerate(plan.step_arms(), start=1):
            if arm.needs_base:
                raise ConfigError(f"{cat}: no base, and step {j} of {where} runs {arm.name!r}, which merges "
                                  f"task vectors against the catalog's base")
    check_unchanged(plan.checkpoints, catalog, str(where), plan.base_checkpoint)


def check_plan(plan: Plan, catalog: Catalog, plan_file: Path | None = None, *, allow_crimes: bool = False) -> None:
    """Refuse, before any step runs (and before Ray starts), what would otherwise fail only at a
    later step, after hours of earlier ones: check_catalog, and the plan's models (with the base
    where a step needs it) not fitting together, a catalog model replaced since planning by one of
    another shape included. Reads headers, configs and tokenizer files only."""
    check_catalog(plan, catalog, plan_file)
    paths = {m.name: m.path for m in catalog.models}
    used = [paths[m] for m in plan.models]
    needs_base = any(arm.needs_base for arm in plan.step_arms())
    inputs = used + ([catalog.base] if needs_base else [])
    cfg = {"merge_method": "linear",
           "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in inputs],
           **output_tokenizer(used + ([catalog.base] if catalog.base is not None else []))}
    check_merge(MergeSpec.from_dict(cfg, source=f"{plan_file or 'plan'} (its models together)"),
                allow_crimes=allow_crimes)


def _folded_provenance(plan: Plan, catalog: Catalog, coef: dict[str, float], plan_file: Path | None) -> Provenance:
    names = {str(m.path): m.name for m in catalog.models if m.name in plan.models}
    where = f" `{plan_file}`" if plan_file is not None else ""
    weights = ", ".join(f"{m} {w:.4g}" for m, w in coef.items())
    origin = (f"The plan{where} for task `{plan.task}`, {chain(plan.models, plan.operators)}, folded into one "
              f"linear combination (every step is linear): {weights}.")
    return Provenance(origin=origin, names=names, steps={},
                      models=tuple(str(m.path) for m in catalog.models if m.name in plan.models))


def plan_merges(plan: Plan, catalog: Catalog, out: Path, out_dtype: str | None = None,
                plan_file: Path | None = None, seed: int = 0, *, allow_crimes: bool = False) -> MergeSpec | StageGraph:
    """What running the plan into `out` merges, checked (check_plan): one MergeSpec for a plan
    whose every step is linear (the fold's coefficients multiplied out), else its steps as a
    StageGraph. Shared by execute_plan and the dry run's estimate_plan, so they cannot differ."""
    paths = {m.name: m.path for m in catalog.models}
    coef = plan.fold.linear_coefficients()
    if coef is not None:
        check_catalog(plan, catalog, plan_file)  # the merge checks the models together
        folded = folded_config(plan, coef, paths)
        cfg = {**folded, "out_dtype": out_dtype} if out_dtype else folded
        return replace(MergeSpec.from_dict(cfg, root=out.parent, source="plan (folded)", seed=seed),
                       provenance=_folded_provenance(plan, catalog, coef, plan_file))
    check_plan(plan, catalog, plan_file, allow_crimes=allow_crimes)
    stages = plan_stages(plan, paths, catalog.base, out_dtype, plan_file)

    def provenance(stage: Stage) -> Provenance:
        j = int(stage.name.rsplit("-", 1)[1])
        return step_provenance(plan, catalog, j, STEP, plan_file)

    return StageGraph(tuple(stages), seed=seed, provenance=provenance, words=plan_words(len(stages)),
                      source=str(plan_file or "plan"))


def execute_plan(plan: Plan, catalog: Catalog, out: Path, opts: ExecOptions = ExecOptions(),
                 out_dtype: str | None = None, plan_file: Path | None = None, seed: int = 0) -> list[MergeResult]:
    """Run the plan's steps into `out`, each intermediate in a work folder beside it (removed on
    success; kept when a step fails after others finished, and resumed from by the next run for
    `out` while the steps' keys still match, the same configs over the very same model files:
    hours of big merges are not redone);
    each output's model card names the catalog models and the plan's steps, not that folder.
    `seed` seeds stochastic arms (DARE) as `merge --seed` does a config's. Returns the results of
    the merges this run made: one for a folded plan, fewer than the steps for a resumed one.
    The steps run as a chain of named merges through merge/multi.py run_stages, the engine of
    multi-document configs."""
    out = Path(out)
    check_replaceable(out, overwrite=opts.overwrite)  # an empty folder is used, as for a config
    return run_planned(plan_merges(plan, catalog, out, out_dtype, plan_file, seed, allow_crimes=opts.allow_crimes),
                       out, opts)


def run_planned(merges: MergeSpec | StageGraph, out: Path, opts: ExecOptions = ExecOptions()) -> list[MergeResult]:
    """Run what plan_merges made of a plan into `out`: apart from execute_plan so that a caller
    starting Ray in between (`merge --plan --ray`) checks the plan once, before Ray starts."""
    if isinstance(merges, MergeSpec):
        return [run_merge(merges, Path(out), opts)]
    return run_stages(merges, Path(out), opts)


def estimate_plan(plan: Plan, catalog: Catalog, out: Path, opts: ExecOptions = ExecOptions(),
                  out_dtype: str | None = None, plan_file: Path | None = None, seed: int = 0) -> GraphEstimate:
    """What execute_plan would read, write, hold and take, nothing merged: a folded plan as its
    one merge, any other step by step (estimate_stages)."""
    merges = plan_merges(plan, catalog, Path(out), out_dtype, plan_file, seed, allow_crimes=opts.allow_crimes)
    if isinstance(merges, MergeSpec):
        return GraphEstimate((StageEstimate("the folded plan", True, estimate_merge(merges, opts)),), 0)
    return estimate_stages(merges, opts, out=Path(out))  # the steps a run would resume after are not counted
