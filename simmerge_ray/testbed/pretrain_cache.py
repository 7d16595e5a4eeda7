"""A per-machine cache of the testbed's pretrained checkpoints (base, skills stage, continued).

Pretraining is most of a zoo build and depends only on part of the config, so a rebuild with
new experts, or a test that builds the same zoo twice, reuses it. An entry is keyed by the
digest of everything that shapes those weights (architecture, tokenizer, data, the training
settings, the domains in config order, the torch and transformers versions and CACHE_VERSION,
which a change to the domain generators or the training loop must bump); it holds the state dict as
safetensors plus a JSON sidecar with the scores, losses, timings and a digest of the tensors.
Entries are written to a temporary folder and renamed; an unreadable entry, or one whose tensors
no longer match their digest, is a miss, logged with its path, and is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from simmerge_ray.io.atomic import publish_cache_entry
from simmerge_ray.io.digest_cache import cache_root, json_digest, tensors_digest

# Bump when training code changes what a config produces (v2: the tensors' digest in meta.json).
CACHE_VERSION = "pretrain-v2"


def pretrain_key(cfg_payload: dict[str, Any], role: str) -> str:
    """Digest of what shapes the `role` checkpoint (`cfg_payload`: the relevant config parts)."""
    payload = {"version": CACHE_VERSION, "torch": torch.__version__, "transformers": version("transformers"),
               "role": role, "config": cfg_payload}
    return json_digest(payload)


def _entry(key: str) -> Path:
    return cache_root() / "testbed-pretrain" / key


def load(key: str, log: Callable[[str], None] = print) -> dict | None:
    """The cached training result for `key` ({"state", "losses", ...}), or None."""
    entry = _entry(key)
    if not entry.exists():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        state = load_file(str(entry / "state.safetensors"))
        if sorted(state) != sorted(meta["tensors"]):
            raise ValueError("tensor names differ from meta.json")
        if tensors_digest(state) != meta["digest"]:
            raise ValueError("tensor bytes differ from their digest in meta.json")
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        log(f"pretrain cache: ignoring unreadable entry {entry} ({type(e).__name__}: {e}); rebuilding it")
        return None
    return {**meta["result"], "state": state, "cached": True}


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
        (tmp / "meta.json").write_text(json.dumps({"tensors": sorted(state), "digest": tensors_digest(state), "result": rest}))
        # A corrupt entry load() refused is replaced; a twin build's good one is kept.
        publish_cache_entry(tmp, entry, lambda _: load(key, log=lambda _msg: None) is not None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
