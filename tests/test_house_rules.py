"""The house's structural rules (issue 22), checked on the source text: no Ray, no module run.

Each rule names the files that break it, with line numbers, so a failure says what to move.
A rule parses only the files whose text could break it (an import of the CLI names "cli"):
the whole check stays well under two seconds.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from simmerge_ray.merge.arms import ARM_NAMES
from simmerge_ray.merge.operators import METHODS

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "simmerge_ray"
CLI = LIBRARY / "cli"
JOBS = ROOT / "jobs"
BENCHMARKS = ROOT / "benchmarks"
# The only places that may list arms or merge methods: the arm table and the method registry.
REGISTRY = (LIBRARY / "merge" / "arms.py", LIBRARY / "merge" / "operators")
MAX_MODULE_LINES = 400
# A job is a docstring with its `ray job submit` line, `from _entry import main` and one call
# (9 or 10 lines); whatever a job does beyond that belongs in jobs/_entry.py or in the library.
MAX_JOB_LINES = 20
SYS_PATH_MUTATORS = {"append", "extend", "insert", "remove", "pop", "clear"}


def _py(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in sorted(folder.rglob("*.py"))]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@cache
def _text(path: Path) -> str:
    return path.read_text()


@cache  # several rules walk the same file: parse and walk it once
def _nodes(path: Path) -> tuple[ast.AST, ...]:
    return tuple(ast.walk(ast.parse(_text(path), filename=str(path))))


def _report(rule: str, found: list[str]) -> str:
    """The rule and every place that breaks it (pytest would truncate a long list)."""
    return "\n".join([rule + ":", *found])


def _lines(path: Path) -> int:
    return len(_text(path).splitlines())


def test_no_library_module_is_over_the_line_bound() -> None:
    long = [f"{_rel(p)}: {n} lines" for p in _py(LIBRARY) if (n := _lines(p)) > MAX_MODULE_LINES]
    assert not long, _report(f"split these modules (at most {MAX_MODULE_LINES} lines each)", long)


def test_jobs_are_thin_entry_points() -> None:
    jobs = [p for p in _py(JOBS) if p.name != "_entry.py"]
    assert jobs  # the rule holds of something
    thick = [f"{_rel(p)}: {n} lines" for p in jobs if (n := _lines(p)) > MAX_JOB_LINES]
    assert not thick, _report(f"a job over {MAX_JOB_LINES} lines does work for jobs/_entry.py or the library", thick)


def _imported(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every module an import names, relative ones resolved; a name taken
    from a package (`from simmerge_ray import cli`) counts as a module too."""
    package = list(path.relative_to(ROOT).parts[:-1])  # what a relative import of level 1 names
    for node in _nodes(path):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, module
            yield from ((node.lineno, f"{module}.{a.name}") for a in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            yield node.lineno, str(node.args[0].value)


def _imports_of(module: str, files: list[Path]) -> list[str]:
    """Where `files` import `module` or a module inside it."""
    last = module.rsplit(".", 1)[-1]  # a file that never writes it cannot import the module
    return [f"{_rel(p)}:{line} imports {name}" for p in files if last in _text(p)
            for line, name in _imported(p) if name == module or name.startswith(module + ".")]


def test_only_the_cli_imports_the_cli() -> None:
    outside = [p for p in _py(LIBRARY, JOBS) if CLI not in p.parents and p.name != "__main__.py"]
    found = _imports_of("simmerge_ray.cli", outside)
    assert not found, _report("the library and the jobs must not depend on the command line's code "
                              "(a job runs `python -m simmerge_ray`)", found)


def test_the_library_and_jobs_do_not_import_benchmarks() -> None:
    found = _imports_of("benchmarks", _py(LIBRARY, JOBS))
    assert not found, _report("benchmarks live in benchmarks/, outside the library and the jobs", found)


def test_only_the_registry_lists_arms_or_methods() -> None:
    names = set(ARM_NAMES) | set(METHODS)
    quoted = re.compile("[\"'](?:" + "|".join(map(re.escape, sorted(names))) + ")[\"']")
    found = []
    for path in _py(LIBRARY, JOBS, BENCHMARKS):
        if any(path == r or r in path.parents for r in REGISTRY) or len(quoted.findall(_text(path))) < 2:
            continue  # the registry itself, or too few quoted names to make a list of two
        # A docstring is one string constant: a list written inside it is no literal here.
        for node in _nodes(path):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2:
                values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
                if len(values) == len(node.elts) and all(isinstance(v, str) and v in names for v in values):
                    found.append(f"{_rel(path)}:{node.lineno} {tuple(values)}")
    assert not found, _report("take lists of arms or methods from simmerge_ray/merge/arms.py "
                              "(name a selection there)", found)


def _is_sys_path(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys")


def _patches_sys_path(node: ast.AST) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in SYS_PATH_MUTATORS and _is_sys_path(node.func.value)
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(_is_sys_path(t) or (isinstance(t, ast.Subscript) and _is_sys_path(t.value)) for t in targets)
    return False


def test_nothing_patches_sys_path() -> None:
    # Drivers that tests run as scripts import their neighbours through sys.path[0], which Python
    # sets; they are the only files left out.
    files = [p for p in _py(LIBRARY, JOBS, BENCHMARKS, ROOT / "cluster", ROOT / "tests")
             if not p.name.endswith("_driver.py") and "sys.path" in _text(p)]
    found = [f"{_rel(p)}:{node.lineno}" for p in files for node in _nodes(p) if _patches_sys_path(node)]
    assert not found, _report("install the package (pip install -e .) or set PYTHONPATH instead of "
                              "patching sys.path", found)


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def test_every_library_module_serves_the_library() -> None:
    """A module that only tests or benchmarks import (synthetic worlds, experiment statistics)
    belongs in benchmarks/; the library's roots are its command modules, `python -m simmerge_ray`
    and what jobs/ import."""
    from simmerge_ray.cli import COMMAND_MODULES
    from simmerge_ray.cli.features import FEATURE_MODULES  # `simmerge features <kind>`, loaded by name

    roots = ({f"simmerge_ray.cli.{m}" for m in (*COMMAND_MODULES, *FEATURE_MODULES)}
             | {"simmerge_ray", "simmerge_ray.cli", "simmerge_ray.__main__"})  # __main__: what jobs run
    modules = {_module_name(p): p for p in _py(LIBRARY)}
    used = {name for p in _py(LIBRARY, JOBS) for _, name in _imported(p)}
    orphans = [f"{_rel(p)}: imported by no library module or job" for m, p in sorted(modules.items())
               if m not in roots and m not in used and not any(u.startswith(m + ".") for u in used)]
    assert not orphans, _report("move test and experiment helpers to benchmarks/", orphans)
