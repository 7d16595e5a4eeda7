"""Batch planning: many requests planned by an autoscaled pool of Ray actors, resumable.

The request table (parquet or JSON: request_table.py) is read by the driver: a cheap first pass there
validates every row (PlanRequest) and keys it by a digest of its content and of the inputs
(selector, features, catalog); rows whose key is in the results cache are answered from it. The
rest is cut into blocks of a few requests and fed to Ray Data's `map_batches` with an actor pool
of `min_size=1, max_size=N`, started at as many actors as there are blocks (at most N): each
actor loads the selector, the Gram matrices and the feature table once; the autoscaler adds the
nodes the waiting actors ask for (on KubeRay too) and the pool shrinks as the queue drains. The
actors are the only work placed on the cluster: no read, key or shuffle task waits for (or dies
with) a node that an autoscaler is adding or removing. A request that fails (unknown model or
task, missing features, bad size range) becomes an error row; it never stops the batch.

Layout of the output folder:
    results.parquet        one row per request (RESULT_SCHEMA), sorted by request_id
    summary.json           counts and timings of this run
    plans/<request_id>/    plan.json, step-<j>.yaml, alternatives.yaml (as `simmerge plan` writes)
    merged/<id>-<key12>/   --execute-top K: the merged model of the K best plans
    cache/<key>/           the results cache (row.json + plan files), reused by reruns
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from simmerge_ray.io.digest_cache import json_digest
from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import ConfigError, OutputError, SimMergeError
from simmerge_ray.features.provenance import check_base_measured, measured_base, measured_checkpoints, stale_models
from simmerge_ray.io.atomic import atomic_file, atomic_output_dir
from simmerge_ray.io.out_checks import MARKER, check_creatable, check_not_input
from simmerge_ray.planner.batch_cache import (FILES, PER_RUN, RESULT_SCHEMA, ROW_FILE, entry_files, publish_entry,
                                              read_entry)
from simmerge_ray.io.stage_files import check_stage, stage_files
from simmerge_ray.planner.request import (PlanRequest, build_step_model, candidates, load_calibration, plan_request,
                                          write_plans)
from simmerge_ray.planner.request_table import UNREADABLE, read_requests
from simmerge_ray.selector.data import features_file
from simmerge_ray.ray_session import init_ray, quiet_ray_data

BATCH_FILES = ("results.parquet", "summary.json")  # what a rerun replaces in --out (besides plans/)
# Bump when a change to the planner changes plans (2: intervals, flags; 3: weightings, the expert
# anywhere, the retention objective; 5: one entry per merge, flag kinds, the proxy's expert-alone;
# 6: a task-less first model, beam ties broken by content, a required expert judged on the task;
# 7: the beam ranks partial plans within strata by the expert's position, linear folds with the
# same coefficients listed once): old entries are ignored.
CACHE_VERSION = 7

PENDING = "pending"  # internal status: valid and not in the cache yet


@dataclass(frozen=True)
class BatchSettings:
    requests: str  # .parquet file or folder, or .jsonl/.json
    selector: str
    catalog: str
    features: str
    out: str
    aux_selector: str | None = None
    calibration: str | None = None  # multiway/calibration.json of a pipeline run (needs aux_selector)
    cache: str | None = None  # default: <out>/cache
    actors: int = 2  # most actors in the pool
    rows_per_block: int = 4  # requests per block: the unit of work handed to an actor
    execute_top: int = 0
    merge_workers: int | None = None  # None: 2, fewer where the cluster holds fewer
    address: str | None = None  # Ray address (default: RAY_ADDRESS or a local Ray)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache else Path(self.out) / "cache"


@dataclass
class BatchReport:
    requests: int
    ok: int
    errors: int
    planned: int  # searched in this run
    cached: int  # answered from the results cache
    invalid: int  # rejected by validation (no search)
    executed: int
    actors: int
    seconds: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / max(self.seconds, 1e-9)


# ---- keys and the results cache -------------------------------------------------------------

def _digest(obj: Any) -> str:
    return json_digest(obj, default=str)


def inputs_fingerprint(s: BatchSettings, catalog: Catalog) -> str:
    """Digest of everything besides the request that decides a plan; a missing input is named."""
    from simmerge_ray.io.digest_cache import file_digest

    files = {"selector": [Path(s.selector) / "selector.json", Path(s.selector) / "selector.safetensors"],
             "features": [features_file(s.features), Path(s.features) / "gram.safetensors",
                          Path(s.features) / "gram_meta.json"]}
    if s.aux_selector:
        files["aux_selector"] = [Path(s.aux_selector) / "selector.json", Path(s.aux_selector) / "selector.safetensors"]
    if s.calibration:
        files["calibration"] = [Path(s.calibration)]
    parts: dict[str, Any] = {"version": CACHE_VERSION}
    for what, paths in files.items():
        for p in paths:
            if not p.is_file():
                raise ConfigError(f"{p}: {what} file not found")
        parts[what] = [file_digest(p) for p in paths]
    parts["catalog"] = catalog.model_dump(mode="json", exclude={"source"})
    return _digest(parts)


def request_key(req: PlanRequest, fingerprint: str) -> str:
    return _digest({"request": req.content(), "inputs": fingerprint})


# ---- pass 1: validate, key, answer from the cache (on the driver) ---------------------------

def prepare_rows(raws: list[dict], fingerprint: str, cache_dir: str, catalog: Catalog,
                 stale: dict[str, str]) -> pa.Table:
    """Validate and key every row; answer it from the cache, or mark it pending. A request whose
    candidates include a `stale` model (its features describe another checkpoint) is an error row
    naming it; the rest of the batch goes on."""
    rows = []
    for raw in raws:
        rid = "" if raw.get("request_id") is None else str(raw["request_id"])  # an id 0 of a wrong type is "0"
        try:
            if UNREADABLE in raw:
                raise ConfigError(raw[UNREADABLE])
            req = PlanRequest.parse(raw, f"request {rid or '(no request_id)'}")
            if stale:
                _check_fresh(req, catalog, stale)
        except ConfigError as e:
            rows.append({"request_id": rid, "key": _digest({"raw": raw, "inputs": fingerprint}), "status": "error",
                         "error": str(e), "task": raw["task"] if isinstance(raw.get("task"), str) else None,
                         "cached": False,
                         "request": json.dumps(raw, sort_keys=True, default=str)})
            continue
        key = request_key(req, fingerprint)
        hit = read_entry(Path(cache_dir), key)
        if hit is not None:
            rows.append({**hit, "request_id": rid, "request": req.model_dump_json(), "cached": True})
        else:
            rows.append({"request_id": rid, "key": key, "status": PENDING, "task": req.task, "cached": False,
                         "request": req.model_dump_json()})
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def _check_fresh(req: PlanRequest, catalog: Catalog, stale: dict[str, str]) -> None:
    try:
        names = candidates(req, catalog)
    except ConfigError:
        return  # an unknown model or task: the planner names it, as for any batch
    for name in names:
        if name in stale:
            raise ConfigError(f"request {req.request_id}: {stale[name]}")


def select_rows(batch: pa.Table, pending: bool) -> pa.Table:
    is_pending = pc.equal(batch["status"], PENDING)
    return batch.filter(is_pending if pending else pc.invert(is_pending))


# ---- pass 2: plan (the actor pool) -----------------------------------------------------------

class PlanWorker:
    """An actor of the pool: loads the planning inputs once, then plans block after block."""

    def __init__(self, selector: str, features: str, catalog: str, aux_selector: str | None, cache_dir: str,
                 calibration: str | None = None) -> None:
        self.catalog = Catalog.load(catalog)
        self.step_model = build_step_model(selector, features, aux_selector)
        self.checkpoints = measured_checkpoints(features, self.catalog.names)  # carried by each plan
        self.base_checkpoint = measured_base(features)
        self.calibration = load_calibration(calibration, aux_selector, selector)
        self.cache = Path(cache_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.plan_row(r) for r in batch.to_pylist()], schema=RESULT_SCHEMA)

    def plan_row(self, row: dict) -> dict:
        req = PlanRequest.model_validate_json(row["request"])
        base = {"key": row["key"], "task": req.task}
        tmp = self.cache / f".{row['key']}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            res = plan_request(req, self.catalog, self.step_model, calibration=self.calibration)
        except SimMergeError as e:  # a bad request: the same inputs fail the same way, so cache it
            outcome, res = {**base, "status": "error", "error": str(e)}, None
        except Exception as e:  # noqa: BLE001 - an unexpected failure: report it, retry on a rerun
            return {**base, "request_id": req.request_id, "request": row["request"], "status": "error", "cached": False,
                    "error": f"{type(e).__name__}: {e}"}
        else:
            best, runner = res.plans[0], (res.plans[1] if len(res.plans) > 1 else None)
            outcome = {**base, "status": "ok", "models": best.models, "operators": best.operators,
                       "weighting": best.weighting, "expert": best.expert, "score": best.score, "step_utility": best.step_utility,
                       "step_aux_utility": best.step_aux_utility,
                       "runner_up_models": runner.models if runner else None,
                       "runner_up_operators": runner.operators if runner else None,
                       "runner_up_score": runner.score if runner else None,
                       "margin": best.score - runner.score if runner else None,
                       "flags": [f["kind"] for f in best.flags],
                       "plans_scored": res.scored, "exhaustive": res.exhaustive, "search_seconds": res.seconds,
                       **({"calibrated_expert_retention": best.calibrated["expert_retention"],
                           "calibrated_others_retention": best.calibrated["others_retention"],
                           "calibrated_score": best.calibrated["score"],
                           "top_plan_expert_retention": best.calibrated["top_plan"].get("expert_retention"),
                           "top_plan_others_retention": best.calibrated["top_plan"].get("others_retention")}
                          if best.calibrated else {})}
        tmp.mkdir(parents=True)
        if res is not None:
            write_plans(res, self.catalog, tmp, checkpoints=self.checkpoints, base_checkpoint=self.base_checkpoint)
        stored = {k: v for k, v in outcome.items() if k not in PER_RUN} | {FILES: entry_files(tmp)}
        (tmp / ROW_FILE).write_text(json.dumps(stored))  # last
        publish_entry(tmp, self.cache / row["key"])
        return {**outcome, "request_id": req.request_id, "request": row["request"], "cached": False}


# ---- the driver ------------------------------------------------------------------------------

def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


def run_batch(s: BatchSettings) -> BatchReport:
    """Plan every request of `s.requests` into `s.out` (resumable: see the module docstring)."""
    import ray

    from simmerge_ray import placement, resources

    if s.actors < 1 or s.rows_per_block < 1:
        raise ConfigError(f"actors ({s.actors}) and rows per block ({s.rows_per_block}) must be >= 1")
    if s.execute_top < 0:  # a negative K merged all ok plans but the last K (a slice)
        raise ConfigError(f"execute_top ({s.execute_top}) must be >= 0")
    if s.merge_workers is not None and s.merge_workers < 1:
        raise ConfigError(f"merge_workers ({s.merge_workers}) must be >= 1")
    t0 = time.perf_counter()
    # Absolute paths: Ray workers need not share the driver's working directory.
    s = replace(s, **{f: str(Path(getattr(s, f)).resolve()) for f in ("requests", "selector", "catalog", "features",
                                                                      "out", "aux_selector", "calibration", "cache")
                      if getattr(s, f)})
    out, cache = Path(s.out), s.cache_dir
    load_calibration(s.calibration, s.aux_selector, s.selector)  # a bad file: one clear error, before any work
    inputs = [getattr(s, f) for f in ("requests", "selector", "catalog", "features", "aux_selector", "calibration")
              if getattr(s, f)]
    check_stage(out, BATCH_FILES, replace=True, inputs=inputs)
    check_not_input(cache, inputs, noun="the results cache")
    if cache.exists() and not cache.is_dir():
        raise ConfigError(f"{cache}: the results cache must be a folder, and this is a file")
    check_creatable(cache / "x")
    catalog = Catalog.load(s.catalog)
    check_base_measured(s.features, catalog)  # every request's features rest on it: the batch is refused
    fingerprint = inputs_fingerprint(s, catalog)
    keyed = prepare_rows(read_requests(s.requests), fingerprint, str(cache), catalog,
                         stale_models(s.features, catalog, catalog.names))
    pending, done = select_rows(keyed, pending=True), select_rows(keyed, pending=False)
    n_pending = pending.num_rows
    if n_pending:
        build_step_model(s.selector, s.features, s.aux_selector)  # bad inputs: one clear error, before any actor
    # Ray only now: every input above is refused in one line without starting (or joining) a cluster.
    init_ray(s.address)
    quiet_ray_data()
    ask = resources.streaming_ask()
    placement.check_placeable("plan-batch actor", ask)  # not a silent wait for a node that never comes
    fresh: list[pa.Table] = []
    if n_pending:
        cache.mkdir(parents=True, exist_ok=True)  # only now: a batch refused above leaves --out as it was
        blocks = _blocks(pending, s.rows_per_block)
        planned = ray.data.from_arrow(blocks).map_batches(
            PlanWorker,
            fn_constructor_kwargs={"selector": s.selector, "features": s.features, "catalog": s.catalog,
                                   "aux_selector": s.aux_selector, "cache_dir": str(cache),
                                   "calibration": s.calibration},
            batch_size=s.rows_per_block, batch_format="pyarrow",
            # As many actors at once as the blocks can use: an autoscaling cluster grows at once,
            # not one actor per scaling round; min_size=1 lets the pool shrink as the queue drains.
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=s.actors,
                                               initial_size=min(s.actors, len(blocks))),
            **ask.ray_options())
        fresh = list(planned.iter_batches(batch_size=None, batch_format="pyarrow"))
    order = [("request_id", "ascending"), ("key", "ascending")]
    rows = pa.concat_tables([done, *fresh]).cast(RESULT_SCHEMA).sort_by(order).to_pylist()
    invalid = sum(r["status"] == "error" and not r["cached"] for r in done.to_pylist())
    rows = _flag_duplicate_ids(rows)
    for r in rows:
        if r["status"] == "ok":
            try:
                r["plan_dir"] = _materialise_plan(cache / r["key"], out / "plans" / r["request_id"], out, catalog)
            except OutputError as e:  # its folder holds files simmerge did not write: kept, and said
                _as_error(r, str(e))
    executed = _execute_top(rows, s) if s.execute_top else 0
    report = BatchReport(
        requests=len(rows), ok=sum(r["status"] == "ok" for r in rows),
        errors=sum(r["status"] == "error" for r in rows), planned=n_pending,
        cached=sum(bool(r["cached"]) for r in rows), invalid=invalid,
        executed=executed, actors=s.actors, seconds=time.perf_counter() - t0)
    with stage_files(out, "plan-batch", BATCH_FILES, replace=True) as tmp:
        _write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), tmp / "results.parquet")
        (tmp / "summary.json").write_text(json.dumps(
            {**asdict(report), "requests_per_second": report.requests_per_second, "settings": asdict(s)}, indent=1))
    return report


def _flag_duplicate_ids(rows: list[dict]) -> list[dict]:
    """Request ids name output folders, so each must be unique: duplicates become errors."""
    counts = Counter(r["request_id"] for r in rows if r["request_id"])
    for r in rows:
        n = counts.get(r["request_id"], 0)
        if n > 1:
            _as_error(r, f"request_id {r['request_id']!r} appears {n} times in the request table")
    return rows


def _as_error(row: dict, message: str) -> None:
    """Turn a result row into an error row (its results cleared)."""
    row.update({f: None for f in RESULT_SCHEMA.names if f not in ("request_id", "key", "task", "request", "cached")})
    row.update(status="error", error=message)


def _materialise_plan(entry: Path, target: Path, out: Path, catalog: Catalog) -> str:
    """Copy a cached plan folder to the output folder, its step files written for their final
    place (each names the previous step's output by its absolute path, as `simmerge plan`
    writes them); returns its path relative to `out`."""
    from simmerge_ray.planner.plan import Plan

    if (target / MARKER).is_file() and _read_bytes(target / "plan.json") == (entry / "plan.json").read_bytes():
        return str(target.relative_to(out))  # a rerun: already this plan; what the user added stays
    with atomic_output_dir(target, overwrite=True) as tmp:
        for f in entry.iterdir():
            if f.name != ROW_FILE and not (f.name.startswith("step-") and f.suffix == ".yaml"):
                shutil.copy2(f, tmp / f.name)
        plan = Plan.load(entry / "plan.json")
        plan.write(tmp, {m.name: m.path for m in catalog.models}, catalog.base, step_root=target)
    return str(target.relative_to(out))


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _execute_top(rows: list[dict], s: BatchSettings) -> int:
    """Merge the K plans of highest predicted score (a merge already there is kept: its folder
    name carries the request's key, so it was made from this very plan)."""
    from simmerge_ray import resources
    from simmerge_ray.merge.executor import ExecOptions
    from simmerge_ray.planner.execute import execute_plan
    from simmerge_ray.planner.plan import Plan

    catalog = Catalog.load(s.catalog)
    out = Path(s.out)
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: (-r["score"], r["request_id"]))
    ask = resources.streaming_ask()  # what `merge`'s workers ask
    opts = ExecOptions(placement="ray", workers=s.merge_workers, cpus_per_worker=ask.num_cpus,
                       memory_per_worker=ask.memory,
                       workers_from=(resources.SizeFrom(f"--merge-workers {s.merge_workers}")
                                     if s.merge_workers else None))
    for r in ok[: s.execute_top]:
        target = out / "merged" / f"{r['request_id']}-{r['key'][:12]}"
        if not target.exists():
            plan = Plan.load(out / r["plan_dir"] / "plan.json")
            execute_plan(plan, catalog, target, opts,
                         plan_file=out / r["plan_dir"] / "plan.json")
        r["merged"] = str(target.relative_to(out))
    return min(s.execute_top, len(ok))


def _write_table(table: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
