"""Error types. Every message names the file, model, tensor or field at fault."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def first_line(error: BaseException, fallback: str | None = None, limit: int = 300) -> str:
    """The first line of an error's message, cut at `limit` characters, for a one-line message
    (`fallback`, by default the error's type name, when the message is empty). A first line that
    only introduces the next ("Validation error for field 'vocab_size':") is joined to it."""
    text = str(error).strip()
    if not text:
        return type(error).__name__ if fallback is None else fallback
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return line if len(line) <= limit else line[:limit] + "..."


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


def remote_cause(error: BaseException) -> SimMergeError | None:
    """The SimMergeError a Ray task, actor or Ray Data operator raised, found through the
    wrappers Ray puts around it (RayTaskError's `cause`, Ray Data's UserCodeException's
    `__cause__`), else None."""
    import ray  # here, so that importing the error types stays cheap

    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, SimMergeError) and not isinstance(e, ray.exceptions.RayTaskError):
            return e  # the original, whose message is one line (a RayTaskError's holds the traceback)
        e = getattr(e, "cause", None) or e.__cause__
    return _from_traceback(error)


def _from_traceback(error: BaseException) -> SimMergeError | None:
    """Ray Data wraps an operator's exception in a UserCodeException whose chain does not cross
    the process boundary; the remote traceback's text still ends the original's line
    ("simmerge_ray.errors.CheckpointError: <message>"): that error, rebuilt, else None."""
    text = str(error)
    for line in reversed(text.splitlines()):
        name, sep, message = line.strip().partition(": ")
        kind = _ERRORS.get(name.removeprefix(f"{__name__}.")) if name.startswith(f"{__name__}.") else None
        if sep and kind is not None:
            return kind(message)
    return None


def surfacing_remote_errors(items: Iterable[T]) -> Iterator[T]:
    """`items` (a Ray Data iterator), with a SimMergeError raised in an operator re-raised as
    itself; errors of the loop that consumes them are not touched."""
    try:
        yield from items
    except Exception as e:
        _raise_remote_cause(e)
        raise


def _raise_remote_cause(error: BaseException) -> None:
    """Raise the SimMergeError behind a Ray error (remote_cause) as itself, if there is one."""
    cause = remote_cause(error)
    if cause is not None:
        raise cause from None


def ray_get(refs: Any) -> Any:
    """`ray.get`, with a SimMergeError raised inside a task or actor re-raised as itself: the
    user sees its one-line message (which names the file or tensor), not a Ray traceback."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        _raise_remote_cause(e)
        raise


_ERRORS: dict[str, type[SimMergeError]] = {c.__name__: c for c in (SimMergeError, CheckpointError, ConfigError,
                                                                   MergeError, OutputError)}
