"""Bad inputs to `simmerge probe` and `simmerge features functional`: a tokenizer that is not the
model's, probe-cache entries that are damaged or another key's, outputs that make KL infinite or
NaN, and catalogs with nothing to compare. Each is one line naming what is at fault (or, for a
cache entry, healed), and nothing is written. None of these tests starts Ray."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks.synthetic_lm import make_corpus, make_tiny_lm, train_tokenizer
from simmerge_ray.catalog import Catalog
from simmerge_ray.cli import main as cli_main
from simmerge_ray.errors import CheckpointError
from simmerge_ray.features.functional import write_functional_features
from simmerge_ray.inference.cache import ProbeCache, RecordShapes
from simmerge_ray.inference.catalog_probes import ModelProbes, plan_task, probe_catalog
from simmerge_ray.inference.settings import ProbeSettings, RunOptions
from simmerge_ray.probes.errors import DistributionError, ProbeError
from simmerge_ray.probes.tokenize import TokenizedProbes
from input_checks import one_line_error as _one_line  # beside this file

SETTINGS = ProbeSettings(max_length=10, attn_max_length=6)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("probe-inputs")
    tok = train_tokenizer(make_corpus(300, seed=1))
    make_tiny_lm(root / "a", tok, seed=1)
    make_tiny_lm(root / "b", tok, seed=2)
    make_tiny_lm(root / "small", tok, seed=3, vocab_size=30)  # its embedding has fewer rows than the tokenizer ids
    (root / "probes.txt").write_text("\n".join(make_corpus(4, seed=5, max_words=8)) + "\n")
    return root


def _catalog(root: Path, models: str, tasks: str = "tasks:\n  t: {probes: probes.txt}\n") -> Path:
    (root / "catalog.yaml").write_text(f"models:\n{models}{tasks}")
    return root / "catalog.yaml"



# ---- catalog ----------------------------------------------------------------------------------
def test_a_tokenizer_with_ids_past_the_model_s_vocabulary_is_refused_before_any_actor(zoo: Path, tmp_path: Path) -> None:
    """Ids past config.vocab_size used to reach the embedding inside a Ray actor: an IndexError
    and Ray Data's traceback."""
    cat = Catalog.from_dict({"models": [{"name": "s", "path": str(zoo / "small")}],
                             "tasks": {"t": {"probes": str(zoo / "probes.txt")}}}, root=tmp_path)
    with pytest.raises(ProbeError) as caught:
        plan_task(cat, "t", SETTINGS, tmp_path / "cache")
    msg = str(caught.value)
    assert msg.startswith(f"{zoo / 'probes.txt'}: probe ") and "\n" not in msg
    assert f"but model 's' has vocab_size 30 ({zoo / 'small' / 'config.json'})" in msg
    assert not (tmp_path / "cache").exists()


def test_a_probe_longer_than_the_model_s_positions_is_refused_before_any_actor(zoo: Path, tmp_path: Path) -> None:
    """A model with learned positions (GPT-2's wpe) failed with an IndexError inside a Ray Data
    actor; a rotary one ran past its trained context without a word."""
    short = shutil.copytree(zoo / "a", tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4}))
    cat = Catalog.from_dict({"models": [{"name": "short", "path": str(short)}],
                             "tasks": {"t": {"probes": str(zoo / "probes.txt")}}}, root=tmp_path)
    with pytest.raises(ProbeError) as caught:
        probe_catalog(cat, SETTINGS, RunOptions(), tmp_path / "cache")
    msg = str(caught.value)
    assert msg.startswith(f"{zoo / 'probes.txt'}: probe ") and "\n" not in msg
    assert msg.endswith(f"tokens (probes are cut to --max-length 10), more than the 4 positions of model 'short' "
                        f"(max_position_embeddings, {short / 'config.json'}); pass --max-length 4 or less")
    assert not (tmp_path / "cache").exists()
    assert plan_task(cat, "t", ProbeSettings(max_length=4, attn_max_length=4), tmp_path / "cache")["short"]


def test_overwrite_discards_nothing_when_the_run_is_refused(zoo: Path, tmp_path: Path, capsys) -> None:
    """`probe --overwrite` emptied the whole cache before it read the catalog's tasks: a typo in
    --tasks (or a bad probe file) lost every entry, and the command then failed."""
    cat = _catalog(tmp_path, f"  - {{name: a, path: {zoo / 'a'}}}\n",
                   f"tasks:\n  t: {{probes: {zoo / 'probes.txt'}}}\n")
    entry = tmp_path / "cache" / "0123456789abcdef01234567"  # named and written as an entry of this cache
    entry.mkdir(parents=True)
    (entry / "meta.json").write_text(json.dumps({"num_probes": 4}))
    (entry / "chunk-run-00000.safetensors").write_bytes(b"kept")
    argv = ["probe", "--catalog", str(cat), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"),
            "--overwrite"]
    assert cli_main([*argv, "--tasks", "nosuch"]) == 2
    assert "no task named 'nosuch'" in _one_line(capsys)
    (tmp_path / "bad.jsonl").write_text('{"text": \n')
    cat.write_text(cat.read_text().replace(str(zoo / "probes.txt"), str(tmp_path / "bad.jsonl")))
    assert cli_main(argv) == 2
    assert "bad.jsonl: line 1: invalid JSON" in _one_line(capsys)
    assert sorted(p.name for p in entry.iterdir()) == ["chunk-run-00000.safetensors", "meta.json"]



