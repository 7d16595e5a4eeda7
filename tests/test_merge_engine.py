"""The merge engine's local placement: progress, the dry run's estimate, and reads per tensor."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest

from simmerge_ray.cli import main as cli_main
from simmerge_ray.sizes import human_bytes
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.synthetic import SyntheticSpec, make_family
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.estimate import estimate_merge
from simmerge_ray.merge.executor import ExecOptions, plan_merge, run_merge
from simmerge_ray.merge.placements import run_local
from simmerge_ray.merge.progress import Progress

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     dtype="bfloat16", max_shard_bytes=20_000)
TIES = {"merge_method": "ties", "base_model": "base", "dtype": "bfloat16",
        "models": [{"model": "m1", "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": "m2", "parameters": {"weight": 0.4, "density": 0.7}}]}
LINEAR = {"merge_method": "linear", "dtype": "bfloat16",
          "models": [{"model": "m1", "parameters": {"weight": 0.3}}, {"model": "m2", "parameters": {"weight": 0.7}}]}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_family(tmp_path_factory.mktemp("models"), SPEC)


def _config(root: Path, name: str, cfg: dict) -> Path:
    import yaml

    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "models": [{**m, "model": str(root / m["model"])} for m in cfg["models"]],
                                    **({"base_model": str(root / cfg["base_model"])} if "base_model" in cfg else {})}))
    return path


@pytest.mark.parametrize("cfg", [TIES, LINEAR], ids=["ties", "linear"])
def test_dry_run_predicts_the_bytes_and_writes_nothing(models: Path, tmp_path: Path, cfg: dict,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(models, cfg["merge_method"], cfg)
    out = tmp_path / "merged"
    assert cli_main(["merge", str(path), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists() and not any(tmp_path.iterdir())
    est = estimate_merge(MergeSpec.load(path), ExecOptions(workers=2))
    res = run_merge(MergeSpec.load(path), out, ExecOptions(workers=2))
    assert (est.bytes_read, est.bytes_written, est.tensors, est.shards) == \
        (res.bytes_read, res.bytes_written, res.tensors, res.shards)
    assert f"would read {human_bytes(res.bytes_read)} and write {human_bytes(res.bytes_written)}" in text
    assert est.peak_bytes_per_worker > 0 and est.seconds > 0
    # TIES in bf16 finds each threshold in one histogram pass over inputs kept in memory, and
    # linear streams once: every input byte is read exactly once
    inputs = 3 if cfg is TIES else 2
    assert res.bytes_read == inputs * Checkpoint.open(models / "m1").nbytes


def test_ties_streamed_beyond_the_budget_reads_twice_in_bf16(models: Path, tmp_path: Path) -> None:
    """Inputs over stream_bytes are not kept: bf16 TIES then reads every chunk twice (threshold,
    merge), never three times, and gives the bytes of the kept-in-memory run."""
    path = _config(models, "ties", TIES)
    kept = run_merge(MergeSpec.load(path), tmp_path / "kept", ExecOptions(workers=1))
    streamed = run_merge(MergeSpec.load(path), tmp_path / "streamed", ExecOptions(workers=2, stream_bytes=1, chunk_elems=300))
    assert streamed.bytes_read == 2 * kept.bytes_read
    for f in sorted((tmp_path / "kept").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "streamed" / f.name).read_bytes()


def test_progress_counts_every_element_and_tensor(models: Path, tmp_path: Path) -> None:
    spec = MergeSpec.load(_config(models, "ties", TIES))
    opts = ExecOptions(workers=2, unit_elems=500)
    plan = plan_merge(spec, opts)
    total = sum(plan.numels.values())
    stream = io.StringIO()
    progress = Progress(total, len(plan.numels), 3 * Checkpoint.open(models / "m1").nbytes, enabled=True, stream=stream)
    out = tmp_path / "partial"
    out.mkdir()
    from simmerge_ray.io.safetensors_format import preallocate

    partial = {p.file: out / p.file for p in plan.shards}
    for p in plan.shards:
        preallocate(partial[p.file], plan.layouts[p.file])
    stats = run_local(spec, plan.tasks, plan.units, partial, workers=2, threads_per_worker=1,
                      stream_bytes=opts.stream_bytes, chunk_elems=opts.chunk_elems, allow_nonfinite=False,
                      progress=progress)
    assert len(stats) == len(plan.units) > 2
    assert (progress.done, progress.tensors) == (total, len(plan.numels))
    final = progress.line()
    assert " 100% " in final and f"{len(plan.numels)}/{len(plan.numels)} tensors" in final and "ETA -" in final
    assert stream.getvalue().startswith("\r" + "merging [")


def test_progress_counts_under_its_lock_and_is_silent_when_disabled() -> None:
    """Merge workers advance one bar from many threads: every update holds the bar's lock (CPython
    rarely loses an unlocked `+=`, so a lost count alone would not show a missing lock)."""

    class WatchedLock:
        def __init__(self) -> None:
            self.lock, self.entered = threading.Lock(), 0

        def __enter__(self) -> None:
            self.lock.acquire()
            self.entered += 1

        def __exit__(self, *exc: object) -> None:
            self.lock.release()

    stream = io.StringIO()
    p = Progress(40_000, 8, 10**6, enabled=False, stream=stream)
    p._lock = watched = WatchedLock()
    threads = [threading.Thread(target=lambda: [p.advance(1, 0) for _ in range(10_000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p.advance(0, 8)
    p.close()
    assert (p.done, p.tensors) == (40_000, 8) and stream.getvalue() == ""
    assert watched.entered == 40_001
    assert "  0% " in Progress(10, 1, 100, enabled=False).line()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_fused_kernel_gives_the_torch_paths_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  dtype: str, method: str) -> None:
    """The C kernel (ties_kernel.c) and the torch chunk loop write the same bytes: three models,
    a negative weight, one model unsparsified, lambda, many ties at bf16 thresholds."""
    from simmerge_ray.merge.operators import ties_native

    root = make_family(tmp_path / "models", SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2,
                                                          num_heads=4, vocab_size=64, dtype=dtype), n=3)
    cfg = {"merge_method": method, "base_model": "base", "dtype": dtype, "parameters": {"lambda": 0.9},
           "models": [{"model": "m1", "parameters": {"weight": 0.6, "density": 0.4}},
                      {"model": "m2", "parameters": {"weight": -0.3, "density": 0.8}},
                      {"model": "m3", "parameters": {"weight": 0.5, "density": 1.0}}]}
    if method == "task_arithmetic":
        cfg["models"] = [{k: v for k, v in m.items()} | {"parameters": {"weight": m["parameters"]["weight"]}}
                         for m in cfg["models"]]
    path = _config(root, method, cfg)
    out = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("SIMMERGE_TIES_KERNEL", switch)
        ties_native.load.cache_clear()
        assert (ties_native.load() is None) == (switch == "0")
        out[switch] = run_merge(MergeSpec.load(path), tmp_path / f"out{switch}", ExecOptions(workers=2, chunk_elems=333))
    ties_native.load.cache_clear()
    files = sorted(p.name for p in (tmp_path / "out1").glob("*.safetensors"))
    assert files and all((tmp_path / "out1" / f).read_bytes() == (tmp_path / "out0" / f).read_bytes() for f in files)
