"""Multi-document mergekit configs (mergekit-multi's format) through `simmerge merge`: the result
equals mergekit-multi's (the oracle) and the documents run one by one by hand; a bad file is one
line naming the document, before anything is written; an interrupted run resumes; the
plan.mergekit.yaml a plan writes runs to the weights `merge --plan` makes. Real checkpoints, real
merges; the interruption is a checkpoint's corrupt bytes, not a mock."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from simmerge_ray.catalog import Catalog
from simmerge_ray.cli import main as cli_main
from simmerge_ray.io.synthetic import SyntheticSpec
from simmerge_ray.planner.plan import Plan
from simmerge_ray.planner.request import write_plans
from merge_families import family_fixtures  # beside this file
from input_checks import one_line_error, tree_hash  # beside this file
from mergekit_oracle import load_all, run_mergekit_multi
from test_plan_resume import _corrupt  # the corruption trick: header intact, data NaN

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000, dtype="float32")
F32 = {"dtype": "float32", "out_dtype": "float32"}


family, models = family_fixtures(SPEC, "multi-models")


def _two_stage(m: Path) -> list[dict]:
    """TIES of m1 and m2 on the base, named `tied`; then SLERP of `tied` with m3 (unnamed: the final)."""
    return [{"name": "tied", "merge_method": "ties", "base_model": str(m / "base"),
             "models": [{"model": str(m / "m1"), "parameters": {"weight": 0.6, "density": 0.5}},
                        {"model": str(m / "m2"), "parameters": {"weight": 0.5, "density": 0.7}}], **F32},
            {"merge_method": "slerp", "base_model": "tied", "parameters": {"t": 0.4},
             "models": [{"model": "tied"}, {"model": str(m / "m3")}], **F32}]


def _write(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def _merge(*args: str | Path) -> int:
    return cli_main(["merge", *map(str, args), "--workers", "1", "--quiet"])


def _weights(out: Path) -> dict[str, bytes]:
    """The files that hold the merge's numbers: every shard, the index and config.json (the model
    card and recorded config say how the output was made, which differs by design)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.suffix == ".safetensors" or p.name in ("model.safetensors.index.json", "config.json")}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".plan-" in p.name or ".tmp-" in p.name)


def test_a_two_stage_config_matches_mergekit_multi(models: Path, tmp_path: Path) -> None:
    """TIES then SLERP of its result: mergekit-multi on the same file is the oracle, to the
    tolerance of the single-config oracle tests (float32 math on both sides)."""
    cfg = _write(tmp_path / "multi.yaml", _two_stage(models))
    assert _merge(cfg, "--out", tmp_path / "ours") == 0
    run_mergekit_multi(cfg, tmp_path / "theirs", tmp_path / "mk-intermediates")
    a, b = load_all(tmp_path / "ours"), load_all(tmp_path / "theirs")
    assert set(a) == set(b) and a
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32
        torch.testing.assert_close(a[name], b[name], rtol=2e-6, atol=2e-6, msg=name)
    m3 = load_all(models / "m3")
    assert any(not torch.equal(a[n], m3[n]) for n in a)  # merged, not a copy
    assert _leftovers(tmp_path) == []  # the intermediate went with the work folder


def test_a_multi_document_config_equals_its_documents_run_one_by_one(models: Path, tmp_path: Path) -> None:
    """A graph, not a chain, with the final first in the file: `a` (TIES) and `b` (linear) each
    read checkpoints, the unnamed final SLERPs them. Run by hand, document by document, with each
    name replaced by the folder the earlier run wrote: the same weights, byte for byte."""
    m = models
    a = {"name": "a", "merge_method": "ties", "base_model": str(m / "base"),
         "models": [{"model": str(m / "m1"), "parameters": {"weight": 0.7, "density": 0.6}},
                    {"model": str(m / "m2"), "parameters": {"weight": 0.4, "density": 0.8}}]}
    b = {"name": "b", "merge_method": "linear",
         "models": [{"model": str(m / "m3"), "parameters": {"weight": 0.3}},
                    {"model": str(m / "m4"), "parameters": {"weight": 0.7}}]}
    final = {"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.3},
             "models": [{"model": "a"}, {"model": "b"}]}
    before = tree_hash(m)
    cfg = _write(tmp_path / "multi.yaml", [final, a, b])
    assert _merge(cfg, "--out", tmp_path / "multi") == 0
    by_hand = tmp_path / "by-hand"
    by_hand.mkdir()
    for doc in (a, b):
        body = {k: v for k, v in doc.items() if k != "name"}
        assert _merge(_write(by_hand / f"{doc['name']}.yaml", [body]), "--out", by_hand / doc["name"]) == 0
    last = yaml.safe_load(yaml.safe_dump(final).replace(": a\n", f": {by_hand / 'a'}\n")
                          .replace(": b\n", f": {by_hand / 'b'}\n"))
    assert _merge(_write(by_hand / "final.yaml", [last]), "--out", by_hand / "final") == 0
    got, want = _weights(tmp_path / "multi"), _weights(by_hand / "final")
    assert any(k.endswith(".safetensors") for k in got) and got == want
    assert tree_hash(m) == before and _leftovers(tmp_path) == []


