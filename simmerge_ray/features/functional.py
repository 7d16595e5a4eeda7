"""Functional pair features from cached probe outputs, and the joined feature table.

    DIR/functional.parquet  one row per ordered pair (a != b) and task:
        a, b, task (String); Float64: f_kl_ab_{mean,median,p10,p90}, f_kl_ba_{...},
        f_act_cos_{mean,d0,d1,d2}, f_attn_cos_{mean,d0,d1,d2}, then the same 16 columns suffixed
        `_on_b_task`: the pair (a, b) on the probes of b's own task (null where b is no task's
        expert or that task was not probed)
    DIR/features.parquet    functional joined with DIR/structural.parquet on (a, b)

KL is over every scored position of every probe (a = first argument: f_kl_ab = KL(p_a||p_b)).
Cosines are per layer, averaged over probes, then summarised over all layers (_mean) and over
relative-depth thirds (_d0.._d2): the width never depends on depth. Each model's outputs are
read once per probe for all pairs, so the N^2 step runs no model and reads each cache once.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import polars as pl
import torch

from simmerge_ray.errors import ConfigError
from simmerge_ray.features.functional_math import depth_summary, distribution_summary, kl_per_position, layer_cosines
from simmerge_ray.inference.catalog_probes import ModelProbes, check_comparable
from simmerge_ray.features.joined import FUNCTIONAL_FILE, write_joined
from simmerge_ray.features.provenance import FUNCTIONAL_META_FILE, checkpoint_record
from simmerge_ray.features.schema import B_TASK_SUFFIX
from simmerge_ray.inference.compact import expand_logprobs
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.stage_files import stage_files
from simmerge_ray.probes.errors import DistributionError

KL_STATS = ("mean", "median", "p10", "p90")
DEPTH_STATS = ("mean", "d0", "d1", "d2")
FUNCTIONAL_COLUMNS: tuple[str, ...] = (
    *(f"f_kl_{d}_{s}" for d in ("ab", "ba") for s in KL_STATS),
    *(f"f_act_cos_{s}" for s in DEPTH_STATS),
    *(f"f_attn_cos_{s}" for s in DEPTH_STATS),
)
B_TASK_COLUMNS: tuple[str, ...] = tuple(c + B_TASK_SUFFIX for c in FUNCTIONAL_COLUMNS)
SCHEMA = {"a": pl.String, "b": pl.String, "task": pl.String, **{c: pl.Float64 for c in FUNCTIONAL_COLUMNS}}
TABLE_SCHEMA = SCHEMA | {c: pl.Float64 for c in B_TASK_COLUMNS}


def full_logprobs(record: dict[str, torch.Tensor], vocab_size: int, shared_rows: int | None = None) -> torch.Tensor:
    """[T, V] log-probs from a record in either stored form; with `shared_rows` (models of
    different vocabulary sizes), the distribution over the first `shared_rows` ids, renormalised."""
    if "logp" in record:
        logp = record["logp"]
    else:
        logp = expand_logprobs(record["topk_idx"], record["topk_logp"], record["tail_logmass"], vocab_size)
    if shared_rows is None:
        return logp
    shared = logp[:, :shared_rows]
    return shared - torch.logsumexp(shared, dim=-1, keepdim=True)


def _check_shapes(a: str, b: str, ra: dict[str, torch.Tensor], rb: dict[str, torch.Tensor]) -> None:
    for field in ("hidden", "attn"):
        if ra[field].shape != rb[field].shape:
            raise ConfigError(
                f"models {a!r} and {b!r}: {field} outputs have shapes {tuple(ra[field].shape)} vs "
                f"{tuple(rb[field].shape)}; functional features need the same architecture and depth"
            )


def check_record(name: str, task: str, pid: int, record: dict[str, torch.Tensor], logp: torch.Tensor) -> None:
    """Refuse a model's NaN (or +inf) outputs by name: they would be written as NaN features
    (log-probs of -inf are a model's zero probabilities, judged per pair by `check_kl`)."""
    for what, t in (("next-token log-probs", logp), ("hidden states", record["hidden"]),
                    ("attention maps", record["attn"])):
        bad = torch.isnan(t) | (t == float("inf")) if t is logp else ~torch.isfinite(t)
        if bad.any():
            raise DistributionError(f"task {task!r}, probe {pid}: model {name!r} gave {t[bad][0].item()} in its "
                                    f"{what}; functional features need finite outputs")


def check_kl(kl: torch.Tensor, p: str, q: str, logp_p: torch.Tensor, logp_q: torch.Tensor, task: str,
             pid: int) -> None:
    """KL(p||q) is infinite where q gives zero probability (logit -inf) to a token p does not:
    refused naming the pair, task, probe, position and token, not written as +inf for `fit`
    to reject the whole table later, nor clamped to a finite number no model produced."""
    bad = ~torch.isfinite(kl)
    if not bad.any():
        return
    pos = int(bad.nonzero()[0])
    zeros = ((logp_q[pos] == float("-inf")) & (logp_p[pos] > float("-inf"))).nonzero()
    if not len(zeros):  # not a zero probability: name what was computed
        raise DistributionError(f"task {task!r}, pair ({p!r}, {q!r}): KL({p}||{q}) is {kl[pos].item()} at probe "
                                f"{pid}, position {pos}; functional features need it finite")
    token = int(zeros[0])
    raise DistributionError(
        f"task {task!r}, pair ({p!r}, {q!r}): model {q!r} gives token {token} zero probability (logit -inf) at "
        f"probe {pid}, position {pos}, where {p!r} gives it {logp_p[pos, token].exp().item():.3g}; "
        f"KL({p}||{q}) is infinite, so the pair has no functional features")


def task_pair_rows(plan: dict[str, ModelProbes], task: str) -> list[dict]:
    """Rows of every ordered pair of the plan's models on one task."""
    names = list(plan)
    pairs = list(combinations(names, 2))
    for a, b in pairs:
        check_comparable(plan[a], plan[b])
    kl: dict[tuple[str, str], list[np.ndarray]] = {}
    act: dict[tuple[str, str], torch.Tensor] = {}
    attn: dict[tuple[str, str], torch.Tensor] = {}
    num_probes = plan[names[0]].probes.num_probes if names else 0
    for pid in range(num_probes):
        recs = {n: plan[n].cache.record(pid) for n in names}
        logps = {n: full_logprobs(recs[n], plan[n].vocab_size, plan[n].shared_rows) for n in names}
        for n in names:
            check_record(n, task, pid, recs[n], logps[n])
        for a, b in pairs:
            _check_shapes(a, b, recs[a], recs[b])
            for p, q in ((a, b), (b, a)):
                pq = kl_per_position(logps[p], logps[q])
                check_kl(pq, p, q, logps[p], logps[q], task, pid)
                kl.setdefault((p, q), []).append(pq.numpy())
            act[(a, b)] = act.get((a, b), 0) + layer_cosines(recs[a]["hidden"], recs[b]["hidden"])
            attn[(a, b)] = attn.get((a, b), 0) + layer_cosines(recs[a]["attn"], recs[b]["attn"])
    rows = []
    for a, b in pairs:
        act_profile = (act[(a, b)] / num_probes).numpy()
        attn_profile = (attn[(a, b)] / num_probes).numpy()
        shared = {**depth_summary(act_profile, "f_act_cos"), **depth_summary(attn_profile, "f_attn_cos")}
        for x, y in ((a, b), (b, a)):
            row = {"a": x, "b": y, "task": task}
            for direction, key in (("ab", (x, y)), ("ba", (y, x))):
                stats = distribution_summary(np.concatenate(kl[key]))
                row.update({f"f_kl_{direction}_{s}": stats[s] for s in KL_STATS})
            rows.append({**row, **shared})
    return rows


def with_b_task_columns(table: pl.DataFrame, task_of: dict[str, str | None]) -> pl.DataFrame:
    """Give each row (a, b, task) the functional columns of (a, b) on b's own task as well.

    A merge is judged on both models' tasks (the two-sided utility), but a row's probes are its
    task's, the expert's; these columns show the selector the pair through the auxiliary's
    probes too. Null where b is no task's expert or its task was not probed.
    """
    own = table.select("a", "b", pl.col("task").alias("_b_task"),
                       *(pl.col(c).alias(c + B_TASK_SUFFIX) for c in FUNCTIONAL_COLUMNS))
    b_task = pl.col("b").replace_strict(task_of, default=None, return_dtype=pl.String).alias("_b_task")
    joined = table.select(*SCHEMA).with_columns(b_task).join(own, on=["a", "b", "_b_task"], how="left",
                                                                       maintain_order="left", validate="m:1")
    return joined.drop("_b_task").select(*TABLE_SCHEMA)


def functional_table(plans: dict[str, dict[str, ModelProbes]], task_of: dict[str, str | None]) -> pl.DataFrame:
    """All tasks' pair rows in the documented schema (column order fixed); `task_of` names each
    model's own task (its catalog entry's), for the `_on_b_task` columns."""
    rows = [r for task, plan in plans.items() for r in task_pair_rows(plan, task)]
    table = pl.DataFrame(rows, schema=SCHEMA, orient="row") if rows else pl.DataFrame(schema=SCHEMA)
    return with_b_task_columns(table, task_of)


def write_functional_features(plans: dict[str, dict[str, ModelProbes]], task_of: dict[str, str | None],
                              out_dir: Path) -> dict[str, Path]:
    """Write DIR/functional.parquet (replacing only the one a previous run wrote: the stage
    resumes from its probe cache, so a rerun needs no --overwrite), and DIR/features.parquet
    when DIR/structural.parquet exists. No other file of DIR is touched."""
    out_dir = Path(out_dir)
    functional = functional_table(plans, task_of)
    measured = {name: Checkpoint.open(mp.model_dir) for plan in plans.values() for name, mp in plan.items()}
    with stage_files(out_dir, "functional", (FUNCTIONAL_FILE, FUNCTIONAL_META_FILE), replace=True) as tmp:
        functional.write_parquet(tmp / FUNCTIONAL_FILE)
        (tmp / FUNCTIONAL_META_FILE).write_text(json.dumps(checkpoint_record(measured), indent=1))
    written = {"functional": out_dir / FUNCTIONAL_FILE}
    joined = write_joined(out_dir)
    if joined is not None:
        written["features"] = joined
    return written