@pytest.mark.parametrize("command", [["probe"], ["features", "functional"]])
def test_a_catalog_without_tasks_is_refused(zoo: Path, tmp_path: Path, capsys, command: list[str]) -> None:
    """It used to write an empty manifest (probe) or an empty functional.parquet, exit 0."""
    cat = _catalog(tmp_path, f"  - {{name: a, path: {zoo / 'a'}}}\n  - {{name: b, path: {zoo / 'b'}}}\n", tasks="")
    assert cli_main([*command, "--catalog", str(cat), "--out", str(tmp_path / "out")]) == 2
    _one_line(capsys, f"{cat}: no tasks to probe")
    assert not (tmp_path / "out").exists()


def test_a_probe_cache_inside_a_model_is_named_as_the_cache(zoo: Path, tmp_path: Path, capsys) -> None:
    """The refusal called the cache "the output"."""
    (tmp_path / "probes.txt").write_text((zoo / "probes.txt").read_text())
    cat = _catalog(tmp_path, f"  - {{name: a, path: {zoo / 'a'}, task: t}}\n  - {{name: b, path: {zoo / 'b'}, task: t}}\n")
    cache = zoo / "a" / "cache"
    assert cli_main(["probe", "--catalog", str(cat), "--out", str(tmp_path / "out"), "--cache", str(cache)]) == 2
    _one_line(capsys, f"{cache}: the probe cache lies inside the input {zoo / 'a'}")
    assert not cache.exists() and not (tmp_path / "out").exists()


def test_functional_features_of_one_model_are_refused(zoo: Path, tmp_path: Path, capsys) -> None:
    """No pair: it used to write a table of no rows, exit 0."""
    cat = _catalog(tmp_path, f"  - {{name: a, path: {zoo / 'a'}, task: t}}\n")
    assert cli_main(["features", "functional", "--catalog", str(cat), "--out", str(tmp_path / "out")]) == 2
    _one_line(capsys, f"{cat}: functional features compare pairs of models, and the catalog names 1")
    assert not (tmp_path / "out").exists()


# ---- the probe cache --------------------------------------------------------------------------
def _record(t: int, v: int = 5, layers: int = 2, logp: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    lp = torch.log_softmax(torch.arange(float(t * v)).reshape(t, v) % 3, dim=-1) if logp is None else logp
    ta = min(t, SETTINGS.attn_max_length)
    return {"logp": lp, "hidden": torch.ones(layers, 4), "attn": torch.full((layers, ta, ta), 1.0 / ta)}


SHAPES = RecordShapes((3, 2), 5, SETTINGS.full_vocab_limit, SETTINGS.top_k, SETTINGS.attn_max_length)


@pytest.mark.parametrize("damage", ["another probe set", "a field missing", "an unknown probe"])
def test_a_chunk_that_does_not_fit_its_probes_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        damage: str) -> None:
    """A self-consistent chunk (its digest matches) of other records used to be read as this
    key's: a broadcast RuntimeError or KeyError traceback in `features functional`."""
    cache = ProbeCache(tmp_path / "entry", SHAPES)
    good = cache.write_chunk({0: _record(3)}, "r", 0)
    bad = {"another probe set": {1: _record(5)}, "a field missing": {1: {"logp": _record(2)["logp"]}},
           "an unknown probe": {7: _record(2)}}[damage]
    victim = cache.write_chunk(bad, "r", 1)
    with caplog.at_level(logging.WARNING):
        assert cache.chunk_probe_ids() == {good: [0]}
    assert not victim.exists() and f"{victim}: unusable probe-cache chunk" in caplog.text
    assert ProbeCache(tmp_path / "entry").write_chunk({1: _record(2)}, "r", 2) in ProbeCache(tmp_path / "entry", SHAPES
                                                                                            ).chunk_probe_ids()


def _meta(fingerprint: str = "fa", probe_file: str = "p.txt") -> dict:
    return {"fingerprint": fingerprint, "probe_digest": "d", "settings": SETTINGS.model_dump(), "num_probes": 2,
            "probe_file": probe_file}


