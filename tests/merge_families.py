"""Fixtures shared by the tests that merge a synthetic family (beside them; the tests folder is on
sys.path): one family of real checkpoints per test module, built once, and a copy of it per test,
which the test may corrupt or change without touching the next one's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from simmerge_ray.io.synthetic import SyntheticSpec, make_family


def family_fixtures(spec: SyntheticSpec, folder: str, n: int = 4):
    """The `family` (module-scoped: base and m1..mn of `spec`, made in a temporary `folder`) and
    `models` (a copy of it per test) fixtures; bind them to those names in the test module:
    `family, models = family_fixtures(SPEC, "multi-models")`."""

    @pytest.fixture(scope="module")
    def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return make_family(tmp_path_factory.mktemp(folder), spec, n=n)

    @pytest.fixture
    def models(family: Path, tmp_path: Path) -> Path:
        """A copy each test may corrupt or change."""
        return Path(shutil.copytree(family, tmp_path / "models"))

    return family, models
