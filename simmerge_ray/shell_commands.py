"""A shell command line (a RayJob's entrypoint) as its shell runs it: the simple commands between
operators (&&, ;, |, newlines), each with the environment it runs in (`export`, `env` and
`VAR=value` prefixes), `bash -c "..."` read inside. Enough to find every `python jobs/<stage>.py`
of an entrypoint and the flags and variables it gets; not a shell."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from simmerge_ray.errors import ConfigError

_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)  # a shell `VAR=value`
_SHELL_OPERATOR = re.compile(r"^[();<>|&\n]+$")  # what shlex's punctuation_chars makes a token of its own


def shell_words(text: str) -> list[str]:
    """The words and operators (&&, ;, |, a newline, ...) of a shell command line, as the job's
    shell splits them; a `#` starts a comment only as a word's first character (`run#2` is a word)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|()<>\n")
    lexer.whitespace, lexer.whitespace_split, lexer.commenters = " \t\r", True, ""
    try:
        words = list(lexer)
    except ValueError as e:  # an unbalanced quote
        raise ConfigError(f"entrypoint {text!r}: {e}") from None
    out, comment = [], False
    for w in words:
        comment = (comment or w.startswith("#")) and w != "\n"  # up to the newline
        if not comment:
            out.append(w)
    return out


def shell_commands(text: str, env: dict[str, str]) -> list[tuple[list[str], dict[str, str]]]:
    """Each simple command of a shell line (split at &&, ;, |, newlines) with the environment it
    runs in: `env` (which an `export` updates for the commands after it) plus its own leading
    `VAR=value` words; `bash -c "..."`, `-lc`, `sh -c` are read inside."""
    commands: list[tuple[list[str], dict[str, str]]] = []
    current: list[str] = []
    for word in [*shell_words(text), ";"]:
        if not _SHELL_OPERATOR.match(word):
            current.append(word)
            continue
        if current[:1] == ["export"]:  # for the commands after it
            env.update(m.groups() for w in current[1:] if (m := _ASSIGNMENT.match(w)))
            current = []
            continue
        own = dict(env)
        if current[:1] in (["exec"], ["env"]):
            current.pop(0)
        while current and (m := _ASSIGNMENT.match(current[0])):
            own[m.group(1)] = m.group(2)
            current.pop(0)
        shell_c = len(current) >= 3 and re.fullmatch(r"-[a-z]*c[a-z]*", current[1]) is not None  # -c, -lc, -ec
        if shell_c and Path(current[0]).name in ("sh", "bash"):
            commands += shell_commands(current[2], own)
        elif current:
            commands.append((current, own))
        current = []
    return commands