def test_an_entry_written_for_another_model_is_emptied_and_rewritten(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A folder copied over another key's kept its meta.json and chunks: the other model's outputs
    were read as this one's (KL 0 between two different models)."""
    cache = ProbeCache(tmp_path / "entry", SHAPES)
    cache.write_meta(_meta("other-model"))
    chunk = cache.write_chunk({0: _record(3)}, "r", 0)
    cache.write_meta(_meta("other-model", "same-probes-of-another-task.txt"))  # same key fields: kept
    assert chunk.exists() and json.loads((cache.root / "meta.json").read_text()) == _meta("other-model")
    with caplog.at_level(logging.WARNING):
        cache.write_meta(_meta("fa"))
    assert "written for another fingerprint" in caplog.text and not chunk.exists()
    assert json.loads((cache.root / "meta.json").read_text()) == _meta("fa")
    # A readable meta.json without the key's fields is rewritten; its chunks are kept (checked as read).
    chunk = cache.write_chunk({0: _record(3)}, "r", 1)
    (cache.root / "meta.json").write_text("[]")
    cache.write_meta(_meta())
    assert chunk.exists() and json.loads((cache.root / "meta.json").read_text()) == _meta()


@pytest.mark.parametrize("where", ["entry", "meta.json"])
def test_a_cache_entry_of_the_wrong_kind_is_named(zoo: Path, tmp_path: Path, where: str) -> None:
    """An entry folder that is a file was a FileExistsError traceback, a meta.json that is a
    folder an IsADirectoryError; neither is deleted (simmerge did not make it)."""
    cat = Catalog.from_dict({"models": [{"name": "a", "path": str(zoo / "a")}],
                             "tasks": {"t": {"probes": str(zoo / "probes.txt")}}}, root=tmp_path)
    root = plan_task(cat, "t", SETTINGS, tmp_path / "cache")["a"].cache.root
    if where == "entry":
        root.parent.mkdir(parents=True)
        root.write_text("x")
        path, want = root, "not a folder, where the probe cache keeps an entry; remove it"
    else:
        (root / "meta.json").mkdir(parents=True)
        path, want = root / "meta.json", "not a file, where a probe-cache entry keeps its meta.json; remove it"
    with pytest.raises(CheckpointError) as caught:
        probe_catalog(cat, SETTINGS, RunOptions(), tmp_path / "cache")
    assert str(caught.value) == f"{path}: {want}"
    assert path.exists()


# ---- the features -----------------------------------------------------------------------------
def _plan(root: Path, records: dict[str, dict[str, torch.Tensor]]) -> dict[str, ModelProbes]:
    plan = {}
    for name, rec in records.items():
        t = rec["hidden" if "logp" not in rec and "topk_idx" not in rec else
                "logp" if "logp" in rec else "topk_idx"].shape[0]
        cache = ProbeCache(root / name)
        cache.write_chunk({0: rec}, "r", 0)
        probes = TokenizedProbes((tuple(range(1, t + 1)),), 0, 10)
        plan[name] = ModelProbes(name, root / name, "v", 5, 5, probes, cache, (2, 4))
    return plan


def _write(zoo: Path, out: Path, plan: dict[str, ModelProbes]) -> None:
    for mp in plan.values():  # provenance reads each model's checkpoint
        object.__setattr__(mp, "model_dir", zoo / mp.name)
    write_functional_features({"t": plan}, {"a": "t", "b": None}, out)


@pytest.mark.parametrize("form", ["full", "compact"])
def test_a_zero_probability_is_refused_naming_pair_task_and_model(zoo: Path, tmp_path: Path, form: str) -> None:
    """Model b's logit -inf where a's probability is not 0: KL(a||b) = +inf used to be written to
    the table (full form) or clamped to ~1e38 (compact form, empty tail), for `fit` to refuse the
    whole table later, or not at all."""
    logp = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]] * 3), dim=-1)
    zero = logp.clone()
    zero[1, 0] = float("-inf")
    zero[1] = torch.log_softmax(zero[1], dim=-1)
    b = _record(3, logp=zero)
    if form == "compact":  # top 4 of 5: b's tail (token 0 at position 1) holds no mass
        top, idx = zero.topk(4, dim=-1)
        tail = torch.logsumexp(zero.scatter(-1, idx, float("-inf")), dim=-1)
        b = {"topk_idx": idx.to(torch.int32), "topk_logp": top, "tail_logmass": tail,
             "hidden": b["hidden"], "attn": b["attn"]}
    plan = _plan(tmp_path / "cache", {"a": _record(3, logp=logp), "b": b})
    with pytest.raises(DistributionError) as caught:
        _write(zoo, tmp_path / "out", plan)
    assert str(caught.value).startswith("task 't', pair ('a', 'b'): model 'b' gives token 0 zero probability "
                                        "(logit -inf) at probe 0, position 1, where 'a' gives it 0.0117; "
                                        "KL(a||b) is infinite")
    assert not (tmp_path / "out").exists()


def test_nan_outputs_are_refused_naming_the_model(zoo: Path, tmp_path: Path) -> None:
    """NaN hidden states used to be written as NaN cosines."""
    b = _record(3)
    b["hidden"][1, 2] = float("nan")
    plan = _plan(tmp_path / "cache", {"a": _record(3), "b": b})
    with pytest.raises(DistributionError, match=r"^task 't', probe 0: model 'b' gave nan in its hidden states; "):
        _write(zoo, tmp_path / "out", plan)
    assert not (tmp_path / "out").exists()
