"""`simmerge plan`: choose the operator for a pair, or subset, order and operators for k-way merges."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from shlex import quote

from simmerge_ray.cli.common import features_folder
from simmerge_ray.errors import ConfigError
from simmerge_ray.features.provenance import check_measured_from, measured_base, measured_checkpoints
from simmerge_ray.io.atomic import atomic_output_dir
from simmerge_ray.io.out_checks import check_output
from simmerge_ray.features.schema import read_feature_table
from simmerge_ray.planner.request import build_step_model, check_known_arms
from simmerge_ray.selector.data import features_file

# Options of multi-way plans (flag dest -> default), which a pairwise plan refuses rather than ignores.
MULTIWAY_ONLY = {"max_way": 4, "min_way": 2, "required_expert": None, "beam_width": 64, "retention_weight": 1.0,
                 "aux_weight": 0.0, "aux_selector": None, "calibration": None}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="pick the merge (operator; or subset, order and operators)",
        description="Pairwise (--expert, --aux): the arm with the highest predicted utility, written as "
                    "merge.yaml. Multi-way (--models): the subset, order and arms with the highest score, "
                    "written as plan.json and one mergekit YAML per step. Plans fold their models in "
                    "order, the expert of --task anywhere in it, with a weighting (half, equal, anchor: "
                    "the share each step gives the joining model). A plan's score is --retention-weight x "
                    "the predicted share of the expert's gap on --task that survives the plan + "
                    "--aux-weight x the mean predicted share of every other model's gap on its own task "
                    "that survives (needs --aux-selector).",
        epilog="examples:\n"
               "  simmerge plan --selector selector/ --catalog catalog.yaml --features feats/ \\\n"
               "      --task code --expert code-1 --aux math-1 --out plan-pair/\n"
               "  simmerge plan --selector selector/ --catalog catalog.yaml --features feats/ \\\n"
               "      --task code --models code-1 math-1 rag-1 --min-way 3 --max-way 3 --out plan-3way/\n"
               "  simmerge plan --selector run/selector --aux-selector run/selector_aux --catalog catalog.yaml \\\n"
               "      --features run/features --task code --models code-1 math-1 rag-1 --min-way 3 --max-way 3 \\\n"
               "      --calibration run/multiway/calibration.json --aux-weight 1 --out plan-3way/")
    p.add_argument("--selector", required=True, help="selector folder from `simmerge fit`")
    p.add_argument("--aux-selector", default=None,
                   help="selector fitted with --target aux_gap_closed (enables the auxiliary-gain objective)")
    p.add_argument("--catalog", required=True, help="catalog YAML the model names refer to")
    p.add_argument("--features", required=True, type=features_folder,
                   help="features folder (features.parquet, gram.safetensors), or its features.parquet")
    p.add_argument("--task", required=True, help="target task")
    p.add_argument("--expert", help="pairwise mode: the expert model")
    p.add_argument("--aux", help="pairwise mode: the auxiliary model")
    p.add_argument("--models", nargs="+", help="multi-way mode: candidate models")
    p.add_argument("--max-way", type=int, default=MULTIWAY_ONLY["max_way"], help="multi-way mode: most models in a plan")
    p.add_argument("--min-way", type=int, default=MULTIWAY_ONLY["min_way"], help="multi-way mode: fewest models in a plan")
    p.add_argument("--required-expert", default=None, help="the expert every plan must hold")
    p.add_argument("--beam-width", type=int, default=MULTIWAY_ONLY["beam_width"],
                   help="multi-way mode: partial plans kept per depth where exhaustive search is too large")
    p.add_argument("--retention-weight", type=float, default=MULTIWAY_ONLY["retention_weight"],
                   help="weight of the expert's predicted retention in a plan's score")
    p.add_argument("--aux-weight", type=float, default=MULTIWAY_ONLY["aux_weight"],
                   help="weight of the other models' predicted retention on their own tasks (needs --aux-selector)")
    p.add_argument("--calibration", default=None,
                   help="multi-way mode: calibration.json from `simmerge calibrate` (or a pipeline run's multiway/); plans are then "
                        "ranked by the objective on their retentions calibrated on measured 3-/4-way merges "
                        "(needs --aux-selector, and --min-way/--max-way within the sizes it covers)")
    p.add_argument("--out", required=True, help="folder for plan.json and the mergekit YAML file(s)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that simmerge wrote")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from simmerge_ray.catalog import Catalog

    catalog = Catalog.load(args.catalog)
    if catalog.tasks:
        catalog.task(args.task)  # a typo lists the known tasks
    if args.models and (args.expert or args.aux):
        raise ConfigError("give either --expert/--aux (pairwise) or --models (multi-way), not both")
    if args.models:  # the request is checked before --out, so that a rerun's error is the request's
        req, space = _request(args, catalog)
        check_output(args.out, overwrite=args.overwrite, inputs=_inputs(args, catalog))
        return _multiway(args, catalog, req, space)
    if not (args.expert and args.aux):
        raise ConfigError("pairwise mode needs --expert and --aux (or use --models for multi-way)")
    ignored = ["--" + name.replace("_", "-") for name, default in MULTIWAY_ONLY.items() if getattr(args, name) != default]
    if ignored:
        raise ConfigError(f"{', '.join(ignored)}: multi-way options (with --models); a pairwise plan (--expert, --aux) "
                          "ranks the arms by the selector alone")
    for m in (args.expert, args.aux):
        catalog.model(m)
    if args.expert == args.aux:
        raise ConfigError(f"--expert and --aux are both {args.expert!r}: a merge needs two different models")
    check_output(args.out, overwrite=args.overwrite, inputs=_inputs(args, catalog))
    return _pairwise(args, catalog)


def _request(args: argparse.Namespace, catalog):
    """The multi-way request of the flags, and its search space: checked before any work."""
    from simmerge_ray.planner.request import PlanRequest, search_space

    req = PlanRequest.parse({
        "request_id": "cli", "task": args.task, "models": args.models, "min_way": args.min_way,
        "max_way": args.max_way, "required_expert": args.required_expert, "beam_width": args.beam_width,
        "retention_weight": args.retention_weight, "aux_weight": args.aux_weight}, "plan request")
    return req, search_space(req, catalog)


def _inputs(args: argparse.Namespace, catalog) -> list:
    """What a plan is computed from: its --out may be none of them, nor hold or lie inside one."""
    return ([*catalog.paths, args.selector, args.features] + ([args.aux_selector] if args.aux_selector else [])
            + ([args.calibration] if getattr(args, "calibration", None) else []))


def _pairwise(args: argparse.Namespace, catalog) -> int:
    import polars as pl

    from simmerge_ray.features.schema import B_TASK_SUFFIX
    from simmerge_ray.planner.assess import arm_table, expert_alone, input_flags, plan_intervals
    from simmerge_ray.planner.plan import Plan
    from simmerge_ray.selector.model import Selector

    sel = Selector.load(args.selector)
    check_known_arms(sel.operators, Path(args.selector))
    check_measured_from(args.features, catalog, [args.expert, args.aux])
    feats = read_feature_table(features_file(args.features), sel.feature_names)
    sel.check_schema(feats.columns, str(features_file(args.features)))
    known = sorted(feats.get_column("task").unique().to_list())
    if args.task not in known:
        raise ConfigError(f"{features_file(args.features)}: no task {args.task!r}; known: {', '.join(known)}")
    row = feats.filter((pl.col("a") == args.expert) & (pl.col("b") == args.aux) & (pl.col("task") == args.task))
    if row.height == 0:
        raise ConfigError(f"features missing for pair ({args.expert!r}, {args.aux!r}) on task {args.task!r}")
    x = row.select(sel.feature_names).to_numpy()
    u = sel.predict(x, [args.task])[0]
    best = int(u.argmax())
    plan = Plan(args.task, [args.expert, args.aux], [sel.operators[best]], [float(u[best])], [], float(u[best]))
    plan.checkpoints = measured_checkpoints(args.features, plan.models)
    plan.base_checkpoint = measured_base(args.features)
    plan.arms = arm_table(sel, u)
    plan.intervals = plan_intervals(sel, plan.operators, plan.step_utility)
    plan.flags = input_flags(sel, sel.standardise(x), plan.models, catalog.model_tasks, args.task)
    undefined = [n for n, v in zip(sel.feature_names, x[0]) if math.isnan(v)]  # a null of the table
    if undefined:
        why = (f"{args.aux} has no task, so nothing was measured on its own task; "
               if catalog.model(args.aux).task is None and all(n.endswith(B_TASK_SUFFIX) for n in undefined) else "")
        plan.flags.append({"kind": "imputed", "step": 1, "features": undefined,
                           "message": f"{args.expert} + {args.aux}: {len(undefined)} input(s) undefined for this pair "
                                      f"({why}imputed with the selector's training mean): "
                                      f"{', '.join(undefined[:3])}{', ...' if len(undefined) > 3 else ''}"})
    plan.expert_alone = expert_alone(sel, None, plan.score)
    what = TARGET_WORDS.get(sel.meta.get("target"), "value")
    print(f"{args.expert} + {args.aux} on {args.task}: choose {sel.operators[best]}")
    width = max(len(a["operator"]) for a in plan.arms)
    for arm in plan.arms:
        print(f"  {arm['operator']:<{width}} predicted {what} {100 * arm['predicted']:6.1f}%"
              + "".join(f"  {key}%: {_pct(iv)}" for key, iv in arm["interval"].items()))
    if not plan.intervals["available"]:
        print(f"  intervals unavailable: {plan.intervals['reason']}")
    _print_trust(plan, f"keeping {args.expert} alone (not merging) scores {{value}} {what}; the best arm, "
                       f"{sel.operators[best]}, is predicted {{best}}")
    out = Path(args.out)
    with atomic_output_dir(out, overwrite=args.overwrite, inputs=_inputs(args, catalog)) as tmp:
        files = plan.write(tmp, {m.name: m.path for m in catalog.models}, catalog.base, step_root=out.resolve())
        (tmp / "merge.yaml").write_text(files[0].read_text().replace(files[0].name, "merge.yaml", 1))
        files[0].unlink()
    print(f"wrote {out / 'plan.json'} and {out / 'merge.yaml'} "
          f"(run: simmerge merge {quote(str(out / 'merge.yaml'))} --out DIR)")
    return 0


TARGET_WORDS = {"utility": "utility", "gap_closed": "gap closed", "aux_gap_closed": "auxiliary gap closed"}


def _interval(iv: list[float] | None) -> str:
    return "unbounded" if iv is None else f"[{iv[0]:.3f}, {iv[1]:.3f}]"


def _pct(iv: list[float] | None) -> str:
    return "unbounded" if iv is None else f"[{100 * iv[0]:6.1f}%, {100 * iv[1]:6.1f}%]"


def _retentions(c: dict) -> str:
    """The expert's and the others' retention of `c`, each with its first (lowest) level's interval."""
    key, band = next(iter(c.get("intervals", {}).items()), (None, {}))

    def shown(name: str) -> str:
        lo_hi = band.get(name)
        return f"{100 * c[name]:+.1f}%" + (f" ({key}%: {_pct(None if lo_hi[0] is None else lo_hi).replace(' ', '')})"
                                           if lo_hi else "")

    return f"expert retention {shown('expert_retention')}, the others' mean {shown('others_retention')}"


