"""Bandit errors. Each carries the HTTP status the service answers with, so that bad input is
reported as a 4xx with the message, whatever layer detects it."""

from __future__ import annotations

import re
from collections.abc import Iterable

from simmerge_ray.errors import SimMergeError

# An absolute path of two parts or more ("/srv/bandit/state.npz"; not "/decide", not "a/b").
_SERVER_PATH = re.compile(r"(?<![\w.~-])/[^\s/'\"():,;]+(?:/[^\s/'\"():,;]+)+")
SHOWN_NAMES = 20  # known names listed in an error; the rest counted


def client_text(message: str) -> str:
    """An error message as an HTTP client gets it: each server path (the state or feature file
    it names) cut to its last part, so that no client learns where the server keeps its files."""
    return _SERVER_PATH.sub(lambda m: m.group().rstrip("/").rsplit("/", 1)[-1], message)


def known_list(names: Iterable[str]) -> str:
    """Known names for an error message, sorted, the first SHOWN_NAMES of them and a count of the rest."""
    names = sorted(names)
    more = f", ... ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else ""
    return ", ".join(names[:SHOWN_NAMES]) + more


class BanditError(SimMergeError):
    """A request the bandit refuses; `http_status` is what the HTTP front returns."""

    http_status = 400


class FeatureError(BanditError):
    """Context features are unusable: wrong width, NaN/Inf, unknown model or task."""

    http_status = 422


class RewardError(BanditError):
    """A reward that is not a finite number."""

    http_status = 422


class NonFiniteUpdateError(RewardError):
    """Learning this reward would make a posterior (or what it is built from) NaN or Inf."""


class NonFiniteStateError(BanditError):
    """The bandit's state would be saved with a NaN or Inf: refused, the saved state kept."""

    http_status = 422


class UnknownDecisionError(BanditError):
    """Feedback names a decision id this bandit never made (or has long forgotten)."""

    http_status = 404


class UnknownNameError(BanditError):
    """A model, task or arm name that is not known."""

    http_status = 404


class DuplicateArmError(BanditError):
    """An arm of that name already exists."""

    http_status = 409
