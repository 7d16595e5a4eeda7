"""A per-machine cache of the testbed's pretrained checkpoints (base, skills stage, continued).

Pretraining is most of a zoo build and depends only on part of the config, so a rebuild with
new experts, or a test that builds the same zoo twice, reuses it. An entry is keyed by the
digest of everything that shapes those weights (architecture, tokenizer, data, the training
settings, the domains in config order, the torch and transformers versions and CACHE_VERSION,
which a change to the domain generators or the training loop must bump); it holds the state dict as
safetensors plus a JSON sidecar with the scores, losses, timings and digests of the tensors and
of that result. Entries are written to a temporary folder and renamed; an unreadable entry, one
whose tensors or result no longer match their digests, or whose result lacks a field the build
reads (served, it would crash every build that hits it), is a miss, logged with its path, and is
rebuilt (the new entry replaces it).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from simmerge_ray.io.atomic import publish_cache_entry
from simmerge_ray.io.digest_cache import cache_root, json_digest, tensors_digest

# Bump when training code changes what a config produces (v2: the tensors' digest in meta.json).
# An entry without the result's digest (written before it was added) is a miss, healed in place.
CACHE_VERSION = "pretrain-v2"

# What the build reads from a training result besides its tensors (testbed/build.py): field ->
# the JSON types it may hold.
RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "losses": (list,), "seconds": (int, float), "cpu_seconds": (int, float), "scores": (dict,), "tokens": (int,)}
SCORE_FIELDS = ("score", "loglik", "accuracy")


def pretrain_key(cfg_payload: dict[str, Any], role: str) -> str:
    """Digest of what shapes the `role` checkpoint (`cfg_payload`: the relevant config parts)."""
    payload = {"version": CACHE_VERSION, "torch": torch.__version__, "transformers": version("transformers"),
               "role": role, "config": cfg_payload}
    return json_digest(payload)


def _entry(key: str) -> Path:
    return cache_root() / "testbed-pretrain" / key


def present(key: str) -> bool:
    """Whether an entry for `key` was published (load() still checks it whole)."""
    return (_entry(key) / "meta.json").is_file()


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_result(result: object) -> dict:
    """`result` (a meta.json's, without tensors) if it holds every field the build reads, with
    the right types; else ValueError naming the first one at fault."""
    if not isinstance(result, dict):
        raise ValueError("the result in meta.json is not an object")
    for name, types in RESULT_FIELDS.items():
        if name not in result:
            raise ValueError(f"the result in meta.json has no {name!r}")
        if not isinstance(result[name], types) or isinstance(result[name], bool):
            raise ValueError(f"the result's {name!r} in meta.json is a {type(result[name]).__name__}, "
                             f"not {' or '.join(t.__name__ for t in types)}")
    if not result["losses"] or not all(_is_number(x) for x in result["losses"]):
        raise ValueError("the result's 'losses' in meta.json is not a non-empty list of numbers")
    for task, s in result["scores"].items():
        if not (isinstance(s, dict) and all(_is_number(s.get(f)) for f in SCORE_FIELDS)):
            raise ValueError(f"the result's scores of task {task!r} in meta.json lack one of {', '.join(SCORE_FIELDS)}")
    return cast(dict, result)


def load(key: str, log: Callable[[str], None] = print) -> dict | None:
    """The cached training result for `key` ({"state", "losses", ...}), or None. The tensors and
    the result are checked against their digests in meta.json, and the result's fields against
    what the build reads, so a damaged entry is a logged miss rather than a crash later."""
    entry = _entry(key)
    if not entry.exists():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("meta.json is not an object")
        if "result_digest" not in meta:
            raise ValueError("meta.json has no digest of its result (an entry of an older version)")
        if json_digest(meta["result"]) != meta["result_digest"]:
            raise ValueError("the result in meta.json differs from its digest")
        result = check_result(meta["result"])
        state = load_file(str(entry / "state.safetensors"))
        if sorted(state) != sorted(meta["tensors"]):
            raise ValueError("tensor names differ from meta.json")
        if tensors_digest(state) != meta["digest"]:
            raise ValueError("tensor bytes differ from their digest in meta.json")
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        log(f"pretrain cache: ignoring unreadable entry {entry} ({type(e).__name__}: {e}); rebuilding it")
        return None
    return {**result, "state": state, "cached": True}


def store(key: str, result: dict) -> None:
    """Write `result` (with its "state" dict of tensors) under `key`, atomically."""
    entry = _entry(key)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.contiguous() for k, v in result["state"].items()}
        save_file(state, str(tmp / "state.safetensors"))
        rest = {k: v for k, v in result.items() if k not in ("state", "cached")}
        (tmp / "meta.json").write_text(json.dumps({"tensors": sorted(state), "digest": tensors_digest(state),
                                                   "result": rest, "result_digest": json_digest(rest)}))
        # A corrupt entry load() refused is replaced; a twin build's good one is kept.
        publish_cache_entry(tmp, entry, lambda _: load(key, log=lambda _msg: None) is not None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
