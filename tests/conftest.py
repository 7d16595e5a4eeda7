"""Shared fixtures: one real local Ray cluster per test session, on its own temp dir, and a
`ray start --head` for the files whose tests submit jobs."""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_processes import RayHead, startup_lock

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The files whose tests wait on processes of their own (a submitted job, the walkthrough's
# driver, the autoscaling and two-node clusters, DeepSpeed), longest first: with two workers
# (`-n 2 --dist loadfile --no-loadscope-reorder`, scripts/test.sh) the first two go to different
# workers, and the short files fill in around the rest.
LONG_FIRST = ("test_ray_job_submit.py", "test_walkthrough.py", "test_testbed.py", "test_autoscaling.py",
              "test_probes.py", "test_lost_node.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: file order kept otherwise


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the project's caches (file digests, probe outputs) inside the test session."""
    os.environ["SIMMERGE_CACHE"] = str(tmp_path_factory.mktemp("simmerge-cache"))


@pytest.fixture(autouse=True)
def _ray_only_through_the_session_cluster(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that runs a command which starts its own local Ray (init_ray, without the session
    cluster) leaves that Ray to every later test, and the session cluster then fails to start
    ("ray.init twice") in whichever test asks for it first: a failure that depends on the order
    the tests run in. The test that started it fails instead; it should ask for `ray_cluster`."""
    started_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    ray = sys.modules.get("ray")
    if (not started_before and ray is not None and ray.is_initialized()
            and "ray_cluster" not in request.fixturenames):
        pytest.fail("this test started a Ray of its own: ask for the `ray_cluster` fixture", pytrace=False)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray started by the tests (short temp dir: Ray's socket paths have a length limit)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    with startup_lock():
        ray.init(
            num_cpus=4,
            object_store_memory=300 * 1024 * 1024,
            include_dashboard=False,
            _temp_dir=temp_dir,
            log_to_driver=False,
            runtime_env={"env_vars": {"SIMMERGE_CACHE": os.environ["SIMMERGE_CACHE"]}},
        )
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A `ray start --head` with the jobs API, for the tests that `ray job submit` (the job tests
    and the walkthrough's cluster block): started once per file that needs it, stopped by its
    process group when that file is done, so that its idle processes (about 8% of a core) do not
    share the cores with the rest of the suite. The two files run on different workers anyway."""
    head = RayHead()
    try:
        yield head
    finally:
        head.stop()


@functools.cache
def _binds_init_ray() -> tuple[str, ...]:
    """The library modules that bind `init_ray` when imported (a top-level `from
    simmerge_ray.ray_session import ... init_ray`), read from their source."""
    root = Path(__file__).resolve().parents[1]
    top = re.compile(r"^from simmerge_ray\.ray_session import [^\n]*\binit_ray\b", re.M)
    return tuple(".".join(f.relative_to(root).with_suffix("").parts)
                 for f in sorted((root / "simmerge_ray").rglob("*.py")) if top.search(f.read_text()))


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that refuses its input before any work never starts Ray; one that starts it
    fails here. Every module that binds `init_ray` at import is imported first and patched where
    it holds it: one first imported under the patch would keep the stub for the rest of the session."""
    import importlib

    import simmerge_ray.ray_session as session

    for name in _binds_init_ray():
        importlib.import_module(name)
    real = session.init_ray

    def started(*_: object, **__: object) -> None:
        raise AssertionError("the command started Ray before refusing its input")

    for name, module in list(sys.modules.items()):
        if name.startswith("simmerge_ray") and getattr(module, "init_ray", None) is real:
            monkeypatch.setattr(module, "init_ray", started)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def crd_dir(repo_root: Path) -> Path:
    """The CRDs sit in shared/ beside the repo (CI) or inside it."""
    for candidate in (repo_root.parent / "shared" / "kuberay", repo_root / "shared" / "kuberay"):
        if (candidate / "ray.io_rayjobs.yaml").exists():
            return candidate
    pytest.fail(f"KubeRay CRDs not found in {repo_root.parent / 'shared'} or {repo_root / 'shared'}")
