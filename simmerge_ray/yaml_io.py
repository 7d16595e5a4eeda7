"""Reading the project's YAML files with errors that name the file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from simmerge_ray.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1), which reads an exponent without a dot (`1e-1`, `5E-3`) as a
    string; YAML 1.2, and mergekit through pydantic, read it as a number, and so does this."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


class _UniqueKeyLoader(_Loader):
    """The loader above, refusing a key given twice in one mapping: YAML keeps the last and drops
    the first without a word (a zoo config listing a domain twice lost its first variants). Keys
    merged in with `<<:` may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: construct_mapping itself says so
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice in one mapping (YAML would keep only the last)",
                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_text(path: str | Path, what: str) -> str:
    """The text of a user's file; missing, a folder, not UTF-8 or unreadable is one ConfigError
    naming it as `what`."""
    path = Path(path)
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a {what} file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a {what} (not UTF-8 text)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e.strerror or e})") from None


def read_yaml(path: str | Path, what: str, *, unique_keys: bool = False) -> Any:
    """Parsed YAML of `path`; a missing file or bad YAML (with `unique_keys`, a key given twice in
    one mapping) is a ConfigError naming it as `what`."""
    text = read_text(path, what)
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader if unique_keys else _Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML{yaml_error_summary(e)}") from None


def read_yaml_documents(path: str | Path, what: str) -> list[Any]:
    """Every document of a multi-document YAML file (`---` between them), in file order; an empty
    document is None. A missing file or bad YAML is a ConfigError naming it as `what`."""
    text = read_text(path, what)
    try:
        return list(yaml.load_all(text, Loader=_Loader))  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML{yaml_error_summary(e)}") from None


def yaml_error_summary(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one clause: where (line and column of the file) and what."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    context = getattr(e, "context", None)
    if mark is None or problem is None:
        return f" ({' '.join(str(e).split())})"
    what = f"{context}: {problem}" if context else problem
    return f" at line {mark.line + 1}, column {mark.column + 1}: {what}"


def check_name(value: str) -> str:
    """A name usable as a folder and a table key: non-empty, no slashes, no whitespace of any kind
    (what str.isspace() calls whitespace: a CR, a tab, a form feed, Unicode spaces) and no NUL (no
    path holds one), and not `.` or `..` (as a folder, `checkpoints/..` is the zoo root itself)."""
    if not value or any(c in "/\\\0" or c.isspace() for c in value) or value in (".", ".."):
        raise ValueError("must be non-empty with no slashes or whitespace, and not '.' or '..' (nor a NUL byte)")
    return value