def _bad(m: Path, case: str) -> list[dict]:
    docs = _two_stage(m)
    if case == "unknown reference":
        docs[1]["models"][0]["model"] = "tide"
    elif case == "duplicate name":
        docs.insert(1, {**docs[0]})
    elif case == "cycle":
        docs[0]["models"][1]["model"] = "final"
        docs[1]["name"] = "final"
    elif case == "two unnamed":
        docs.append({k: v for k, v in docs[1].items()})
    elif case == "bad field in document 2":
        docs[1]["parameters"] = {"t": 1.5}
    elif case == "no final":
        docs.append({**docs[0], "name": "spare"})
        docs[1]["name"] = "final"
    elif case in ("named base", "named union"):  # tokenizer_source: base would read the keyword
        name = case.split()[1]
        docs[0]["name"] = name
        docs[1] = {**docs[1], "base_model": name, "tokenizer_source": name,
                   "models": [{"model": name}, {"model": str(m / "m3")}]}
    elif case in ("NUL in a name", "CR in a name"):
        docs[0]["name"] = "ti\0ed" if case.startswith("NUL") else "ti\red"
        docs[1]["models"][0]["model"] = docs[1]["base_model"] = docs[0]["name"]
    return docs


@pytest.mark.parametrize("case, needles", [
    ("unknown reference", ["document 2 (unnamed): models[0].model: 'tide' is neither a local checkpoint folder "
                           "nor the name of a merge in the file (names: tied)"]),
    ("duplicate name", ["document 2: name: 'tied' is already document 1's name"]),
    ("cycle", ["document 1 ('tied'): the merges read each other in a cycle: tied -> final -> tied"]),
    ("two unnamed", ["document 3: a second unnamed merge (document 2 is unnamed too)"]),
    ("bad field in document 2", ["document 2 (unnamed): parameters.t:"]),
    ("no final", ["no unnamed final merge, and 2 merges are read by no other ('final', 'spare')"]),
    ("named base", ["document 1: name: 'base' is a tokenizer keyword (mergekit reads `tokenizer_source: base`"]),
    ("named union", ["document 1: name: 'union' is a tokenizer keyword"]),
    ("NUL in a name", ["document 1: name: 'ti\\x00ed' must be non-empty with no slashes or whitespace"]),
    ("CR in a name", ["document 1: name: 'ti\\red' must be non-empty with no slashes or whitespace"]),
])
def test_a_bad_file_is_one_line_naming_the_document_and_nothing_is_written(
        family: Path, tmp_path: Path, capsys, case: str, needles: list[str]) -> None:
    cfg = _write(tmp_path / "multi.yaml", _bad(family, case))
    before, config = tree_hash(family), cfg.read_bytes()
    out = tmp_path / "out" / "merged"
    assert _merge(cfg, "--out", out) == 2
    one_line_error(capsys, "simmerge merge: error: ", str(cfg), *needles)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert tree_hash(family) == before and cfg.read_bytes() == config


def _interrupted(docs: list[dict], model: Path, tmp_path: Path, capsys, caplog) -> tuple[Path, Path, Path, bytes, Path]:
    """`docs` run with `model` (which only the final reads) corrupt: it fails in the final, after
    the first merge; returns the config, --out, the model's shard and its good bytes, and the work
    folder the run kept."""
    caplog.set_level(logging.WARNING)
    cfg = _write(tmp_path / "multi.yaml", docs)
    out = tmp_path / "merged"
    shard, raw = _corrupt(model)
    assert _merge(cfg, "--out", out) == 2
    one_line_error(capsys, "simmerge merge: error: ")
    assert not out.exists()
    [work] = [tmp_path / n for n in _leftovers(tmp_path)]
    return cfg, out, shard, raw, work


