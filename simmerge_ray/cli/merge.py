"""`simmerge merge CONFIG.yaml --out DIR`: run a mergekit-style merge, streaming, in this process
or on a Ray cluster."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from simmerge_ray.cli.common import at_least_one, human_bytes, human_rate, name_listing, positive, seed
from simmerge_ray.ray_session import init_ray
from simmerge_ray.errors import ConfigError
from simmerge_ray.io.out_checks import check_output

if TYPE_CHECKING:
    from simmerge_ray.merge.estimate import GraphEstimate


def _methods_text() -> str:
    """The registry's merge methods and what each computes, for `merge --help`."""
    from simmerge_ray.merge.operators import METHODS

    return name_listing([(name, METHODS[name].doc) for name in sorted(METHODS)])


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge", help="execute a mergekit YAML config or a plan (streaming; local threads or Ray)",
        description="Execute a mergekit YAML config (or a plan from `simmerge plan`) with the streaming "
                    "engine: in this process on every core by default, on Ray when a cluster is named "
                    "(--address, RAY_ADDRESS) or --ray is given. The output folder holds the weights, "
                    "config.json, the tokenizer, README.md (a model card) and mergekit_config.yml (the "
                    "exact config); the bytes are the same in every placement.",
        epilog=f"merge methods (merge_method:):\n{_methods_text()}\n\nexamples:\n"
               "  simmerge merge my-merge.yaml --out merged/\n"
               "  simmerge merge my-merge.yaml --out merged/ --dry-run\n"
               "  simmerge merge two-stage.yaml --out merged/   # multi-document: ties, then slerp the result\n"
               "  simmerge merge --plan plan-3way/plan.json --catalog catalog.yaml --out merged-3way/")
    p.add_argument("config", nargs="?",
                   help="mergekit-style YAML (models/slices, merge_method, parameters, dtype), or a multi-document "
                        "one as mergekit-multi runs (documents with `name:`, read by later ones by that name; the "
                        "unnamed one is the final, written to --out)")
    p.add_argument("--plan", help="a plan.json from `simmerge plan` (instead of CONFIG); needs --catalog")
    p.add_argument("--catalog", help="the catalog the plan's model names refer to")
    p.add_argument("--dtype", default=None, help="output dtype of a plan's merge (default: the inputs')")
    p.add_argument("--out", required=True, help="output checkpoint folder (created; never an input)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that simmerge wrote (never an input)")
    p.add_argument("--workers", type=at_least_one, default=None,
                   help="worker threads here, or merge actors on Ray (default: this machine's CPUs here; "
                        "SIMMERGE_MAX_ACTORS or 2 on Ray)")
    p.add_argument("--cpus-per-worker", type=positive, default=None,
                   help="CPUs per worker: torch threads here, the actor's ask on Ray (default: "
                        "SIMMERGE_CPUS_PER_ACTOR or 1)")
    p.add_argument("--shard-size", default="512M", help="output shard size, e.g. 512M, 2G")
    p.add_argument("--seed", type=seed, default=0, help="seed of stochastic methods (DARE's and DELLA's masks)")
    p.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype the methods compute in, whatever the config's `dtype` says (default: the "
                        "config's `dtype`, as mergekit; without one, each tensor's inputs' dtype, as mergekit); "
                        "the output dtype is unchanged")
    p.add_argument("--allow-nonfinite", action="store_true", help="write NaN/Inf results instead of failing")
    p.add_argument("--allow-crimes", action="store_true",
                   help="merge models of different architectures (config.json model_type), as mergekit's flag; "
                        "default: refused")
    p.add_argument("--address", default=None,
                   help="merge on this Ray cluster (default: RAY_ADDRESS when set, else no Ray)")
    p.add_argument("--ray", action="store_true",
                   help="merge on Ray even without --address/RAY_ADDRESS (starts a local Ray); "
                        "default: off, threads in this process")
    p.add_argument("--intermediate-dir", default=None, metavar="DIR",
                   help="multi-document config only: write each named merge to DIR/<name> and keep it after the "
                        "run, as mergekit-multi's --intermediate-dir; one simmerge kept there for the same configs "
                        "over the same files is reused, any other folder of that name refused (--overwrite "
                        "replaces simmerge's own) (default: a work folder beside --out, removed after the run)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and print the tensors, bytes, peak memory per worker and "
                        "estimated time, without merging; for a multi-document config or --plan, per merge, "
                        "with the totals and the intermediates' disk at most (default: off)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (default: a bar on stderr when it is a terminal)")
    p.set_defaults(func=run)


