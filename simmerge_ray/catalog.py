"""The catalog file: which checkpoints exist, their optional base, and each task's data.

One YAML file is shared by every stage (features, probes, labels, planning), so it is validated
once here, at the edge, with errors that name the entry at fault. Paths are relative to the
file unless absolute.

    base: checkpoints/base          # optional
    models:
      - name: code-1
        path: checkpoints/code-1
        task: code                  # optional: the task this model is the expert of
    tasks:
      code: {probes: probes/code.jsonl, eval: eval/code.jsonl}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator

from simmerge_ray.errors import ConfigError
from simmerge_ray.yaml_io import check_name, read_yaml


def _path_text(value: Any) -> Any:
    """An empty path read as the catalog's own folder, and one holding a NUL byte crashed the
    first `exists()` with a traceback: both refused where they are written."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("an empty path")
    if isinstance(value, str) and "\0" in value:
        raise ValueError("a path may not hold a NUL byte")
    return value


CatalogPath = Annotated[Path, BeforeValidator(_path_text)]
# A task's name is a key of every feature and label table (the `task` column) and of the probe
# manifest: checked as a model's name is. An empty one (`task: ''`) was taken as a task.
TaskName = Annotated[str, AfterValidator(check_name)]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    path: CatalogPath
    task: TaskName | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return check_name(v)


class TaskEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    probes: CatalogPath | None = None
    eval: CatalogPath | None = None


