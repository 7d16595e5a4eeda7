"""Probe loading, tokenisation, the Ray Data inference pipeline, its cache and both back-ends."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors import safe_open

from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import CheckpointError
from simmerge_ray.inference.backend import load_backend
from simmerge_ray.inference.cache import ProbeCache, discard_entries
from simmerge_ray.inference.catalog_probes import plan_task
from simmerge_ray.inference.compact import compact_logprobs, expand_logprobs
from simmerge_ray.inference.extract import pad_batch, probe_records
from simmerge_ray.inference.pipeline import ModelWork, ProbeJob, run_jobs, run_model_probes
from simmerge_ray.inference.settings import ProbeSettings, RunOptions
from benchmarks.synthetic_lm import make_corpus, make_tiny_lm, train_tokenizer
from simmerge_ray.io.digest_cache import file_digest
from simmerge_ray.probes.errors import ProbeError
from simmerge_ray.probes.loading import load_probe_texts
from simmerge_ray.probes.tokenize import load_tokenizer, tokenize_probes

SETTINGS = ProbeSettings(max_length=12, attn_max_length=6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("probe-models")
    tok = train_tokenizer(make_corpus(300, seed=1))
    model = make_tiny_lm(root / "m", tok, seed=3)
    probes = tokenize_probes(make_corpus(10, seed=5, max_words=16), load_tokenizer(model), SETTINGS.max_length)
    return {"root": root, "model": model, "probes": probes, "tok": tok}


@functools.cache
def _plain_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()


def direct_record(model_dir: Path, ids: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """One probe alone (no padding) through plain transformers."""
    model = _plain_model(model_dir)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    t = min(len(ids), SETTINGS.attn_max_length)
    return {
        "logp": torch.log_softmax(out.logits[0], dim=-1),
        "hidden": torch.stack([h[0].mean(dim=0) for h in out.hidden_states[1:]]),
        "attn": torch.stack([a[0, :, :t, :t].mean(dim=0) for a in out.attentions]),
    }


# ---- loading ----------------------------------------------------------------------------------
def test_three_formats_give_the_same_probes(tmp_path: Path) -> None:
    texts = ["the cat sees a dog", "two plus three", "print ( value )"]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n\n")
    (tmp_path / "p.txt").write_text(texts[0] + "\n\n" + "\n".join(texts[1:]) + "\n")
    pl.DataFrame({"text": texts, "n": [1, 2, 3]}).write_parquet(tmp_path / "p.parquet")
    for name in ("p.jsonl", "p.txt", "p.parquet"):
        assert load_probe_texts(tmp_path / name) == texts


def test_bad_probe_files_name_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="missing.jsonl: probe file not found"):
        load_probe_texts(tmp_path / "missing.jsonl")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ProbeError, match="empty.txt: probe file holds no probes"):
        load_probe_texts(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_bytes(b"fine line\nanother\ncaf\xe9 au lait\n")
    with pytest.raises(ProbeError, match=r"bad.txt: line 3: not valid UTF-8 \(byte 0xe9 at column 4\)"):
        load_probe_texts(tmp_path / "bad.txt")
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"prompt": "x"}\n')
    with pytest.raises(ProbeError, match="nofield.jsonl: line 2: expected an object with a string field 'text'"):
        load_probe_texts(tmp_path / "nofield.jsonl")
    pl.DataFrame({"prompt": ["x"]}).write_parquet(tmp_path / "nocol.parquet")
    with pytest.raises(ProbeError, match="nocol.parquet: no column 'text'"):
        load_probe_texts(tmp_path / "nocol.parquet")


def test_truncation_is_counted(tiny: dict) -> None:
    tok = load_tokenizer(tiny["model"])
    texts = ["the cat", "the cat sees a big red dog and then runs", "one two three four five six"]
    full = [len(tok(t)["input_ids"]) for t in texts]
    probes = tokenize_probes(texts, tok, max_length=5)
    assert [len(p) for p in probes.ids] == [min(n, 5) for n in full]
    assert probes.truncated == sum(n > 5 for n in full) == 2
    assert probes.ids[0][0] == tok.convert_tokens_to_ids("[BOS]")


@pytest.mark.parametrize("damage", ["truncated", "fields"])
def test_a_broken_tokenizer_is_one_line_naming_the_file(tiny: dict, tmp_path: Path, damage: str) -> None:
    """transformers' own message gives a JSON decoder's position but not the file ('Unterminated
    string ... (char 46)'), or a bare KeyError."""
    folder = tmp_path / "m"
    shutil.copytree(tiny["model"], folder)
    tok_json = folder / "tokenizer.json"
    if damage == "truncated":
        tok_json.write_text(tok_json.read_text()[:50])
        want = f"{folder}: cannot load tokenizer ({tok_json} is not valid JSON: "
    else:
        tok_json.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
        want = f"{folder}: cannot load tokenizer (KeyError: 'added_tokens')"
    with pytest.raises(ProbeError) as caught:
        load_tokenizer(folder)
    assert str(caught.value).startswith(want) and "\n" not in str(caught.value)


# ---- compact distributions -----------------------------------------------------------------
def test_compact_form_round_trip() -> None:
    logp = torch.log_softmax(torch.randn(7, 50, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    exact = compact_logprobs(logp, k=50)
    assert torch.allclose(expand_logprobs(**exact, vocab_size=50), logp, atol=1e-6)
    approx = expand_logprobs(**compact_logprobs(logp, k=10), vocab_size=50)
    assert torch.allclose(approx.exp().sum(-1), torch.ones(7, dtype=torch.float32), atol=1e-5)
    top = logp.topk(10, dim=-1)
    assert torch.equal(approx.gather(1, top.indices), top.values)
    rest = torch.ones_like(logp, dtype=torch.bool).scatter_(1, top.indices, False)
    tail = approx[rest].reshape(7, 40)
    assert torch.allclose(tail, tail[:, :1].expand(7, 40))  # tail spread evenly


# ---- pipeline ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resumed(tiny: dict, ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run interrupted by an exception after 2 batches (1 actor), then resumed with 2 actors."""
    probes = tiny["probes"]
    cache = ProbeCache(tmp_path_factory.mktemp("resume") / "cache")
    cache.write_meta({"num_probes": probes.num_probes})
    interrupt = RunOptions(num_actors=1, batch_size=2, fail_after_batches=2)
    with pytest.raises(Exception, match="injected interruption after 2 batches"):
        run_model_probes(tiny["model"], probes, SETTINGS, interrupt, cache)
    first = cache.chunk_probe_ids()
    complete_after_interrupt = cache.is_complete()
    report = run_model_probes(tiny["model"], probes, SETTINGS, RunOptions(num_actors=2, batch_size=3), cache)
    return {"cache": cache, "first": first, "complete_after_interrupt": complete_after_interrupt, "report": report}


def test_interrupted_run_resumes_without_rerunning_probes(tiny: dict, resumed: dict) -> None:
    probes, cache, first = tiny["probes"], resumed["cache"], resumed["first"]
    assert len(first) == 2 and sum(map(len, first.values())) == 4
    assert not resumed["complete_after_interrupt"]
    assert resumed["report"].probes_run == probes.num_probes - 4
    assert resumed["report"].tokens_run == probes.num_tokens - sum(len(probes.ids[i]) for v in first.values() for i in v)
    chunks = cache.chunk_probe_ids()
    ran = [pid for ids in chunks.values() for pid in ids]
    assert sorted(ran) == list(range(probes.num_probes)), "every probe ran exactly once over both runs"
    assert all(chunks[p] == ids for p, ids in first.items()), "finished chunks were kept, not redone"
    assert cache.is_complete()
    assert run_model_probes(tiny["model"], probes, SETTINGS, RunOptions(), cache).probes_run == 0


def test_batched_pipeline_equals_unpadded_direct_runs(tiny: dict, resumed: dict) -> None:
    probes, cache = tiny["probes"], resumed["cache"]
    assert len({len(p) for p in probes.ids}) > 1, "probes of several lengths exercise padding"
    for pid in range(probes.num_probes):
        got, want = cache.record(pid), direct_record(tiny["model"], probes.ids[pid])
        assert set(got) == {"logp", "hidden", "attn"}
        for k in want:
            assert got[k].shape == want[k].shape
            torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4)


def test_one_pool_serves_several_models(tiny: dict, ray_cluster, tmp_path: Path) -> None:
    """A catalog runs in one actor pool: each actor swaps models as their blocks arrive, and
    every cache gets its own model's records, none of another's."""
    probes = tiny["probes"]
    other = make_tiny_lm(tmp_path / "m2", tiny["tok"], seed=4)
    caches = [ProbeCache(tmp_path / f"cache{i}") for i in range(3)]
    short = tokenize_probes(make_corpus(4, seed=9, max_words=8), load_tokenizer(other), SETTINGS.max_length)
    for cache, p in zip(caches, (probes, probes, short)):
        cache.write_meta({"num_probes": p.num_probes})
    work = [ModelWork(tiny["model"], [ProbeJob(probes, caches[0])]),
            ModelWork(other, [ProbeJob(probes, caches[1]), ProbeJob(short, caches[2])])]
    seen: list[int] = []
    reports = run_jobs(work, SETTINGS, RunOptions(num_actors=1, batch_size=4), progress=lambda m, _t: seen.append(m))
    assert [[r.probes_run for r in m] for m in reports] == [[probes.num_probes], [probes.num_probes, short.num_probes]]
    # Batch time is attributed to the job it served and, with one actor, fits inside the run.
    busy = [r.busy_seconds for m in reports for r in m]
    assert all(b > 0 for b in busy) and sum(busy) < reports[0][0].seconds
    assert sorted(seen) == [0] * probes.num_probes + [1] * (probes.num_probes + short.num_probes)
    for model, cache, p in ((tiny["model"], caches[0], probes), (other, caches[1], probes), (other, caches[2], short)):
        assert cache.is_complete()
        for pid in range(p.num_probes):
            got, want = cache.record(pid), direct_record(model, p.ids[pid])
            for k in want:
                torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(caches[0].record(0)["logp"], caches[1].record(0)["logp"])  # two different models


@pytest.mark.slow
def test_hf_and_deepspeed_backends_agree(tiny: dict, resumed: dict, tmp_path: Path) -> None:
    """DeepSpeed ZeRO-3 (params offloaded to CPU, gloo) in a Ray actor vs the hf back-end's cache."""
    probes = tiny["probes"]
    ds_cache = ProbeCache(tmp_path / "deepspeed")
    ds_cache.write_meta({"num_probes": probes.num_probes})
    run_model_probes(tiny["model"], probes, SETTINGS, RunOptions(backend="deepspeed", batch_size=5), ds_cache)
    worst = 0.0
    for pid in range(probes.num_probes):
        a, b = resumed["cache"].record(pid), ds_cache.record(pid)
        assert set(a) == set(b)
        worst = max([worst] + [(a[k] - b[k]).abs().max().item() for k in a])
    assert worst < 1e-4


def test_a_refused_probe_run_writes_nothing(tiny: dict, tmp_path: Path, capsys) -> None:
    """A bad probe file of the second task: the first task's cache entries (meta.json) were written
    before it was read, so the refused run left OUT/probe_cache/ behind. A cache path that is a
    file was a NotADirectoryError traceback after Ray started."""
    from simmerge_ray.cli import main as cli_main
    from simmerge_ray.inference.catalog_probes import probe_catalog

    (tmp_path / "good.txt").write_text("the cat\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "a dog"}\n{"text": \n')
    cat = Catalog.from_dict({"models": [{"name": "m", "path": str(tiny["model"])}],
                             "tasks": {"a": {"probes": "good.txt"}, "b": {"probes": "bad.jsonl"}}}, root=tmp_path)
    with pytest.raises(ProbeError, match=r"bad.jsonl: line 2: invalid JSON"):
        probe_catalog(cat, SETTINGS, RunOptions(), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    # A config edited apart from its weights: it failed inside the actor (transformers' message
    # pointed at a report printed in the actor's log).
    wider = tmp_path / "wider"
    shutil.copytree(tiny["model"], wider)
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    cat = Catalog.from_dict({"models": [{"name": "w", "path": str(wider)}], "tasks": {"a": {"probes": "good.txt"}}},
                            root=tmp_path)
    with pytest.raises(CheckpointError, match=rf"^{wider / 'config.json'}: does not match the weights beside it .*"
                                              r"shape of 'model.layers.0.mlp.down_proj.weight' is"):
        probe_catalog(cat, SETTINGS, RunOptions(), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    (tmp_path / "catalog.yaml").write_text(f"models:\n  - {{name: m, path: {tiny['model']}}}\n"
                                           f"tasks:\n  a: {{probes: good.txt}}\n")
    (tmp_path / "afile").write_text("")
    assert cli_main(["probe", "--catalog", str(tmp_path / "catalog.yaml"), "--out", str(tmp_path / "out"),
                     "--cache", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"simmerge probe: error: {tmp_path / 'afile'}: the probe cache must be a "
                                        f"folder, and this is a file"]
    assert not (tmp_path / "out").exists()


def test_bad_model_config_is_named_before_any_actor(tiny: dict, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (tmp_path / "p.txt").write_text("the cat\n")
    cat = Catalog.from_dict({"models": [{"name": "ok", "path": str(tiny["model"])}, {"name": "bad", "path": str(broken)}],
                             "tasks": {"t": {"probes": "p.txt"}}}, root=tmp_path)
    with pytest.raises(CheckpointError, match=f"{broken}: cannot load model config"):
        plan_task(cat, "t", SETTINGS, tmp_path / "cache")


def test_padding_masks_are_right_aligned() -> None:
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_records_keep_only_real_tokens(tiny: dict) -> None:
    backend = load_backend("hf", tiny["model"])
    ids, mask = pad_batch([[2, 5, 6, 7, 8, 9, 10, 11], [2, 5]])
    recs = probe_records(backend.forward(ids, mask), mask, SETTINGS.model_copy(update={"full_vocab_limit": 8, "top_k": 4}))
    assert recs[1]["topk_idx"].shape == (2, 4) and recs[1]["tail_logmass"].shape == (2,)
    assert recs[0]["attn"].shape == (2, 6, 6) and recs[1]["attn"].shape == (2, 2, 2)
    assert torch.allclose(recs[1]["attn"].sum(-1), torch.ones(2, 2))


def test_truncated_chunk_is_a_miss_recomputed_and_rewritten(tiny: dict, resumed: dict, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    probes = tiny["probes"]
    cache = ProbeCache(shutil.copytree(resumed["cache"].root, tmp_path / "cache"))
    chunks = cache.chunk_probe_ids()
    victim, lost = next(iter(chunks.items()))
    victim.write_bytes(victim.read_bytes()[:100])  # a run killed while the disk filled, or a bad copy
    (cache.root / "meta.json").write_text('{"num_probes": ')  # truncated too
    cache.write_meta({"num_probes": probes.num_probes})
    assert json.loads((cache.root / "meta.json").read_text()) == {"num_probes": probes.num_probes}
    with caplog.at_level("WARNING"):
        report = run_model_probes(tiny["model"], probes, SETTINGS, RunOptions(), cache)
    assert str(victim) in caplog.text and "meta.json" in caplog.text
    assert report.probes_run == len(lost)
    assert cache.is_complete()
    for pid in range(probes.num_probes):
        want = resumed["cache"].record(pid)
        got = cache.record(pid)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_chunk_with_damaged_tensor_bytes_is_a_miss_recomputed(tiny: dict, resumed: dict, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Bytes damaged under a readable header (a bad disk or copy) fail the chunk's digest: the
    chunk is removed and its probes run again, never read as features."""
    probes = tiny["probes"]
    cache = ProbeCache(shutil.copytree(resumed["cache"].root, tmp_path / "cache"))
    victim, lost = next(iter(cache.chunk_probe_ids().items()))
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF  # inside the last tensor's data; the header still parses
    victim.write_bytes(bytes(raw))
    fresh = ProbeCache(cache.root)
    with caplog.at_level("WARNING"):
        report = run_model_probes(tiny["model"], probes, SETTINGS, RunOptions(), fresh)
    assert f"{victim}: unusable probe-cache chunk (its tensors do not match their digest)" in caplog.text
    assert report.probes_run == len(lost) and fresh.is_complete()
    for pid in range(probes.num_probes):
        want, got = resumed["cache"].record(pid), fresh.record(pid)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_chunk_moved_from_another_entry_is_a_miss_recomputed(tiny: dict, resumed: dict, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Chunks swapped between two entries (each folder's meta.json kept) were served as the other
    model's records: its probe ids and digest were all a chunk said of itself."""
    probes = tiny["probes"]
    theirs = next(iter(resumed["cache"].chunk_probe_ids()))
    mine = ProbeCache(tmp_path / "0123456789abcdef01234567")
    mine.write_meta({"num_probes": probes.num_probes})
    shutil.copy(theirs, mine.root / theirs.name)
    with caplog.at_level("WARNING"):
        report = run_model_probes(tiny["model"], probes, SETTINGS, RunOptions(), mine)
    assert (f"{mine.root / theirs.name}: unusable probe-cache chunk (written for the entry "
            f"{resumed['cache'].root.name}, not this one)") in caplog.text
    assert report.probes_run == probes.num_probes and mine.is_complete()
    for chunk in mine.chunk_files():
        with safe_open(chunk, framework="pt") as f:
            assert f.metadata()["key"] == mine.root.name


def test_overwrite_measures_again_only_what_its_run_measures(tiny: dict, ray_cluster, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`probe --overwrite --tasks a` discarded every entry of the cache, other tasks' included."""
    from simmerge_ray.cli import main as cli_main

    (tmp_path / "a.txt").write_text("the cat\nsees a dog\n")
    (tmp_path / "b.txt").write_text("two plus three\n")
    (tmp_path / "catalog.yaml").write_text(f"models:\n  - {{name: m, path: {tiny['model']}}}\n"
                                           f"tasks:\n  a: {{probes: a.txt}}\n  b: {{probes: b.txt}}\n")
    argv = ["probe", "--catalog", str(tmp_path / "catalog.yaml"), "--out", str(tmp_path / "out"),
            "--max-length", "12"]
    assert cli_main(argv) == 0
    manifest = json.loads((tmp_path / "out" / "probe_manifest.json").read_text())
    entry = {t: Path(manifest["tasks"][t]["m"]["cache"]) for t in ("a", "b")}
    before = {t: sorted(p.name for p in entry[t].iterdir()) for t in entry}
    assert cli_main([*argv, "--overwrite", "--tasks", "a"]) == 0
    after = {t: sorted(p.name for p in entry[t].iterdir()) for t in entry}
    assert after["b"] == before["b"]  # task b's entry untouched
    assert after["a"] != before["a"] and len(after["a"]) == len(before["a"])  # task a's chunks written anew
    # A run refused for its actor's ask discards nothing, though --overwrite asked to measure again.
    monkeypatch.setenv("SIMMERGE_GPUS_PER_INFERENCE_ACTOR", "64")
    assert cli_main([*argv, "--overwrite"]) == 2
    assert {t: sorted(p.name for p in entry[t].iterdir()) for t in entry} == after


def test_byte_identical_models_are_run_once(tiny: dict, ray_cluster, tmp_path: Path) -> None:
    """Two catalog names of the same weights share a cache key: both ran every probe into it (a
    second set of chunks in one entry). The second reads the first's outputs."""
    from simmerge_ray.inference.catalog_probes import probe_catalog

    twin = shutil.copytree(tiny["model"], tmp_path / "twin")
    (tmp_path / "p.txt").write_text("the cat\nsees a dog\ntwo plus three\n")
    cat = Catalog.from_dict({"models": [{"name": "m", "path": str(tiny["model"])}, {"name": "t", "path": str(twin)}],
                             "tasks": {"a": {"probes": "p.txt"}}}, root=tmp_path)
    plans, reports = probe_catalog(cat, SETTINGS, RunOptions(batch_size=8), tmp_path / "cache")
    assert plans["a"]["m"].cache.root == plans["a"]["t"].cache.root
    assert [reports[("a", n)].probes_run for n in ("m", "t")] == [3, 0]
    assert len(plans["a"]["m"].cache.chunk_files()) == 1 and plans["a"]["t"].cache.is_complete()


def test_chunk_that_cannot_be_opened_now_is_skipped_not_removed(resumed: dict, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """An I/O error is the reader's trouble (a flaky shared disk), not proof of a bad chunk: the
    probes count as not done this time, and nothing is deleted."""
    cache = ProbeCache(shutil.copytree(resumed["cache"].root, tmp_path / "cache"))
    odd = cache.root / "chunk-zz-00000.safetensors"
    odd.mkdir()  # opening it raises OSError, as EIO or ESTALE would
    with caplog.at_level("WARNING"):
        ids = cache.chunk_probe_ids()
    assert odd not in ids and odd.is_dir() and "not readable now" in caplog.text
    assert sorted(p for v in ids.values() for p in v) == sorted(resumed["cache"].done_ids())


def test_discarding_the_cache_removes_only_its_entries(resumed: dict, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    key = "0123456789abcdef01234567"  # an entry's name: settings.cache_key's 24 hex digits
    shutil.copytree(resumed["cache"].root, root / key)
    (root / key / "notes.txt").write_text("not a cache file")
    (root / "readme.md").write_text("mine")
    (root / "experiment1").mkdir()  # a user's folder with its own meta.json, under a shared --cache
    (root / "experiment1" / "meta.json").write_text('{"lr": 0.001}')
    # ... even one whose files look like ours (it lost them to `probe --overwrite`)
    shutil.copytree(resumed["cache"].root, root / "my-probe-study")
    mine = sorted(str(p.relative_to(root)) for p in (root / "my-probe-study").rglob("*"))
    assert discard_entries(root, [key, "experiment1", "my-probe-study", "fedcba9876543210fedcba98"]) == 1
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == sorted([
        "experiment1", "experiment1/meta.json", key, f"{key}/notes.txt", "readme.md", "my-probe-study", *mine])


def test_the_probe_cache_key_holds_the_code_and_library_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A change of what a probe run records (the code, torch, transformers) used to be served the
    old records from the cache."""
    from simmerge_ray.inference import settings as probe_settings

    key = probe_settings.cache_key("fp", "probes", ProbeSettings())
    assert len(key) == 24
    monkeypatch.setattr(probe_settings, "PROBE_CACHE_VERSION", "probe-v0")
    assert probe_settings.cache_key("fp", "probes", ProbeSettings()) != key
    monkeypatch.undo()
    monkeypatch.setattr(probe_settings, "version", lambda name: "0.0" if name == "transformers" else "2.13.0")
    assert probe_settings.cache_key("fp", "probes", ProbeSettings()) != key


_HASHER = """
import sys, time
from pathlib import Path
from simmerge_ray.io.digest_cache import file_digest

sync = Path(sys.argv[1])
(sync / f"ready-{sys.argv[2]}").touch()
while not (sync / "go").exists():  # all start together, so their writes overlap
    time.sleep(0.005)
for path in sys.argv[3:]:
    file_digest(Path(path))
"""


def test_processes_hashing_at_once_keep_every_digest(tmp_path: Path) -> None:
    """Ray actors hash files side by side: each used to write the store it had read, dropping
    the others' entries (only costing a re-hash, but never converging)."""
    import subprocess
    import sys

    files = []
    for i in range(150):
        files.append(tmp_path / f"w{i}.bin")
        files[-1].write_bytes(bytes([i]) * 100)
    env = {**os.environ, "SIMMERGE_CACHE": str(tmp_path / "cache")}
    (tmp_path / "sync").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _HASHER, str(tmp_path / "sync"), str(k), *map(str, files[k::3])],
                              env=env) for k in range(3)]
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "sync").glob("ready-*"))) < 3:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a hashing process did not start"
        time.sleep(0.01)
    (tmp_path / "sync" / "go").touch()
    assert all(proc.wait(timeout=120) == 0 for proc in procs)
    assert len(json.loads((tmp_path / "cache" / "file_digests.json").read_text())) == 150


def test_a_file_replaced_with_its_old_size_and_mtime_is_hashed_again(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Fine-tunes of one architecture have one size, and unpacking an archive packed with a fixed
    mtime gives the new file the old stamp: (path, size, mtime) returned the old model's digest,
    and every cache keyed by the fingerprint then served the old model's results."""
    monkeypatch.setenv("SIMMERGE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 1000)
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    assert file_digest(f) == hashlib.blake2b(b"a" * 1000, digest_size=16).hexdigest()
    time.sleep(0.01)  # a later ctime, whatever the clock's resolution here
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    assert file_digest(f) == hashlib.blake2b(b"b" * 1000, digest_size=16).hexdigest()


def test_corrupt_digest_store_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SIMMERGE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"w" * 1000)
    want = hashlib.blake2b(f.read_bytes(), digest_size=16).hexdigest()
    assert file_digest(f) == want
    store = tmp_path / "cache" / "file_digests.json"
    for junk in (store.read_bytes()[:7], b"\xff\xfe", b"[1, 2]"):
        store.write_bytes(junk)
        with caplog.at_level("WARNING"):
            assert file_digest(f) == want
        assert str(store) in caplog.text
        assert list(json.loads(store.read_text()).values()) == [want]