def _placement(args: argparse.Namespace) -> str:
    """Ray when a cluster is named (--address, RAY_ADDRESS) or --ray is given; else this process."""
    return "ray" if args.ray or args.address or os.environ.get("RAY_ADDRESS") else "local"


def run(args: argparse.Namespace) -> int:
    from simmerge_ray.merge.config import MergeSpec
    from simmerge_ray.merge.executor import ExecOptions, check_merge, input_paths, run_merge
    from simmerge_ray.resources import parse_bytes, pool_size, streaming_ask

    if bool(args.config) == bool(args.plan):
        raise ConfigError("give either a CONFIG.yaml or --plan PLAN.json")
    plan_only = [flag for flag, given in (("--catalog", args.catalog), ("--dtype", args.dtype)) if given]
    if args.config and plan_only:  # they were ignored: a config names its models and sets its own out_dtype
        raise ConfigError(f"{' and '.join(plan_only)} go with --plan; {args.config} names its models and sets "
                          f"its output dtype itself (out_dtype:)")
    if args.intermediate_dir is not None and args.plan:
        raise ConfigError("--intermediate-dir goes with a multi-document config (mergekit-multi's); --plan keeps its "
                          "steps in a work folder beside --out")
    placement = _placement(args)
    ask = streaming_ask()
    workers, workers_from = pool_size(args.workers, 2) if placement == "ray" else (args.workers, None)
    opts = ExecOptions(placement=placement, workers=workers, workers_from=workers_from,
                       cpus_per_worker=args.cpus_per_worker or ask.num_cpus,
                       memory_per_worker=ask.memory,
                       shard_bytes=parse_bytes(args.shard_size, what="--shard-size"),
                       allow_nonfinite=args.allow_nonfinite, allow_crimes=args.allow_crimes, overwrite=args.overwrite,
                       compute_dtype=args.compute_dtype, progress=not args.quiet)
    if args.plan:
        return _run_plan(args, opts)
    from simmerge_ray.merge.multi import is_multi_document
    from simmerge_ray.yaml_io import read_yaml_documents

    docs = read_yaml_documents(args.config, "merge config")
    if is_multi_document(docs):
        return _run_multi(args, opts)
    # the one document parsed above (empty ones, as a trailing `---` makes, are no config), as
    # MergeSpec.load reads a single-document file: relative paths under the file's folder
    if args.intermediate_dir is not None:
        raise ConfigError(f"--intermediate-dir: {args.config} is a single merge config, with no intermediate merge to "
                          "keep (the option goes with a multi-document config, as mergekit-multi's)")
    single = next((d for d in docs if d is not None), None)
    spec = MergeSpec.from_dict(single, root=Path(args.config).parent, source=str(args.config), seed=args.seed)
    check_output(args.out, overwrite=args.overwrite, inputs=[*input_paths(spec), args.config])
    if args.dry_run:
        return _dry_run(spec, opts)
    if placement == "ray":
        check_merge(spec, allow_crimes=opts.allow_crimes)  # every input or config problem fails here, before Ray starts
        init_ray(args.address)
    res = run_merge(spec, args.out, opts)
    print(f"merged {len(spec.inputs)} models with {spec.method.name}: {res.tensors} tensors in "
          f"{res.shards} shard(s) -> {res.out}")
    print(f"read {human_bytes(res.bytes_read)}, wrote {human_bytes(res.bytes_written)} in {res.seconds:.1f} s "
          f"({human_rate(res.bytes_read, res.seconds)} input; {res.workers} "
          f"{'Ray actor' if placement == 'ray' else 'thread'}{'s' if res.workers != 1 else ''})")
    return 0


