"""How much SimMerge's held-out result rides on the selector's initial weights, and what averaging
several seeds' predictions (an ensemble) gives.

Refits each outer fold's configuration of a finished run's selector_eval with initial-weight seeds
seed, seed+1, ... (the same folds, the same configurations: only torch's seed moves), checks that
the run's own seed reproduces its report, and prints per seed and for the ensemble (the mean of the
seeds' predictions) SimMerge's mean two-sided utility, its share of the headroom over the best
fixed arm, its selection accuracy, and how often its pick agrees with the run's seed's pick.
With `--members K` every seed's selector is itself a K-network ensemble (`simmerge fit --members`):
how steady an ensemble's picks are from one seed to the next.

    python -m benchmarks.selector_seeds --run runs/demo --seeds 8 --out runs/selector-seeds-demo.json
    python -m benchmarks.selector_seeds --run runs/demo --seeds 4 --members 8 --out runs/selector-seeds-demo-m8.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.selector.evaluate import fixed_fit
from simmerge_ray.selector.oof import out_of_fold
from benchmarks.held_out_run import HeldOutRun, add_run_arguments


def pick_summary(y: np.ndarray, tasks: Sequence[str], pred: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """SimMerge's result with predictions `pred` ([n, arms]) against labels `y`: the mean over tasks
    of its mean utility, its share of the headroom (oracle minus the best fixed arm, both as task
    means), selection accuracy, and the share of rows whose pick is the `reference` predictions'."""
    t = np.asarray(tasks)
    names = sorted(set(tasks))
    by_task = lambda v: float(np.mean([v[t == n].mean() for n in names]))  # noqa: E731
    rows = np.arange(len(y))
    pick = pred.argmax(axis=1)
    chosen, oracle = by_task(y[rows, pick]), by_task(y.max(axis=1))
    best_fixed = max(by_task(y[:, j]) for j in range(y.shape[1]))
    return {"utility": chosen, "headroom_share": (chosen - best_fixed) / (oracle - best_fixed) if oracle > best_fixed else float("nan"),
            "selection_accuracy": float((y[rows, pick] >= y.max(axis=1) - 1e-9).mean()),
            "agrees_with_reference": float((pick == reference.argmax(axis=1)).mean())}


def seed_report(y: np.ndarray, tasks: Sequence[str], preds: Sequence[np.ndarray]) -> dict:
    """Per seed (the first is the reference) and for the ensemble of all of them."""
    per_seed = [pick_summary(y, tasks, p, preds[0]) for p in preds]
    shares = np.array([s["headroom_share"] for s in per_seed])
    return {"per_seed": per_seed, "ensemble": pick_summary(y, tasks, np.mean(preds, axis=0), preds[0]),
            "share_min": float(shares.min()), "share_mean": float(shares.mean()), "share_max": float(shares.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(ap, "runs/selector-seeds.json")
    ap.add_argument("--seeds", type=int, default=8, help="initial-weight seeds, from each fold configuration's own")
    ap.add_argument("--members", type=int, default=1, help="networks in each seed's selector (an ensemble)")
    args = ap.parse_args()
    if args.seeds < 2 or args.members < 1:
        raise SystemExit("--seeds: at least 2; --members: at least 1")
    held = HeldOutRun.load(args.run, args.fold_seed)
    run, data = held.run, held.data
    t0 = time.perf_counter()
    preds = [out_of_fold(data, held.splits, [fixed_fit(replace(c, seed=c.seed + s, members=args.members))
                                             for c in held.configs])[0]
             for s in range(args.seeds)]
    out = seed_report(data.y, data.tasks, preds)
    if args.members == 1:  # the run's own selectors are single networks
        held.check_reproduced(out["per_seed"][0]["utility"], "the run's seed reproduces")
    out |= {"run": str(run.root), "pairs": len(data), "seeds": args.seeds, "members": args.members,
            "seconds": time.perf_counter() - t0}
    atomic_write_text(Path(args.out), json.dumps(out, indent=2))
    print(f"| {run.root.name}: {len(data)} pairs, {args.members} network(s) per seed | SimMerge utility | headroom share | selection accuracy | "
          "same pick as seed +0 |\n|---|---:|---:|---:|---:|")
    for label, s in [*((f"seed +{i}", s) for i, s in enumerate(out["per_seed"])),
                     (f"ensemble of {args.seeds}", out["ensemble"])]:
        print(f"| {label} | {100 * s['utility']:.2f}% | {s['headroom_share']:.2f} | {100 * s['selection_accuracy']:.1f}% | "
              f"{100 * s['agrees_with_reference']:.1f}% |")
    print(f"headroom share over seeds: {out['share_min']:.2f}-{out['share_max']:.2f} (mean {out['share_mean']:.2f}); "
          f"ensemble {out['ensemble']['headroom_share']:.2f}  ({out['seconds']:.0f}s; wrote {args.out})")


if __name__ == "__main__":
    main()
