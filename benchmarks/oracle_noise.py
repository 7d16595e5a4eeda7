"""How much of a finished run's pairwise headroom (oracle minus the best fixed arm) is eval-set noise.

Re-measures every labelled 2-way merge of the run (and its two models) on the same eval sets,
keeping each example's greedy answer-token accuracy (the label run keeps only the means), on an
actor pool of the label run's own PlanEvaluator actors; checks that the means reproduce the labels; reproduces
SimMerge's held-out picks from the run's selector_eval (one config per outer fold, fold seed
`--fold-seed`); then resamples the eval sets (benchmarks/oracle_noise_stats.py): bootstrap and split
halves. Prints a table and writes JSON.

    python -m benchmarks.oracle_noise --run runs/demo --out runs/oracle-noise-demo.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from simmerge_ray import resources
from simmerge_ray.actor_pool import ActorPool
from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.ray_session import init_ray
from simmerge_ray.selector.data import PairData
from simmerge_ray.selector.evaluate import fixed_fit
from simmerge_ray.selector.oof import out_of_fold
from benchmarks.held_out_run import HeldOutRun, add_run_arguments
from benchmarks.oracle_noise_stats import PairExamples, noise_report, unit_weights, utilities
from simmerge_ray.testbed.label_plans import LabelPlan
from simmerge_ray.testbed.labels import PlanEvaluator


def measure(catalog: Path, data: PairData, workers: int) -> list[PairExamples]:
    """Per-example accuracies of every labelled pair's models and merges (mirrored merges once)."""
    rows = list(zip(data.experts, data.auxes, data.tasks, data.aux_tasks))
    plans: dict[tuple, LabelPlan] = {}
    singles: dict[str, set[str]] = defaultdict(set)
    for a, b, t, u in rows:
        singles[a] |= {t, u}
        singles[b] |= {t, u}
        for op in data.operators:
            p = LabelPlan((a, b), (op,), tasks=(t, u)).canonical()
            plans[(p.models, p.operators)] = p
    plans |= {((m,), ()): LabelPlan((m,), (), tasks=tuple(sorted(ts))) for m, ts in singles.items()}
    keys = list(plans)
    calls = [keys[i:i + 16] for i in range(0, len(keys), 16)]
    got: dict[tuple, dict[str, np.ndarray]] = {}
    ask = resources.inference_ask()
    with ActorPool(PlanEvaluator, workers, ask, what="noise actor",
                   size_from=resources.SizeFrom(f"--workers {workers}"),
                   args=(str(catalog.resolve()), max(1, int(ask.num_cpus)))) as pool:
        for k, results in pool.map_unordered("example_accuracy", [[plans[key] for key in c] for c in calls]):
            got |= {key: {t: np.asarray(v) for t, v in r.items()} for key, r in zip(calls[k], results)}

    def merge(a: str, b: str, op: str, task: str) -> np.ndarray:
        p = LabelPlan((a, b), (op,), tasks=()).canonical()
        return got[(p.models, p.operators)][task]

    single = lambda m, t: got[((m,), ())][t]  # noqa: E731
    return [PairExamples(t, u, single(a, t), single(b, t), single(a, u), single(b, u),
                         np.stack([merge(a, b, op, t) for op in data.operators]),
                         np.stack([merge(a, b, op, u) for op in data.operators]))
            for a, b, t, u in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(ap, "runs/oracle-noise.json")
    ap.add_argument("--reps", type=int, default=200, help="bootstrap draws, and split-half draws")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    held = HeldOutRun.load(args.run, args.fold_seed)
    run, data = held.run, held.data
    pred, _ = out_of_fold(data, held.splits, [fixed_fit(c) for c in held.configs])
    t0 = time.perf_counter()
    init_ray(None)
    pairs = measure(run.catalog, data, args.workers)
    measured_s = time.perf_counter() - t0
    drift = float(np.abs(utilities(pairs, unit_weights(pairs)) - data.y).max())
    if drift > 1e-9:
        raise SystemExit(f"{run.pair_labels}: re-measured utilities differ from the labels by up to {drift:.3g}")
    out = noise_report(pairs, pred.argmax(1), reps=args.reps, seed=args.seed)
    held.check_reproduced(out["picked"], "SimMerge's picks reproduce")
    out |= {"run": str(run.root), "measure_seconds": measured_s, "seconds": time.perf_counter() - t0}
    atomic_write_text(Path(args.out), json.dumps(out, indent=2))
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    nf, sh = out["noise_free_headroom"], out["share_of_noise_free"]
    print(f"| {run.root.name}: {out['pairs']} pairs | points |\n|---|---:|")
    for label, v in (("best fixed arm", out["best_fixed"]), ("oracle", out["oracle"]), ("SimMerge", out["picked"]),
                     ("headroom, measured", out["headroom"]), ("  its bootstrap SE", out["headroom_se"]),
                     ("headroom, bootstrap bias-corrected", nf["bootstrap"]),
                     ("headroom, split-half extrapolated", nf["split_half"]),
                     ("headroom, cross-fitted on halves (low)", out["half"]["headroom_cross_fitted"]),
                     ("SimMerge's gain over the best fixed arm", out["picked_gain"]), ("  its bootstrap SE", out["picked_gain_se"])):
        print(f"| {label} | {pct(v)} |")
    print(f"share of the headroom: measured {out['share']:.2f}, bias-corrected {sh['bootstrap']:.2f}, "
          f"split-half {sh['split_half']:.2f}  ({out['seconds']:.0f}s; wrote {args.out})")


if __name__ == "__main__":
    main()
