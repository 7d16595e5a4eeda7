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
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


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
    package = list(path.relative_to(ROOT).parts[:-1]) if path.is_relative_to(ROOT) else []  # what `from .` names
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


# The KubeRay manifest check, a command of its own (`python -m simmerge_ray.kuberay`) that no job
# runs, reads a job entrypoint's flags with the commands' own parsers (job_entrypoint.check_command_flags,
# which only kuberay.py imports): a copy of every command's flags would drift from them.
CLI_READERS = {LIBRARY / "job_entrypoint.py"}


def test_only_the_cli_imports_the_cli() -> None:
    outside = [p for p in _py(LIBRARY, JOBS) if CLI not in p.parents and p.name != "__main__.py"
               and p not in CLI_READERS]
    found = _imports_of("simmerge_ray.cli", outside)
    assert not found, _report("the library and the jobs must not depend on the command line's code "
                              "(a job runs `python -m simmerge_ray`)", found)


def test_the_library_and_jobs_do_not_import_benchmarks() -> None:
    found = _imports_of("benchmarks", _py(LIBRARY, JOBS))
    assert not found, _report("benchmarks live in benchmarks/, outside the library and the jobs", found)


REGISTERED = set(ARM_NAMES) | set(METHODS)
_QUOTED = re.compile("[\"'](?:" + "|".join(map(re.escape, sorted(REGISTERED))) + ")[\"']")


def _lists_of_registered_names(path: Path) -> list[str]:
    """Literal tuples, lists and sets of two or more arm or method names in `path`."""
    if len(_QUOTED.findall(_text(path))) < 2:
        return []  # too few quoted names to make a list of two
    found = []
    # A docstring is one string constant: a list written inside it is no literal here.
    for node in _nodes(path):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2:
            values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if len(values) == len(node.elts) and all(isinstance(v, str) and v in REGISTERED for v in values):
                found.append(f"{_rel(path)}:{node.lineno} {tuple(values)}")
    return found


def test_only_the_registry_lists_arms_or_methods() -> None:
    found = [f for path in _py(LIBRARY, JOBS, BENCHMARKS) if not any(path == r or r in path.parents for r in REGISTRY)
             for f in _lists_of_registered_names(path)]
    assert not found, _report("take lists of arms or methods from simmerge_ray/merge/arms.py "
                              "(name a selection there)", found)


def _sys_path_patches(path: Path) -> list[int]:
    """Lines that change sys.path, under whatever name: `import sys as s`, `from sys import path`."""
    nodes = _nodes(path)
    sys_names = {a.asname or a.name for n in nodes if isinstance(n, ast.Import) for a in n.names if a.name == "sys"}
    path_names = {a.asname or a.name for n in nodes if isinstance(n, ast.ImportFrom) and n.module == "sys"
                  for a in n.names if a.name == "path"}

    def is_sys_path(node: ast.AST) -> bool:
        return ((isinstance(node, ast.Attribute) and node.attr == "path"
                 and isinstance(node.value, ast.Name) and node.value.id in sys_names)
                or (isinstance(node, ast.Name) and node.id in path_names))

    def patches(node: ast.AST) -> bool:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            return node.func.attr in SYS_PATH_MUTATORS and is_sys_path(node.func.value)
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            return any(is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)) for t in targets)
        return False

    return [node.lineno for node in nodes if patches(node)]


