"""Error types. Every message names the file, model, tensor or field at fault."""

from __future__ import annotations

from typing import Any


class SimMergeError(Exception):
    """Base class: a user-facing error, printed without a traceback by the CLI."""


class CheckpointError(SimMergeError):
    """A checkpoint folder or safetensors file is missing, corrupt or inconsistent."""


class ConfigError(SimMergeError):
    """A YAML/JSON config is invalid: unknown key, missing field, bad value."""


class MergeError(SimMergeError):
    """A merge cannot be carried out on these inputs (shapes, NaN/Inf, zero weights...)."""


class OutputError(SimMergeError):
    """An output cannot be written where asked (no space left, no permission...)."""


def ray_get(refs: Any) -> Any:
    """`ray.get`, with a SimMergeError raised inside a task or actor re-raised as itself: the
    user sees its one-line message (which names the file or tensor), not a Ray traceback."""
    import ray  # here, so that importing the error types stays cheap

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, SimMergeError):
            raise cause from None
        raise