def _calibrated_line(c: dict) -> str:
    return f"calibrated: score {c['score']:.3f}, {_retentions(c)}"


def _top_plan_line(top: dict) -> str:
    """The top plan's retentions corrected for its being picked."""
    if not top.get("available"):
        return f"as the top plan: not corrected ({top.get('reason')})"
    return (f"as the top plan (held-out picks of {top['targets']} targets measured {100 * top['bias'][0]:+.1f} / "
            f"{100 * top['bias'][1]:+.1f} points off their calibrated values): {_retentions(top)}")


def _print_trust(plan, alone: str, percent: bool = True) -> None:
    """Flags as one-line warnings (stderr), then how not merging compares with the best prediction."""
    for f in plan.flags:
        print(f"simmerge plan: warning: {f['message']}", file=sys.stderr)
    ea = plan.expert_alone
    if not ea.get("available"):
        print(f"not merging: not compared ({ea.get('reason')})")
        return
    fmt = (lambda v: f"{100 * v:.1f}%") if percent else (lambda v: f"{v:.3f}")
    margin = f"{100 * abs(ea['margin']):.1f} points" if percent else f"{abs(ea['margin']):.3f}"
    text = alone.format(value=fmt(ea["value"]), best=fmt(ea["best"]))
    print(f"not merging is predicted better: {text}, {margin} lower" if ea["better"] else
          f"not merging is predicted worse: {text}, {margin} higher")


