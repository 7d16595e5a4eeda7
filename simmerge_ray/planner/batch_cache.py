"""The batch planner's results cache: one folder per request key holding the result row
(row.json, written last) and the plan files. An entry that cannot be used (a row that does not
parse as a result, an ok row without a readable plan) is a miss: the request is planned again
and the entry replaced, so a corrupt cache heals instead of failing every rerun."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pyarrow as pa

from simmerge_ray.errors import SimMergeError
from simmerge_ray.io.atomic import publish_cache_entry

log = logging.getLogger(__name__)

ROW_FILE = "row.json"
FILES = "files"  # row.json's digest of every other file of the entry

RESULT_SCHEMA = pa.schema([
    ("request_id", pa.string()),
    ("key", pa.string()),  # digest of the request's content + the inputs' fingerprints
    ("status", pa.string()),  # ok | error
    ("error", pa.string()),
    ("task", pa.string()),
    ("request", pa.string()),  # the validated request as JSON (the raw row when invalid)
    ("models", pa.list_(pa.string())),  # chosen plan, merge order
    ("operators", pa.list_(pa.string())),  # one per step
    ("weighting", pa.string()),  # the fold weighting (merge/arms.py WEIGHTINGS)
    ("expert", pa.string()),  # the target task's expert among `models`
    ("score", pa.float64()),  # the objective's predicted value
    ("step_utility", pa.list_(pa.float64())),  # predicted share of the expert's gap kept per step
    ("step_aux_utility", pa.list_(pa.float64())),
    ("runner_up_models", pa.list_(pa.string())),
    ("runner_up_operators", pa.list_(pa.string())),
    ("runner_up_score", pa.float64()),
    ("margin", pa.float64()),  # score - runner_up_score
    ("flags", pa.list_(pa.string())),  # the best plan's flag kinds (same_task, ...); messages in its plan.json
    # with --calibration: the best plan's calibrated retentions and the objective on them (what
    # plans were ranked by); `score` and `margin` stay the step model's
    ("calibrated_expert_retention", pa.float64()),
    ("calibrated_others_retention", pa.float64()),
    ("calibrated_score", pa.float64()),
    # the same retentions corrected for the plan being the top one (calibrate.py; null: unavailable)
    ("top_plan_expert_retention", pa.float64()),
    ("top_plan_others_retention", pa.float64()),
    ("plans_scored", pa.int64()),
    ("exhaustive", pa.bool_()),
    ("search_seconds", pa.float64()),
    ("plan_dir", pa.string()),  # relative to the output folder
    ("cached", pa.bool_()),  # answered from the results cache in this run
    ("merged", pa.string()),  # --execute-top: merged model folder, relative to the output folder
])
PER_RUN = ("request_id", "request", "cached", "plan_dir", "merged")  # not stored in the cache


def entry_files(entry: Path) -> dict[str, str]:
    """blake2b of each file of an entry but row.json, by name: written into row.json, checked on
    every read, so a damaged file (alternatives.yaml, a step file) is a miss, never served."""
    return {p.name: hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
            for p in sorted(entry.iterdir()) if p.is_file() and p.name != ROW_FILE}


def read_entry(cache: Path, key: str) -> dict | None:
    """The cached result row of `key`, or None (a miss) when the entry is absent or unusable: a
    row that does not parse as a result, files that differ from the digests it records, or an ok
    row whose plan.json does not read as a plan. A miss is planned again and its entry replaced
    (`publish_entry`)."""
    from simmerge_ray.planner.plan import Plan

    entry = cache / key
    try:
        row = json.loads((entry / ROW_FILE).read_text())
        if not isinstance(row, dict) or row.get("key") != key or row.get("status") not in ("ok", "error"):
            raise ValueError("not a result row")
        if row.pop(FILES, None) != entry_files(entry):
            raise ValueError("its files differ from the digests row.json records")
        pa.Table.from_pylist([row], schema=RESULT_SCHEMA)
        if row["status"] == "ok":
            Plan.load(entry / "plan.json")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, pa.ArrowException, SimMergeError) as e:
        log.warning("plan-batch cache: ignoring unusable entry %s (%s: %s); planning it again", entry,
                    type(e).__name__, e)
        return None
    return row


def publish_entry(tmp: Path, target: Path) -> None:
    """Rename a finished entry into place; a concurrent twin's usable entry is kept, an unusable
    one (see `read_entry`) replaced."""
    publish_cache_entry(tmp, target, lambda entry: read_entry(entry.parent, entry.name) is not None)
