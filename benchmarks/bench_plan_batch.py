"""Benchmark of batch planning: requests planned per second with 1 and 2 actors, and the time per
request of the planner's search for catalogs of 8, 16 and 32 models (exhaustive vs beam).

    .venv/bin/python -m benchmarks.bench_plan_batch [--requests 200] [--json bench_plan_batch.json]

Part 1 runs `run_batch` on a synthetic planning world (benchmarks.synthetic_world: 8 tiny
real checkpoints, real structural features and Gram matrices, a fitted selector), each pool size
with an empty results cache. Part 2 times `search` for one request (one required expert, every
catalog model a candidate, plans of 2..4 models) with the real selector step model on the
8-model world, and with a synthetic step model (a random utility table: costs nothing, so the
time is the search's own) for 8, 16 and 32 models, where building and featurising 32 real
checkpoints would dominate. Beam: width 64 over the same 2..4 range (exhaustive search off).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


from simmerge_ray.merge.arms import STEP_ARMS
from simmerge_ray.planner.objective import Objective
from simmerge_ray.planner.search import SearchSpace, search

OPS = list(STEP_ARMS)


class SyntheticStepModel:
    """Step utilities from a fixed random table u[last model, next model, operator]."""

    operators = OPS
    has_aux = False  # no auxiliary side: plans start from the expert

    def __init__(self, models: list[str], seed: int = 0) -> None:
        self.index = {m: i for i, m in enumerate(models)}
        self.u = np.random.default_rng(seed).uniform(0.3, 1.2, (len(models), len(models), len(OPS)))

    def start(self, expert: str) -> tuple[int, ...]:
        return (self.index[expert],)

    def extend(self, state: tuple[int, ...], model: str, arm) -> tuple[int, ...]:
        return state + (self.index[model],)

    def step_utilities(self, states, nexts, task, joining_tasks=None):
        last = np.fromiter((s[-1] for s in states), int)
        nxt = np.fromiter((self.index[m] for m in nexts), int)
        return self.u[last, nxt], None


def time_search(step_model, models: list[str], expert: str, beam: bool) -> dict:
    space = SearchSpace("code", models, [expert], 2, 4, beam_width=64, exhaustive_max_plans=0 if beam else 10**9,
                        tasks={expert: "code"})
    t0 = time.perf_counter()
    res = search(space, step_model, Objective())
    return {"seconds": time.perf_counter() - t0, "plans_scored": res.scored, "best_score": res.best.score,
            "best": res.best.models, "exhaustive": res.exhaustive}


def requests_table(models: list[str], tasks: tuple[str, ...], n: int) -> list[dict]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        task = rng.choice(tasks)
        others = rng.sample([m for m in models if not m.startswith(task)], rng.randint(1, 3))
        out.append({"request_id": f"r{i:04d}", "task": task, "models": [f"{task}-{rng.randint(0, 1)}", *others],
                    "max_way": rng.choice([2, 3, 4])})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--work", default=None, help="working folder (default: a temp dir)")
    ap.add_argument("--json", default="bench_plan_batch.json")
    args = ap.parse_args()

    import polars as pl
    import ray

    from simmerge_ray.planner.batch import BatchSettings, run_batch
    from simmerge_ray.planner.request import build_step_model
    from benchmarks.synthetic_world import build_world

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-plan-batch-"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    world = build_world(work / "world", n_models=8)
    pl.DataFrame(requests_table(world.models, world.tasks, args.requests)).write_parquet(work / "requests.parquet")
    results: dict = {"requests": args.requests, "batch": [], "search": []}
    for actors in (1, 2):
        out = work / f"out-{actors}"
        r = run_batch(BatchSettings(requests=str(work / "requests.parquet"), selector=str(world.selector),
                                    catalog=str(world.catalog), features=str(world.features), out=str(out),
                                    actors=actors))
        search_s = pl.read_parquet(out / "results.parquet")["search_seconds"].sum()
        results["batch"].append({"actors": actors, "seconds": r.seconds, "requests_per_second": r.requests_per_second,
                                 "planned": r.planned, "ok": r.ok, "search_seconds_total": search_s})
    real = build_step_model(world.selector, world.features)
    expert = "code-0"
    for beam in (False, True):
        results["search"].append({"models": 8, "step_model": "selector", "mode": "beam64" if beam else "exhaustive",
                                  **time_search(real, world.models, expert, beam)})
    for n in (8, 16, 32):
        models = ["code-0"] + [f"m{i}" for i in range(1, n)]
        synthetic = SyntheticStepModel(models)
        # 32 models: 2.2M plans of 2..4 models under three weightings, too many to enumerate here
        for beam in ((False, True) if n <= 16 else (True,)):
            results["search"].append({"models": n, "step_model": "synthetic",
                                      "mode": "beam64" if beam else "exhaustive",
                                      **time_search(synthetic, models, expert, beam)})
    ray.shutdown()

    print(f"\nbatch planning, {args.requests} requests (8-model world, 2..4-way plans of 2..4 candidates)")
    print(f"{'actors':>6} {'seconds':>8} {'requests/s':>11} {'search s':>9}")
    for b in results["batch"]:
        print(f"{b['actors']:>6} {b['seconds']:>8.1f} {b['requests_per_second']:>11.2f} "
              f"{b['search_seconds_total']:>9.1f}")
    print("\nsearch per request (one required expert, all models candidates, plans of 2..4 models)")
    print(f"{'models':>6} {'step model':>10} {'mode':>10} {'plans':>8} {'seconds':>8} {'plans/s':>9} {'best':>7}")
    for s in results["search"]:
        print(f"{s['models']:>6} {s['step_model']:>10} {s['mode']:>10} {s['plans_scored']:>8} {s['seconds']:>8.3f} "
              f"{s['plans_scored'] / s['seconds']:>9.0f} {s['best_score']:>7.3f}")
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
