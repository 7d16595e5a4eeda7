"""The requests a bandit answers, as data: a batch of them is applied in order and saved once
(`BanditCore.run`), so the actor can hand over whatever arrived together."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

CallName = Literal["decide", "feedback", "add_arm", "stats", "describe"]
MUTATIONS = frozenset({"decide", "feedback", "add_arm"})


@dataclass(frozen=True)
class Call:
    """One request to the bandit: a method of BanditCore by name and its arguments."""

    name: CallName
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


Answer = dict[str, Any] | BaseException


def unwrap(answer: Answer) -> dict[str, Any]:
    """A call's answer, or its refusal raised."""
    if isinstance(answer, BaseException):
        raise answer
    return answer