def test_nothing_patches_sys_path() -> None:
    # Drivers that tests run as scripts import their neighbours through sys.path[0], which Python
    # sets; they are the only files left out.
    files = [p for p in _py(LIBRARY, JOBS, BENCHMARKS, ROOT / "cluster", ROOT / "tests")
             if not p.name.endswith("_driver.py") and "sys" in _text(p) and "path" in _text(p)]
    found = [f"{_rel(p)}:{line}" for p in files for line in _sys_path_patches(p)]
    assert not found, _report("install the package (pip install -e .) or set PYTHONPATH instead of "
                              "patching sys.path", found)


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def test_every_library_module_serves_the_library() -> None:
    """A module that only tests or benchmarks import (synthetic worlds, experiment statistics)
    belongs in benchmarks/; the library's roots are its command modules, `python -m simmerge_ray`,
    what jobs/ import and the modules scripts/ run (`python -m simmerge_ray.mkl_vendor`)."""
    from simmerge_ray.cli import COMMAND_MODULES
    from simmerge_ray.cli.features import FEATURE_MODULES  # `simmerge features <kind>`, loaded by name

    scripted = {m for p in (ROOT / "scripts").glob("*.sh") for m in re.findall(r"-m (simmerge_ray[\w.]*)", p.read_text())}
    roots = ({f"simmerge_ray.cli.{m}" for m in (*COMMAND_MODULES, *FEATURE_MODULES)} | scripted
             | {"simmerge_ray", "simmerge_ray.cli", "simmerge_ray.__main__"})  # __main__: what jobs run
    modules = {_module_name(p): p for p in _py(LIBRARY)}
    used = {name for p in _py(LIBRARY, JOBS) for _, name in _imported(p)}
    orphans = [f"{_rel(p)}: imported by no library module or job" for m, p in sorted(modules.items())
               if m not in roots and m not in used and not any(u.startswith(m + ".") for u in used)]
    assert not orphans, _report("move test and experiment helpers to benchmarks/", orphans)


def test_each_rule_sees_what_breaks_it(tmp_path: Path) -> None:
    """The rules' detectors on files that break them (a detector that finds nothing anywhere would
    pass every rule above), and on near misses that do not."""
    def file(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    patched = {"plain.py": "import sys\nsys.path.append('x')\n",
               "alias.py": "import os, sys as _s\n_s.path.insert(0, '/tmp')\n",
               "from_import.py": "from sys import path as _p\n_p.extend(['/tmp'])\n",
               "slice.py": "import sys\nsys.path[:0] = ['/tmp']\n",
               "assign.py": "import sys\nsys.path = ['/tmp']\n"}
    for name, text in patched.items():
        assert _sys_path_patches(file(name, text)) == [2], name
    assert _sys_path_patches(file("reads.py", "import sys\nprint(sys.path[0])\npath = []\npath.append(1)\n")) == []

    importers = [file("a.py", "from simmerge_ray import cli\n"), file("b.py", "import simmerge_ray.cli.merge as m\n"),
                 file("c.py", "import importlib\nimportlib.import_module('simmerge_ray.cli')\n"),
                 file("d.py", "from simmerge_ray.cli_tools import x  # another module\n")]
    assert [f.split(":")[0] for f in _imports_of("simmerge_ray.cli", importers)] == [
        str(importers[0]), str(importers[1]), str(importers[2])]

    listed = file("arms.py", 'OPS = ("linear", "ties")\nONE = ["linear"]\nDOC = "(\'linear\', \'ties\')"\n')
    assert _lists_of_registered_names(listed) == [f"{listed}:1 ('linear', 'ties')"]


def _hub_loads(path: Path) -> list[int]:
    """Lines calling `from_pretrained` without local_files_only=True: given a name that is not a
    local folder, transformers would look it up on the model hub."""
    return [node.lineno for node in _nodes(path)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained"
            and not any(k.arg == "local_files_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                        for k in node.keywords)]


def test_nothing_can_load_from_the_model_hub() -> None:
    files = [p for p in _py(LIBRARY, JOBS, BENCHMARKS) if "from_pretrained(" in _text(p)]
    assert files  # the rule holds of something
    found = [f"{_rel(p)}:{line}" for p in files for line in _hub_loads(p)]
    assert not found, _report("nothing is downloaded at run time: pass local_files_only=True", found)


def test_the_hub_rule_sees_a_hub_load(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("from transformers import AutoModel as M\nM.from_pretrained('gpt2')\n"
                                   "M.from_pretrained('x', local_files_only=True)\nM.from_pretrained('y', local_files_only=False)\n")
    assert _hub_loads(tmp_path / "a.py") == [2, 4]