def test_an_interrupted_multi_document_run_resumes(models: Path, tmp_path: Path, capsys, caplog) -> None:
    """The final reads m3, whose data is corrupt (header intact: every up-front check passes):
    the run fails after `tied`, which is kept; mended, the same command merges only the final and
    writes what an uninterrupted run writes."""
    cfg, out, shard, raw, work = _interrupted(_two_stage(models), models / "m3", tmp_path, capsys, caplog)
    assert {"tied", "tied.key.json"} <= {p.name for p in work.iterdir()}
    assert f"kept merge 'tied' of the 2 of {cfg} in {work}" in caplog.text
    shard.write_bytes(raw)
    caplog.clear()
    assert _merge(cfg, "--out", out) == 0
    assert "1 merge(s), resuming" in capsys.readouterr().out
    assert "resuming" in caplog.text and str(work) in caplog.text
    assert _leftovers(tmp_path) == []
    assert _merge(cfg, "--out", tmp_path / "fresh") == 0
    assert _weights(out) == _weights(tmp_path / "fresh")


def test_a_key_that_cannot_be_computed_leaves_the_kept_merges(models: Path, tmp_path: Path, capsys, caplog
                                                                ) -> None:
    """`tied` is kept (m3, which the final reads, is corrupt). The next run cannot key `tied`: m1,
    which it reads, now has a tokenizer.model that is a symlink to itself, so stat-ing it fails
    ("too many levels of symbolic links"; the merge itself would skip it as absent). That run
    fails with one line naming the file, before anything moved: the kept `tied` stays where it
    was, untouched (it used to be moved into the new work folder first, and removed with it).
    The link gone, the same command resumes from it."""
    cfg, out, shard, raw, work = _interrupted(_two_stage(models), models / "m3", tmp_path, capsys, caplog)
    kept, inode = tree_hash(work), (work / "tied").stat().st_ino
    shard.write_bytes(raw)
    loop = models / "m1" / "tokenizer.model"
    loop.symlink_to(loop.name)
    assert _merge(cfg, "--out", out) == 2
    one_line_error(capsys, "simmerge merge: error: ", f"{loop}: cannot stat it to key the merges that read it")
    assert not out.exists() and [tmp_path / n for n in _leftovers(tmp_path)] == [work]
    assert tree_hash(work) == kept and (work / "tied").stat().st_ino == inode
    loop.unlink()
    caplog.clear()
    assert _merge(cfg, "--out", out) == 0
    assert "1 merge(s), resuming" in capsys.readouterr().out
    assert str(work) in caplog.text and _leftovers(tmp_path) == []
    assert _merge(cfg, "--out", tmp_path / "fresh") == 0
    assert _weights(out) == _weights(tmp_path / "fresh")


def test_a_new_engine_format_restarts_from_the_models(models: Path, tmp_path: Path, monkeypatch) -> None:
    """A kept merge made by an engine of another format (a method's numbers or the output's
    files changed since) is not reused: both merges run again."""
    from simmerge_ray.merge import resume

    cfg = _write(tmp_path / "multi.yaml", _two_stage(models))
    shard, raw = _corrupt(models / "m3")
    assert _merge(cfg, "--out", tmp_path / "merged") == 2
    shard.write_bytes(raw)
    monkeypatch.setattr(resume, "ENGINE_FORMAT", resume.ENGINE_FORMAT + 1)
    assert _merge(cfg, "--out", tmp_path / "merged") == 0
    assert _leftovers(tmp_path) == []  # the old work folder was removed, not resumed from
    assert _merge(cfg, "--out", tmp_path / "fresh") == 0
    assert _weights(tmp_path / "merged") == _weights(tmp_path / "fresh")


