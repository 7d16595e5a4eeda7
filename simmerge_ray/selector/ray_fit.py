"""Ray Train fits the selector; Ray Tune searches its hyperparameters.

Tune trials train one selector per inner fold in lockstep and report the mean validation
utility of the chosen operators every few epochs; folds are split by model pair, never by row.
Every trial runs to the end and the best final utility wins: no early stopping, because ASHA's
stopping decisions depend on when each trial's results reach the scheduler, and it picked
another configuration of the same data and seed on a loaded machine (even with one trial at a
time). A search is therefore reproducible, at the cost of the epochs ASHA would have cut.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from simmerge_ray import placement, resources
from simmerge_ray.selector.data import PairData
from simmerge_ray.selector.folds import group_kfold, task_group_kfold
from simmerge_ray.selector.model import Selector, SelectorConfig
from simmerge_ray.selector.train import chosen_utility, new_selector, train_epochs

# What sets a Tune trial's and a Ray Train worker's ask (the streaming ask), named when no node holds one.
_ASK_VARS = f"{resources.ENV_VARS['cpus_per_actor']}, {resources.ENV_VARS['memory_per_actor']}"


def search_space(allow_task_encoding: bool = True) -> dict:
    from ray import tune

    return {
        "hidden": tune.choice([32, 64, 128]),
        "depth": tune.choice([1, 2, 3]),
        "dropout": tune.uniform(0.0, 0.3),
        "lr": tune.loguniform(1e-3, 1e-2),
        "weight_decay": tune.loguniform(1e-5, 1e-2),
        "task_encoding": tune.choice([True, False]) if allow_task_encoding else False,
    }


def _trial(config: dict, data: PairData, base: dict, splits: list, chunk: int) -> None:
    from ray import tune

    cfg = SelectorConfig.from_dict({**base, **config})
    runs = []
    for tr, va in splits:
        sel = new_selector(data.subset(tr), cfg)
        runs.append((sel, data.subset(tr), data.subset(va), None))
    done = 0
    while done < cfg.epochs:  # reports every `chunk` epochs and at the end: exactly cfg.epochs in all
        n = min(chunk, cfg.epochs - done)
        utils, runs_next = [], []
        for sel, tr, va, opt in runs:
            opt = train_epochs(sel, tr, n, optimizer=opt)
            utils.append(chosen_utility(sel, va))
            runs_next.append((sel, tr, va, opt))
        runs, done = runs_next, done + n
        tune.report({"val_utility": float(np.mean(utils)), "epochs": done})


def tune_selector(data: PairData, *, num_samples: int = 8, folds: int = 3, base: SelectorConfig = SelectorConfig(),
                  storage: str | Path | None = None, chunk: int = 25, allow_task_encoding: bool = True,
                  by_task: bool = False) -> tuple[SelectorConfig, list[dict]]:
    """Random search over pair-grouped inner folds of `data` (task-grouped with `by_task`: a
    config chosen for tasks it has not seen); returns the best config and all trials. Trials
    train single networks (an ensemble's members share the configuration they find), so a search
    costs the same whatever `base.members` is."""
    from ray import tune

    placement.check_placeable(f"a Ray Tune trial of the selector search ({_ASK_VARS})", resources.streaming_ask())
    base_d = {k: v for k, v in asdict(base).items() if k not in ("hidden", "depth", "dropout", "lr",
                                                                   "weight_decay", "task_encoding")} | {"members": 1}
    # The inner folds (the seed is not searched): built here, so a split that cannot be made is one
    # error before any trial, not a failed trial per sample.
    splits = (task_group_kfold(data.tasks, data.aux_tasks, folds, seed=base.seed) if by_task
              else group_kfold(data.pair_keys, folds, seed=base.seed))
    trainable = tune.with_parameters(_trial, data=data, base=base_d, splits=splits, chunk=chunk)
    trainable = tune.with_resources(trainable, _trial_resources("cpu", "memory"))
    storage = Path(storage or tempfile.mkdtemp(prefix="simmerge-tune-")).resolve()
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(allow_task_encoding),
        tune_config=tune.TuneConfig(
            metric="val_utility", mode="max", num_samples=num_samples, reuse_actors=True,
            search_alg=tune.search.BasicVariantGenerator(random_state=base.seed),
        ),
        run_config=tune.RunConfig(storage_path=str(storage), name="selector-tune", verbose=0),
    )
    results = tuner.fit()
    best = results.get_best_result()
    trials = [{**r.config, "val_utility": r.metrics.get("val_utility"), "epochs": r.metrics.get("epochs")}
              for r in results if r.metrics]
    return replace(base, **{k: best.config[k] for k in best.config}), trials


def _trial_resources(cpu_key: str, memory_key: str) -> dict[str, float]:
    """What a Tune trial or a Ray Train worker reserves: the streaming ask (--cpus-per-actor,
    --memory-per-actor; default 1 CPU), under the key names each API spells."""
    ask = resources.streaming_ask()
    return {cpu_key: ask.num_cpus, **({memory_key: float(ask.memory)} if ask.memory else {})}


def _train_loop(config: dict) -> None:
    """Ray Train worker: data-parallel full-batch training (DDP over gloo with >1 worker) of each
    selector in turn; rank 0 reports them as one checkpoint (folder i: the i-th selector)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    selectors, utilities = [], []
    for data, cfg_dict in config["jobs"]:
        cfg = SelectorConfig.from_dict(cfg_dict)
        sel = new_selector(data, cfg)  # statistics from all rows: identical on every worker
        shard = data.subset(np.arange(rank, len(data), world))
        sel.net = ray.train.torch.prepare_model(sel.net, move_to_device=False)
        train_epochs(sel, shard, cfg.epochs)
        sel.net = sel.net.module if hasattr(sel.net, "module") else sel.net
        selectors.append(sel)
        utilities.append(chosen_utility(sel, data))
    metrics = {"train_utility": utilities}
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            for i, sel in enumerate(selectors):
                sel.save(Path(d) / str(i))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def check_train_workers(num_workers: int) -> None:
    """A worker group the connected cluster can never hold at once is one line (Ray Train would
    wait for it in silence); callers check it before a search whose result it would train."""
    placement.placed_count(num_workers, resources.streaming_ask(), each=f"a Ray Train worker ({_ASK_VARS})",
                           group=f"--workers {num_workers}: the Ray Train worker group")


def train_with_ray(jobs: list[tuple[PairData, SelectorConfig]], *, num_workers: int = 1,
                   storage: str | Path | None = None) -> list[Selector]:
    """Fit one selector per (data, config) on all of its data, in one Ray Train TorchTrainer run
    (its worker group starts once: most of a small fit's time), and return them in order."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_train_workers(num_workers)
    storage = Path(storage or tempfile.mkdtemp(prefix="simmerge-train-")).resolve()
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"jobs": [(data, asdict(cfg)) for data, cfg in jobs]},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False,
                                     resources_per_worker=_trial_resources("CPU", "memory")),
        run_config=RunConfig(storage_path=str(storage), name="selector-train"),
    )
    with _prompt_health_checks():
        result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        return [Selector.load(Path(d) / str(i)) for i in range(len(jobs))]


# Ray Train's controller polls its workers every 2 s (the default of this variable, which it
# passes on to the controller it starts): a fit of a few seconds then waited up to 4 s more to be
# seen finished. A missed poll only counts after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 min).
_HEALTH_CHECK_VAR, _HEALTH_CHECK_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"


@contextlib.contextmanager
def _prompt_health_checks() -> Iterator[None]:
    """Set Ray Train's poll interval for one run, unless the user set it."""
    if _HEALTH_CHECK_VAR in os.environ:
        yield
        return
    os.environ[_HEALTH_CHECK_VAR] = _HEALTH_CHECK_S
    try:
        yield
    finally:
        os.environ.pop(_HEALTH_CHECK_VAR, None)