def _dry_run(spec, opts) -> int:
    from simmerge_ray.merge.estimate import estimate_merge

    est = estimate_merge(spec, opts)
    where = f"{est.workers} {'Ray actor' if est.placement == 'ray' else 'thread'}" + ("s" if est.workers != 1 else "")
    print(f"dry run: {est.method}, {est.tensors} tensors in {est.shards} shard(s), {est.units} work units on "
          f"{where}; nothing was merged or written")
    print(f"would read {human_bytes(est.bytes_read)} and write {human_bytes(est.bytes_written)}")
    print(f"peak memory per worker: about {human_bytes(est.peak_bytes_per_worker)} (plus the process itself)")
    print(f"estimated time: {_seconds(est.seconds)} at this project's measured rates")
    return 0


def _seconds(s: float) -> str:
    """An estimate's time, the same way in every dry run's lines: whole seconds from 10 s, tenths
    below, and "under 0.1 s" rather than "about 0.0 s"."""
    return f"about {s:.0f} s" if s >= 10 else f"about {s:.1f} s" if s >= 0.05 else "under 0.1 s"


def _print_graph_estimate(source: str, est: GraphEstimate, place: str = "beside the output") -> int:
    """One line per merge of a multi-document config or a plan (estimate.GraphEstimate), then the
    totals and the intermediates' disk beside the output; a merge an earlier run kept is said to
    be resumed from, and not counted."""
    order = " -> ".join(f"{s.name} ({s.estimate.method})" for s in est.stages)
    running = est.running
    n, workers = len(est.stages), max(s.estimate.workers for s in running)
    where = f"{workers} {'Ray actor' if est.stages[0].estimate.placement == 'ray' else 'thread'}{'s' * (workers != 1)}"
    skipped = n - len(running)
    runs = f"; {len(running)} to run, {skipped} not (an earlier run kept what they make)" if skipped else ""
    print(f"dry run: {n} merge{'s' * (n != 1)} of {source} on {where}: {order}{runs}; nothing was merged or written")
    for s in est.stages:
        e = s.estimate
        if s.kept_in is not None:
            print(f"  {s.name}: resumed from {s.kept_in} (kept by an earlier run for the same configs and files); "
                  "not merged again")
        elif not s.runs:
            print(f"  {s.name}: not merged (only merges resumed from an earlier run read it)")
        else:
            print(f"  {s.name}: read {human_bytes(e.bytes_read)}, write {human_bytes(e.bytes_written)}"
                  f"{'' if s.final else ' (intermediate)'}, peak {human_bytes(e.peak_bytes_per_worker)} per worker, "
                  f"{_seconds(e.seconds)}")
    kept = f" ({human_bytes(est.kept_bytes)} kept by an earlier run there already)" if est.kept_bytes else ""
    print(f"total: read {human_bytes(est.bytes_read)}, write {human_bytes(est.bytes_written)}; intermediates need "
          f"at most {human_bytes(est.intermediate_peak)} {place} at once{kept}; {_seconds(est.seconds)} at "
          "this project's measured rates")
    return 0