class Catalog(BaseModel):
    """A validated catalog with absolute paths."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base: CatalogPath | None = None
    models: list[ModelEntry]
    tasks: dict[TaskName, TaskEntry] = {}
    source: Path | None = None  # the file it was read from, for messages

    @classmethod
    def load(cls, path: str | Path, *, check_paths: bool = True) -> "Catalog":
        path = Path(path)
        raw = read_yaml(path, "catalog", unique_keys=True)  # a second `models:` dropped the first
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a catalog is a mapping with a 'models' list")
        return cls.from_dict(raw, root=path.parent, source=path, check_paths=check_paths)

    @classmethod
    def from_dict(cls, raw: dict, *, root: Path, source: Path | None = None,
                  check_paths: bool = True) -> "Catalog":
        where = source or "catalog"
        if "source" in raw:  # the field of the file's own path, which the file's value replaced silently
            raise ConfigError(f"{where}: source: not a catalog key (known: base, models, tasks)")
        _check_task_keys(raw, where)
        try:
            cat = cls.model_validate({**raw, "source": source})
        except ValidationError as e:
            err = e.errors()[0]
            loc = _describe_loc(raw, err["loc"])
            raise ConfigError(f"{where}: {loc}: {err['msg']}") from None
        models = [m.model_copy(update={"path": _resolve(root, m.path)}) for m in cat.models]
        tasks = {
            t: TaskEntry(probes=_resolve(root, e.probes), eval=_resolve(root, e.eval))
            for t, e in cat.tasks.items()
        }
        cat = cat.model_copy(update={"models": models, "tasks": tasks, "base": _resolve(root, cat.base)})
        if not cat.models:  # `probe` ran on nothing and exited 0
            raise ConfigError(f"{where}: models: the list is empty; a catalog names at least one model")
        seen: set[str] = set()
        for i, m in enumerate(cat.models):
            if m.name in seen:
                raise ConfigError(f"{where}: models[{i}] (name {m.name!r}): duplicate model name")
            seen.add(m.name)
            if check_paths and not m.path.exists():
                raise ConfigError(f"{where}: models[{i}] (name {m.name!r}): path {m.path} does not exist")
            if cat.tasks and m.task is not None and m.task not in cat.tasks:  # a typo would make it task-less
                raise ConfigError(f"{where}: models[{i}] (name {m.name!r}): task {m.task!r} is not one of tasks "
                                  f"({', '.join(cat.tasks)})")
        if check_paths and cat.base is not None and not cat.base.exists():
            raise ConfigError(f"{where}: base: path {cat.base} does not exist")
        _check_base_not_a_model(cat, where)
        return cat

    # ---- lookups -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def model_tasks(self) -> dict[str, str | None]:
        """Each model's task (None for a model that is no task's expert), by name."""
        return {m.name: m.task for m in self.models}

    @property
    def paths(self) -> list[Path]:
        """Every checkpoint and data file it names, and its own file: what no output may replace."""
        tasks = [p for t in self.tasks.values() for p in (t.probes, t.eval) if p is not None]
        return [m.path for m in self.models] + [p for p in (self.base, self.source) if p is not None] + tasks

    def model(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"{self.source or 'catalog'}: no model named {name!r}; known: {', '.join(self.names)}")

    def experts(self, task: str) -> list[ModelEntry]:
        return [m for m in self.models if m.task == task]

    def task(self, name: str) -> TaskEntry:
        try:
            return self.tasks[name]
        except KeyError:
            raise ConfigError(
                f"{self.source or 'catalog'}: no task named {name!r}; known: {', '.join(self.tasks)}"
            ) from None

    def to_yaml(self, relative_to: Path | None = None) -> str:
        """Serialise, with paths relative to `relative_to` where possible (portable catalogs)."""

        def rel(p: Path | None) -> str | None:
            if p is None:
                return None
            if relative_to is not None:
                try:
                    return str(Path(p).resolve().relative_to(Path(relative_to).resolve()))
                except ValueError:
                    pass
            return str(p)

        out: dict = {}
        if self.base is not None:
            out["base"] = rel(self.base)
        out["models"] = [
            {"name": m.name, "path": rel(m.path), **({"task": m.task} if m.task else {})} for m in self.models
        ]
        if self.tasks:
            out["tasks"] = {
                t: {k: rel(v) for k, v in (("probes", e.probes), ("eval", e.eval)) if v is not None}
                for t, e in self.tasks.items()
            }
        return yaml.safe_dump(out, sort_keys=False)


def _resolve(root: Path, p: Path | None) -> Path | None:
    """`p` with `~` expanded, relative to `root` unless absolute. The os.path forms leave an
    unknown `~user` as it is and a symlink loop unresolved (to fail as a missing path), where
    Path.expanduser and Path.resolve raised a RuntimeError (a traceback)."""
    if p is None:
        return None
    p = Path(os.path.expanduser(p))
    return p if p.is_absolute() else Path(os.path.realpath(root / p))


def _check_base_not_a_model(cat: Catalog, where: str | Path) -> None:
    """A model whose folder is the base's has a zero task vector: its task-vector features came out
    null and labels merged nothing in, without a word. (One folder under two model names stays
    allowed: the project's own tests alias checkpoints so.)"""
    if cat.base is None:
        return
    base = os.path.realpath(cat.base)  # unlike Path.resolve, never raises (a symlink loop)
    for i, m in enumerate(cat.models):
        if os.path.realpath(m.path) == base:
            raise ConfigError(f"{where}: models[{i}] (name {m.name!r}): path {m.path} is the base's; the base is "
                              f"listed once, under 'base'")


def _check_task_keys(raw: dict, where: str | Path) -> None:
    """A task named by YAML's other scalars (`yes:`, `null:`, `1:`) reached pydantic as true, None
    or a number, which it shows as `tasks.1` whatever the file said: named here as YAML read it."""
    tasks = raw.get("tasks")
    if not isinstance(tasks, dict):
        return
    for key in tasks:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: tasks.{key!r} (the name): a task name must be text, and YAML read this one "
                              f"as {type(key).__name__} (yes/no/on/off, null and numbers are not text: quote it)")


def _describe_loc(raw: dict, loc: tuple) -> str:
    """'models[2] (name 'x').path' style location for a pydantic error."""
    parts: list[str] = []
    node: object = raw
    for pos, key in enumerate(loc):
        if pos + 1 < len(loc) and loc[pos + 1] == "[key]" and isinstance(key, str):  # '' or 'a b' quoted
            parts.append(("." if parts else "") + repr(key))
        elif key == "[key]":  # a mapping's key (a task named by a number) is at fault, not its value
            parts.append(" (the name)")
        elif isinstance(key, int) and not isinstance(node, dict):
            label = f"[{key}]"
            if isinstance(node, list) and key < len(node) and isinstance(node[key], dict) and "name" in node[key]:
                label += f" (name {node[key]['name']!r})"
            parts.append(label)
            node = node[key] if isinstance(node, list) and key < len(node) else None
        else:
            parts.append(("." if parts else "") + str(key))
            node = node.get(key) if isinstance(node, dict) else None
    return "".join(parts) or "catalog"
