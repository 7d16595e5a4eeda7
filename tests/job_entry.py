"""jobs/_entry.py loaded as a module, as a job script imports it (from the script's own folder):
the tests of the jobs, their manifests and their placement all read it this way."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_entry() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_entry", REPO / "jobs" / "_entry.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_entry"] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module