def _calibrated_alone_line(best, task: str) -> str:
    """Not merging against the best plan on the calibrated scale, the expert's side: there the
    expert alone keeps its score (+0%). The line above compares predicted scores, which can favour
    the merge where the calibrated retention says the expert loses much of its score."""
    top = best.calibrated.get("top_plan", {})
    e = top["expert_retention"] if top.get("available") else best.calibrated["expert_retention"]
    which = "as the top plan" if top.get("available") else "calibrated"
    return (f"calibrated, the expert's side: the best plan changes {best.expert}'s score on {task} by {100 * e:+.1f}% "
            f"({which}), not merging by +0.0%; the other models' side of not merging is not on this scale "
            f"(their scores with the expert standing in are not in the catalog)")


def _multiway(args: argparse.Namespace, catalog, req, space) -> int:
    from simmerge_ray.planner.assess import PROXY_TARGET
    from simmerge_ray.planner.request import load_calibration, plan_request, write_plans

    check_measured_from(args.features, catalog, space.candidates)
    if space.max_k > len(space.pool) and args.max_way != MULTIWAY_ONLY["max_way"]:  # asked for, and capped: said
        print(f"simmerge plan: warning: --max-way {space.max_k} is more than the {len(space.pool)} candidate models: "
              f"plans of up to {len(space.pool)}", file=sys.stderr)
    calibration = load_calibration(args.calibration, args.aux_selector, args.selector)
    res = plan_request(req, catalog, build_step_model(args.selector, args.features, args.aux_selector),
                       calibration=calibration)
    # A utility selector without --aux-selector: each step's two-sided utility U stands in for the
    # share of the expert's gap kept, and not merging scores 0.5 on it, not 1; said, or the header
    # and the not-merging line disagreed with what the README says a retention is.
    proxy = res.best.expert_alone.get("target") == PROXY_TARGET
    kept = (f"the expert's predicted retention on {args.task}, each step's two-sided utility standing in for the "
            f"share of its gap kept (no --aux-selector)" if proxy else
            f"predicted share of the expert's gap on {args.task} that survives")
    print(f"scored {res.scored} plans in {res.seconds:.2f} s ({res.plans_per_second:.0f} plans/s, "
          f"{'exhaustive' if res.exhaustive else f'beam {args.beam_width}'}); score = {args.retention_weight:g} x "
          f"{kept}" + (f" + {args.aux_weight:g} x the other models' mean predicted retention" if args.aux_weight else ""))
    if calibration is not None:
        print("ranked by the same objective on the retentions calibrated on measured "
              + ", ".join(f"{k}-way merges ({n} subsets)" for k, n in sorted(calibration.subsets.items()))
              + " (plan.json: calibrated)")
    task_of = catalog.model_tasks
    for rank, p in enumerate(res.plans[:5], start=1):
        steps = " ".join(f"-[{op}]-> {m}" for op, m in zip(p.operators, p.models[1:]))
        levels = p.intervals.get("levels", {})
        bound = next((f" ({key}% bound {_interval(v['score'])})" for key, v in levels.items()), "")
        flagged = sum(f["kind"] != "unchecked" for f in p.flags)
        kept = ", ".join(f"{m} {r:.2f}" for m, r in p.retention.items() if r is not None)
        unscored = [f"{m} ({'no task' if task_of.get(m) is None else 'no auxiliary selector'})"
                    for m, r in p.retention.items() if r is None]
        kept += f"; not predicted, so not counted: {', '.join(unscored)}" if unscored else ""
        print(f"{rank}. score {p.score:.3f}{bound}: {p.models[0]} {steps}  (weighting {p.weighting}, expert "
              f"{p.expert}; predicted share of each model's gap kept: {kept})"
              + (f"  [{flagged} flag{'s' * (flagged > 1)}]" if flagged else ""))
        if p.calibrated:
            print("   " + _calibrated_line(p.calibrated))
            if "top_plan" in p.calibrated:
                print("   " + _top_plan_line(p.calibrated["top_plan"]))
    best = res.best
    for ex in best.excluded:
        print(f"left out {ex['model']}: " + (f"the best plan with it scores {ex['best_score_with']:.3f} "
                                             f"({ex['effect']:+.3f})" if ex["effect"] is not None else ex["reason"]))
    if best.intervals.get("available"):
        print("bounds: the objective at the ends of every step's interval; they hold when every step's interval "
              "holds, which is not measured for steps on unbuilt merges (plan.json: intervals)")
    else:
        print(f"intervals unavailable: {best.intervals.get('reason')}")
    _print_trust(best, "keeping the expert alone scores {value} on this objective"
                 + (" (--retention-weight x 0.5: its own two-sided utility, as the steps are scored)" if proxy else "") + ", the best plan {best}",
                 percent=False)
    if best.calibrated and best.expert_alone.get("available"):
        print(_calibrated_alone_line(best, args.task))
    out = Path(args.out)
    with atomic_output_dir(out, overwrite=args.overwrite, inputs=_inputs(args, catalog)) as tmp:
        write_plans(res, catalog, tmp, step_root=out.resolve(),
                    checkpoints=measured_checkpoints(args.features, res.best.models),
                    base_checkpoint=measured_base(args.features))
    multi = f", and {out / 'plan.mergekit.yaml'} (every step; runs with `simmerge merge` or mergekit-multi)" \
        if res.best.k > 2 else ""
    print(f"wrote {out / 'plan.json'} and {res.best.k - 1} step YAML file(s){multi}; execute with "
          f"`simmerge merge --plan {quote(str(out / 'plan.json'))} --catalog {quote(str(args.catalog))} --out DIR`, "
          f"or step by step "
          f"(see each step file's first lines)")
    return 0