def test_a_fresh_run_reads_no_checkpoint_in_full_to_key_its_merges(models: Path, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    """Keying the intermediates reads no weights (their files' identity is stat-ed): no content
    fingerprint or file digest is taken (a 111B pair would be 222 GB read before merging)."""
    from simmerge_ray.io import checkpoint, digest_cache

    def refuse(*_: object) -> str:
        raise AssertionError("a checkpoint was read in full to key a merge")

    monkeypatch.setattr(checkpoint.Checkpoint, "fingerprint", refuse)
    monkeypatch.setattr(checkpoint, "file_digest", refuse)
    monkeypatch.setattr(digest_cache, "file_digest", refuse)
    cfg = _write(tmp_path / "multi.yaml", _two_stage(models))
    assert _merge(cfg, "--out", tmp_path / "merged") == 0
    assert "2 merge(s) in" in capsys.readouterr().out


def test_a_model_folder_named_like_the_final_is_a_checkpoint(family: Path, tmp_path: Path) -> None:
    """`the final` names the unnamed final merge inside the engine; a model folder of that name
    (relative to the config) is a checkpoint to key, not a merge reference (it recursed)."""
    shutil.copytree(family / "m1", tmp_path / "the final")
    docs = _two_stage(family)
    docs[0]["models"][0]["model"] = "the final"
    cfg = _write(tmp_path / "multi.yaml", docs)
    assert _merge(cfg, "--out", tmp_path / "merged") == 0
    docs[0]["models"][0]["model"] = str(family / "m1")
    assert _merge(_write(tmp_path / "by-path.yaml", docs), "--out", tmp_path / "by-path") == 0
    assert _weights(tmp_path / "merged") == _weights(tmp_path / "by-path")


def test_a_plan_writes_plan_mergekit_yaml_that_runs_as_merge_plan(models: Path, tmp_path: Path) -> None:
    """A 3-step plan (ties, slerp, slerp) written as `simmerge plan` and `plan-batch` write it
    (write_plans): plan.mergekit.yaml beside the step files, steps 1-2 named, the last unnamed.
    Run with `simmerge merge` it gives the weights of `merge --plan` byte for byte: the same
    configs through the same engine; only the model card and recorded config, which say how the
    output was made, differ. mergekit-multi runs the same file."""
    from simmerge_ray.planner.search import SearchResult

    names = ["m1", "m2", "m3", "m4"]
    cat_file = tmp_path / "catalog.yaml"
    cat_file.write_text(yaml.safe_dump({"base": str(models / "base"),
                                        "models": [{"name": n, "path": str(models / n)} for n in names]}))
    catalog = Catalog.load(cat_file)
    plan = Plan(task="code", models=names, operators=["ties", "slerp", "slerp"])
    folder = tmp_path / "plan"
    write_plans(SearchResult(plans=[plan], scored=1, seconds=0.0, exhaustive=True), catalog, folder, step_root=folder)
    assert sorted(p.name for p in folder.iterdir()) == ["alternatives.yaml", "plan.json", "plan.mergekit.yaml",
                                                        "step-1.yaml", "step-2.yaml", "step-3.yaml"]
    docs = list(yaml.safe_load_all((folder / "plan.mergekit.yaml").read_text()))
    assert [d.get("name") for d in docs] == ["step-1", "step-2", None]
    assert _merge(folder / "plan.mergekit.yaml", "--out", tmp_path / "multi") == 0
    assert cli_main(["merge", "--plan", str(folder / "plan.json"), "--catalog", str(cat_file), "--out",
                     str(tmp_path / "planned"), "--workers", "1", "--quiet"]) == 0
    got = _weights(tmp_path / "multi")
    assert any(k.endswith(".safetensors") for k in got) and got == _weights(tmp_path / "planned")
    run_mergekit_multi(folder / "plan.mergekit.yaml", tmp_path / "mk", tmp_path / "mk-steps")
    a, b = load_all(tmp_path / "multi"), load_all(tmp_path / "mk")
    assert set(a) == set(b)
    for name in a:  # float32 checkpoints, float32 math: the single-config oracle tests' tolerance
        torch.testing.assert_close(a[name], b[name], rtol=2e-6, atol=2e-6, msg=name)
    one = Plan(task="code", models=["m1", "m2"], operators=["slerp"])  # one step: merge.yaml already
    files = one.write(tmp_path / "one", {"m1": models / "m1", "m2": models / "m2"}, models / "base")
    assert [f.name for f in files] == ["step-1.yaml"] and not (tmp_path / "one" / "plan.mergekit.yaml").exists()


def test_a_single_named_document_is_the_final(family: Path, tmp_path: Path) -> None:
    """One document with a `name:` is a multi-document config whose only merge is the final: the
    same weights as the document without its name."""
    doc = _two_stage(family)[0]
    assert _merge(_write(tmp_path / "named.yaml", [doc]), "--out", tmp_path / "named") == 0
    plain = {k: v for k, v in doc.items() if k != "name"}
    assert _merge(_write(tmp_path / "plain.yaml", [plain]), "--out", tmp_path / "plain") == 0
    assert _weights(tmp_path / "named") == _weights(tmp_path / "plain")



def test_a_single_document_with_a_trailing_separator_is_a_plain_config(family: Path, tmp_path: Path) -> None:
    """`---` after the one document (an empty second document) is still a plain config: the
    same weights as the file without it (it was refused: "expected a single document")."""
    doc = {k: v for k, v in _two_stage(family)[0].items() if k != "name"}
    plain = _write(tmp_path / "plain.yaml", [doc])
    trailing = tmp_path / "trailing.yaml"
    trailing.write_text(plain.read_text() + "---\n")
    assert _merge(trailing, "--out", tmp_path / "trailing") == 0
    assert _merge(plain, "--out", tmp_path / "plain") == 0
    assert _weights(tmp_path / "trailing") == _weights(tmp_path / "plain")
