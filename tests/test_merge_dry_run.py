"""`simmerge merge --dry-run` of several merges: a multi-document config and `--plan`. Each merge
is estimated in run order, one reading an earlier merge's output planned on that output's layout
before it exists: its numbers must be those of the document run alone on the written
intermediate. Real tiny checkpoints; nothing may be written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from simmerge_ray.catalog import Catalog
from simmerge_ray.cli import main as cli_main
from simmerge_ray.cli.merge import _seconds
from simmerge_ray.io.synthetic import SyntheticSpec
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.estimate import estimate_merge, estimate_stages
from simmerge_ray.merge.executor import ExecOptions, run_merge
from simmerge_ray.merge.multi import load_multi
from simmerge_ray.planner.execute import estimate_plan
from simmerge_ray.planner.plan import Plan
from simmerge_ray.sizes import human_bytes
from input_checks import tree_hash  # beside this file
from merge_families import family_fixtures  # beside this file

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000, dtype="float32")
F32 = {"dtype": "float32", "out_dtype": "float32"}
OPTS = ExecOptions(workers=1)


family, models = family_fixtures(SPEC, "dry-run-models")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _ties(m: Path, name: str | None = None) -> dict:
    doc = {"merge_method": "ties", "base_model": str(m / "base"),
           "models": [{"model": str(m / "m1"), "parameters": {"weight": 0.6, "density": 0.5}},
                      {"model": str(m / "m2"), "parameters": {"weight": 0.5, "density": 0.7}}], **F32}
    return {"name": name, **doc} if name else doc


def _slerp(a: str, b: str, name: str | None = None) -> dict:
    doc = {"merge_method": "slerp", "base_model": a, "parameters": {"t": 0.4},
           "models": [{"model": a}, {"model": b}], **F32}
    return {"name": name, **doc} if name else doc


def _write(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def test_each_merge_of_a_multi_document_config_is_estimated_as_run_alone(family: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """TIES named `tied`, then SLERP of `tied` with m3: the dry run's numbers per merge equal the
    single-config estimates of each document, the second on the intermediate written for real;
    the totals are their sums; nothing is written, the inputs are unchanged."""
    work = tmp_path / "work"
    work.mkdir()
    docs = [_ties(family, "tied"), _slerp("tied", str(family / "m3"))]
    cfg = _write(work / "multi.yaml", docs)
    before, listing = tree_hash(family), _files(work)
    assert cli_main(["merge", str(cfg), "--out", str(work / "merged"), "--dry-run", "--workers", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert tree_hash(family) == before and _files(work) == listing  # no output, no work folder

    est = estimate_stages(load_multi(cfg).graph, OPTS)
    assert [s.name for s in est.stages] == ["tied", "the final"] and [s.final for s in est.stages] == [False, True]

    by_hand = tmp_path / "by-hand"
    by_hand.mkdir()
    first = MergeSpec.from_dict({k: v for k, v in docs[0].items() if k != "name"}, source="first")
    alone1 = estimate_merge(first, OPTS)
    result = run_merge(first, by_hand / "tied", OPTS)
    second = MergeSpec.from_dict(yaml.safe_load(yaml.safe_dump(_slerp(str(by_hand / "tied"), str(family / "m3")))),
                                 source="second")
    alone2 = estimate_merge(second, OPTS)
    assert est.stages[0].estimate == alone1
    got = est.stages[1].estimate
    assert (got.bytes_read, got.bytes_written, got.peak_bytes_per_worker, got.tensors, got.shards) == (
        alone2.bytes_read, alone2.bytes_written, alone2.peak_bytes_per_worker, alone2.tensors, alone2.shards)
    assert got == alone2
    assert est.stages[0].estimate.bytes_written == result.bytes_written  # the intermediate's layout is the real one

    assert est.bytes_read == alone1.bytes_read + alone2.bytes_read
    assert est.bytes_written == alone1.bytes_written + alone2.bytes_written
    assert est.seconds == pytest.approx(alone1.seconds + alone2.seconds)
    assert est.intermediate_peak == alone1.bytes_written

    assert printed[0] == f"dry run: 2 merges of {cfg} on 1 thread: tied (ties) -> the final (slerp); nothing was merged or written"
    assert printed[1].startswith(f"  tied: read {human_bytes(alone1.bytes_read)}, write "
                                 f"{human_bytes(alone1.bytes_written)} (intermediate), peak "
                                 f"{human_bytes(alone1.peak_bytes_per_worker)} per worker, {_seconds(alone1.seconds)}")
    assert printed[2].startswith(f"  the final: read {human_bytes(alone2.bytes_read)}, write "
                                 f"{human_bytes(alone2.bytes_written)}, peak ")
    assert printed[3].startswith(f"total: read {human_bytes(est.bytes_read)}, write {human_bytes(est.bytes_written)}; "
                                 f"intermediates need at most {human_bytes(alone1.bytes_written)} beside the output "
                                 f"at once; {_seconds(est.seconds)}")


def test_the_intermediates_peak_of_a_chain_and_of_a_diamond(family: Path, tmp_path: Path) -> None:
    """A chain a -> b -> c -> final holds two intermediates at once (the one read and the one
    written); a diamond whose final reads a, b and c holds all three."""
    m = family
    chain = _write(tmp_path / "chain.yaml", [_ties(m, "a"), _slerp("a", str(m / "m3"), "b"),
                                            _slerp("b", str(m / "m4"), "c"), _slerp("c", str(m / "m1"))])
    linear = [{"name": n, "merge_method": "linear", "models": [{"model": str(m / x), "parameters": {"weight": 0.5}},
                                                                {"model": str(m / y), "parameters": {"weight": 0.5}}],
               **F32} for n, x, y in (("a", "m1", "m2"), ("b", "m2", "m3"), ("c", "m3", "m4"))]
    final = {"merge_method": "linear", "models": [{"model": n, "parameters": {"weight": 1.0}} for n in "abc"], **F32}
    diamond = _write(tmp_path / "diamond.yaml", [*linear, final])
    for path, alive in ((chain, 2), (diamond, 3)):
        est = estimate_stages(load_multi(path).graph, OPTS)
        sizes = {s.name: s.estimate.bytes_written for s in est.stages}
        assert len(set(sizes.values())) == 1 and len(est.stages) == 4  # every output the same size
        assert est.intermediate_peak == alive * sizes["a"], path.name


def _plan_files(m: Path, tmp_path: Path, operators: list[str]) -> tuple[Path, Path]:
    models = [f"m{i}" for i in range(1, len(operators) + 2)]
    plan = tmp_path / "plan.json"
    plan.write_text(Plan(task="code", models=models, operators=operators).to_json())
    cat = tmp_path / "catalog.yaml"
    cat.write_text(yaml.safe_dump({"base": str(m / "base"),
                                   "models": [{"name": x, "path": str(m / x)} for x in models]}))
    return plan, cat


def test_a_plan_dry_run_prints_each_step(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 3-step plan (ties, slerp, slerp): one line per step, its intermediates' peak two steps'
    outputs; step 1 estimated as its config alone; nothing written."""
    plan, cat = _plan_files(models, tmp_path, ["ties", "slerp", "slerp"])
    before, listing = tree_hash(models), _files(tmp_path)
    out = tmp_path / "merged"
    assert cli_main(["merge", "--plan", str(plan), "--catalog", str(cat), "--out", str(out), "--dry-run",
                     "--workers", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert tree_hash(models) == before and _files(tmp_path) == listing
    est = estimate_plan(Plan.load(plan), Catalog.load(cat), out, OPTS, plan_file=plan)
    assert [s.name for s in est.stages] == ["step-1", "step-2", "step-3"]
    assert printed[0] == (f"dry run: 3 merges of {plan} on 1 thread: step-1 (ties) -> step-2 (slerp) -> step-3 (slerp); "
                          "nothing was merged or written")
    for line, s in zip(printed[1:4], est.stages):
        assert line.startswith(f"  {s.name}: read {human_bytes(s.estimate.bytes_read)}, write "
                               f"{human_bytes(s.estimate.bytes_written)}{'' if s.final else ' (intermediate)'}, ")
    one, two = (s.estimate.bytes_written for s in est.stages[:2])
    assert est.intermediate_peak == one + two
    assert printed[4].startswith(f"total: read {human_bytes(est.bytes_read)}, write {human_bytes(est.bytes_written)}; "
                                 f"intermediates need at most {human_bytes(one + two)} beside the output at once")
    step1 = Plan.load(plan).step_configs({x: models / x for x in ("m1", "m2", "m3", "m4")}, models / "base")[0]
    assert est.stages[0].estimate == estimate_merge(MergeSpec.from_dict(step1, source="step 1"), OPTS)


def test_a_linear_plan_dry_run_is_its_one_folded_merge(family: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Every step linear: the plan runs as one merge, and that one is estimated."""
    plan, cat = _plan_files(family, tmp_path, ["linear", "linear"])
    out = tmp_path / "merged"
    assert cli_main(["merge", "--plan", str(plan), "--catalog", str(cat), "--out", str(out), "--dry-run",
                     "--workers", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert not out.exists()
    assert printed[0] == f"dry run: 1 merge of {plan} on 1 thread: the folded plan (linear); nothing was merged or written"
    assert len(printed) == 3 and "intermediates need at most 0 B" in printed[2], printed