def _run_multi(args: argparse.Namespace, opts) -> int:
    """A multi-document config (mergekit-multi's): every document checked, then its merges in
    dependency order, the final into --out; an interrupted run resumes (merge/multi.py)."""
    from simmerge_ray.merge.multi import load_multi, run_multi

    multi = load_multi(args.config, seed=args.seed, keeps_intermediates=args.intermediate_dir is not None,
                       allow_crimes=args.allow_crimes)
    check_output(args.out, overwrite=opts.overwrite, inputs=[*multi.inputs, args.config])
    keep_in = None if args.intermediate_dir is None else Path(args.intermediate_dir)
    stages = multi.graph.stages
    order = " -> ".join(f"{s.name} ({multi.specs[s.name].method.name})" for s in stages)
    if args.dry_run:
        from simmerge_ray.merge.estimate import estimate_stages

        est = estimate_stages(multi.graph, opts, multi.specs, Path(args.out), keep_in)
        return _print_graph_estimate(args.config, est, "beside the output" if keep_in is None else f"in {keep_in}")
    # Every document was checked above; run_multi starts Ray once --out and --intermediate-dir
    # pass its checks too, before the first merge.
    start = (lambda: init_ray(args.address)) if opts.placement == "ray" else None
    results = run_multi(multi, Path(args.out), opts, keep_in, start=start)
    total = sum(r.seconds for r in results)
    how = (f"{len(results)} merge(s)" if len(results) == len(stages)
           else f"{len(results)} merge(s), resuming from what an interrupted run kept "
                f"({len(stages) - len(results)} of {len(stages)} not rerun)")
    if keep_in is not None:
        how += f"; intermediates kept in {keep_in}"
    print(f"executed {args.config}: {order}; {how} in {total:.1f} s -> {Path(args.out)}")
    print(f"read {human_bytes(sum(r.bytes_read for r in results))}, wrote "
          f"{human_bytes(results[-1].bytes_written)} (the final merge's output)")
    return 0


def _run_plan(args: argparse.Namespace, opts) -> int:
    from simmerge_ray.catalog import Catalog
    from simmerge_ray.merge.config import MergeSpec, check_float_dtype
    from simmerge_ray.merge.executor import check_merge
    from simmerge_ray.planner.execute import estimate_plan, execute_plan, plan_merges, run_planned
    from simmerge_ray.planner.plan import Plan

    if not args.catalog:
        raise ConfigError("--plan needs --catalog (the plan names catalog models)")
    if args.dtype is not None:
        check_float_dtype(args.dtype, "--dtype")
    plan_file = Path(args.plan)
    plan = Plan.load(plan_file)
    catalog = Catalog.load(args.catalog)
    check_output(args.out, overwrite=opts.overwrite, inputs=[*catalog.paths, plan_file])
    if args.dry_run:
        est = estimate_plan(plan, catalog, Path(args.out), opts, out_dtype=args.dtype, plan_file=plan_file,
                            seed=args.seed)
        return _print_graph_estimate(str(plan_file), est)
    if opts.placement == "ray":  # every input problem fails before Ray starts; the plan is checked once
        merges = plan_merges(plan, catalog, Path(args.out), args.dtype, plan_file, args.seed,
                             allow_crimes=opts.allow_crimes)
        if isinstance(merges, MergeSpec):
            check_merge(merges, allow_crimes=opts.allow_crimes)  # the folded merge's inputs, as `merge CONFIG --ray` checks a config's
        init_ray(args.address)
        results = run_planned(merges, Path(args.out), opts)
    else:
        results = execute_plan(plan, catalog, Path(args.out), opts, out_dtype=args.dtype, plan_file=plan_file,
                               seed=args.seed)
    total = sum(r.seconds for r in results)
    steps = len(plan.operators)
    if steps > 1 and plan.fold.linear_coefficients() is not None:
        how = "as one linear merge (every step is linear: the fold's weights multiplied out)"
    elif len(results) < steps:  # the rest were kept by an interrupted run of this --out
        how = f"{len(results)} step(s), resuming after step {steps - len(results)} of {steps}"
    else:
        how = f"{len(results)} step(s)"
    print(f"executed {' -> '.join(plan.models)} ({', '.join(plan.operators)}"
          f"{f'; weighting {plan.weighting}' if plan.weighting else ''}) {how} in {total:.1f} s -> {Path(args.out)}")
    print(f"read {human_bytes(sum(r.bytes_read for r in results))}, wrote "
          f"{human_bytes(results[-1].bytes_written)} (the last step's output)")
    return 0
