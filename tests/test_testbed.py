"""The testbed: domains, tokenizer, training, the tiny zoo (built once per session), labels."""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import ConfigError, MergeError
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.merge.arms import ARM_NAMES
from simmerge_ray.testbed.domains import DOMAINS
from simmerge_ray.testbed.domains.multilingual import _VERBS
from simmerge_ray.testbed.evaluate import encode
from simmerge_ray.testbed.label_plans import LabelPlan, LabelSettings, enumerate_plans
from simmerge_ray.testbed.label_tables import gap_summary, multiway_table, pairwise_table
from simmerge_ray.testbed.lora import add_lora, merge_lora
from simmerge_ray.testbed.merging import merge_state_dicts
from simmerge_ray.testbed.model_factory import init_model
from simmerge_ray.testbed.tokenizer import train_tokenizer
from simmerge_ray.testbed.zoo_config import ArchitectureConfig, ZooConfig

TINY = Path(__file__).resolve().parents[1] / "configs" / "zoo_tiny.yaml"
DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "zoo_default.yaml"
LABELS = LabelSettings(subsets_3=1, subsets_4=1, weightings=("half", "anchor"), mixed_3=1, mixed_4=1, orders_4=4,
                       workers=2)


# ---- the tiny zoo, built once per session (and a second time for determinism) -------------------
@pytest.fixture(scope="session")
def tiny_zoo(ray_cluster, tmp_path_factory) -> Path:
    from simmerge_ray.testbed.build import build_zoo

    out = tmp_path_factory.mktemp("zoo") / "tiny"
    return build_zoo(ZooConfig.load(TINY), out, log=lambda *_: None).parent


def test_tiny_zoo_rebuild_gives_identical_checkpoints(tiny_zoo, tmp_path, monkeypatch):
    """Pretraining is cached by content: a rebuild reuses the base; a build on an empty cache
    trains it again, to the same bytes (determinism); a corrupt entry is a logged miss."""
    from simmerge_ray.testbed import pretrain_cache
    from simmerge_ray.testbed.build import build_zoo

    cfg = ZooConfig.load(TINY)
    logs: list[str] = []
    again = build_zoo(cfg, tmp_path / "again", log=logs.append).parent
    assert any(line.startswith("base: reused from the pretrain cache") for line in logs)
    assert any(line.startswith("skills: reused from the pretrain cache") for line in logs)
    # A reused stage's time is its training's, said as such (it read "base: N tokens in 0s (0 CPU s)").
    base_line = next(line for line in logs if line.startswith("base: ") and "tokens" in line)
    assert " (trained in " in base_line and "s when cached), final loss " in base_line, base_line
    assert " CPU s" not in base_line
    assert any(line.startswith("skills stage: ") and "s when cached), final loss" in line for line in logs)
    # The manifest's timings are this build's: loading the cached stages, their training time beside.
    timings = json.loads((again / "manifest.json").read_text())["timings"]
    first = json.loads((tiny_zoo / "manifest.json").read_text())["timings"]
    for stage in ("base", "skills"):  # the training time of whichever build of the session trained it
        trained = first.get(f"{stage}_when_cached_s", first[f"{stage}_s"])
        assert timings[f"{stage}_when_cached_s"] == trained > 0 and timings[f"{stage}_s"] > 0
    monkeypatch.setenv("SIMMERGE_CACHE", str(tmp_path / "fresh-cache"))
    logs = []
    fresh = build_zoo(cfg, tmp_path / "fresh", log=logs.append).parent
    assert not any("pretrain cache" in line for line in logs)
    assert any(line.startswith("base: ") and " tokens in " in line and " CPU s), final loss " in line for line in logs)
    assert not any("when cached" in line for line in logs)
    digests = [json.loads((z / "manifest.json").read_text())["digests"] for z in (tiny_zoo, again, fresh)]
    assert digests[0] == digests[1] == digests[2]
    for name in ["base", *(v.name for _, v in cfg.experts())]:
        rel = f"checkpoints/{name}/model.safetensors"
        assert rel in digests[0]
        assert (tiny_zoo / rel).read_bytes() == (fresh / rel).read_bytes()

    entries = sorted((tmp_path / "fresh-cache" / "testbed-pretrain").iterdir())
    assert len(entries) == 2  # the pretrained base and its skills stage
    entry = entries[0]
    state = entry / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # truncated by a crash or a full disk
    messages: list[str] = []
    assert pretrain_cache.load(entry.name, messages.append) is None
    assert len(messages) == 1 and str(entry) in messages[0] and "rebuilding" in messages[0]


def test_pretrain_cache_store_keeps_a_twin_s_entry_and_replaces_a_corrupt_one(tmp_path, monkeypatch):
    """Two builds of one key may finish together: the second keeps the first's good entry (no
    raw rename error); an entry load() refuses is replaced by the new one."""
    from simmerge_ray.testbed import pretrain_cache

    monkeypatch.setenv("SIMMERGE_CACHE", str(tmp_path / "cache"))
    first = _training_result(torch.ones(3), 1.0)
    pretrain_cache.store("k", first)
    entry = next((tmp_path / "cache" / "testbed-pretrain").iterdir())
    before = (entry / "state.safetensors").stat().st_mtime_ns
    pretrain_cache.store("k", _training_result(torch.ones(3), 1.0))  # the twin
    assert (entry / "state.safetensors").stat().st_mtime_ns == before
    assert torch.equal(pretrain_cache.load("k")["state"]["w"], torch.ones(3))
    (entry / "meta.json").write_text("{")  # corrupt
    pretrain_cache.store("k", _training_result(torch.zeros(3), 2.0))
    got = pretrain_cache.load("k")
    assert torch.equal(got["state"]["w"], torch.zeros(3)) and got["losses"] == [3.0, 2.0]
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary or old folder left
    # Bytes damaged under an intact header (a bad disk, a partial copy) are a miss, not reused.
    state = entry / "state.safetensors"
    raw = bytearray(state.read_bytes())
    raw[-1] ^= 0xFF
    state.write_bytes(bytes(raw))
    messages: list[str] = []
    assert pretrain_cache.load("k", messages.append) is None
    assert "tensor bytes differ from their digest" in messages[0] and str(entry) in messages[0]


def _training_result(w: torch.Tensor, loss: float) -> dict:
    """A training result as `_train_remote` returns it (what the pretrain cache stores)."""
    return {"state": {"w": w}, "losses": [loss + 1.0, loss], "seconds": 3.5, "cpu_seconds": 7.0, "tokens": 512,
            "scores": {"code": {"score": 0.25, "loglik": -1.386, "accuracy": 0.5}}}


def test_a_pretrain_cache_entry_whose_result_lost_its_fields_is_a_logged_miss(tmp_path, monkeypatch):
    """An entry whose tensors match their digest but whose meta.json result lost its fields was
    served, and every build then died on KeyError 'seconds': the result is digested and its
    fields checked, so such an entry is a miss, logged with its path, and the next store heals it."""
    from simmerge_ray.testbed import pretrain_cache
    from simmerge_ray.io.digest_cache import json_digest

    monkeypatch.setenv("SIMMERGE_CACHE", str(tmp_path / "cache"))
    pretrain_cache.store("k", _training_result(torch.ones(3), 1.0))
    entry = tmp_path / "cache" / "testbed-pretrain" / "k"
    hit = pretrain_cache.load("k")
    assert hit["seconds"] == 3.5 and hit["losses"] == [2.0, 1.0] and hit["tokens"] == 512 and hit["cached"] is True
    assert hit["scores"] == {"code": {"score": 0.25, "loglik": -1.386, "accuracy": 0.5}}
    meta_path = entry / "meta.json"
    good = json.loads(meta_path.read_text())

    def damaged(result: object, *, redigest: bool, drop_digest: bool = False) -> str:
        meta = {**good, "result": result}
        if redigest:  # consistent with its digest, still not what a build can read
            meta["result_digest"] = json_digest(result)
        if drop_digest:  # written before the result had a digest
            del meta["result_digest"]
        meta_path.write_text(json.dumps(meta))
        messages: list[str] = []
        assert pretrain_cache.load("k", messages.append) is None
        assert len(messages) == 1 and str(entry) in messages[0] and "rebuilding" in messages[0], messages
        return messages[0]

    assert "differs from its digest" in damaged({}, redigest=False)  # the audit's case
    assert "differs from its digest" in damaged({**good["result"], "seconds": 9.0}, redigest=False)
    assert "has no 'seconds'" in damaged({k: v for k, v in good["result"].items() if k != "seconds"}, redigest=True)
    assert "'tokens' in meta.json is a bool, not int" in damaged({**good["result"], "tokens": True}, redigest=True)
    assert "'losses'" in damaged({**good["result"], "losses": []}, redigest=True)
    assert "scores of task 'code'" in damaged({**good["result"], "scores": {"code": {}}}, redigest=True)
    assert "not an object" in damaged([], redigest=True)
    assert "no digest of its result" in damaged(good["result"], redigest=False, drop_digest=True)
    pretrain_cache.store("k", _training_result(torch.zeros(3), 2.0))  # the rebuild replaces it
    healed = pretrain_cache.load("k")
    assert torch.equal(healed["state"]["w"], torch.zeros(3)) and healed["losses"] == [3.0, 2.0]
    assert [p.name for p in entry.parent.iterdir()] == ["k"]


def test_the_build_retrains_over_a_pretrain_entry_it_cannot_read(ray_cluster, tmp_path, monkeypatch):
    """Through the build's own path (_pretrained): the damaged entry is logged, the stage is
    trained again (here a stand-in task), its result returned and cached in place of the entry."""
    from simmerge_ray.testbed import pretrain_cache
    from simmerge_ray.testbed.build import _pretrained, pretrain_parts

    monkeypatch.setenv("SIMMERGE_CACHE", str(tmp_path / "cache"))
    cfg = ZooConfig.load(TINY)
    key = pretrain_cache.pretrain_key(pretrain_parts(cfg, "{}", "base"), "base")
    pretrain_cache.store(key, _training_result(torch.ones(3), 1.0))
    meta_path = tmp_path / "cache" / "testbed-pretrain" / key / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "result": {}}))
    logs: list[str] = []
    trained = _training_result(torch.full((3,), 2.0), 0.5)
    got = _pretrained(cfg, "{}", "base", lambda: ray_cluster.put(trained), logs.append)
    assert got["seconds"] == 3.5 and got["losses"] == [1.5, 0.5] and torch.equal(got["state"]["w"], torch.full((3,), 2.0))
    assert len(logs) == 1 and "ignoring unreadable entry" in logs[0] and key in logs[0]
    logs.clear()
    again = _pretrained(cfg, "{}", "base", lambda: pytest.fail("trained although the entry was healed"), logs.append)
    assert again["cached"] is True and again["losses"] == [1.5, 0.5]
    assert logs == [f"base: reused from the pretrain cache ({key[:12]})"]


def test_tiny_zoo_base_is_the_skills_stage(tiny_zoo):
    """The catalog's base is the pretrained model after its skills stage (rewritten domain text),
    which moved it and changed its scores; the manifest keeps the model before that stage."""
    manifest = json.loads((tiny_zoo / "manifest.json").read_text())
    assert 0 < manifest["pretrained"]["skills_move"] < 1
    scores = pl.read_parquet(tiny_zoo / "scores.parquet").filter(pl.col("model") == "base")
    base = {r["task"]: r["loglik"] for r in scores.iter_rows(named=True)}
    before = {t: s["loglik"] for t, s in manifest["pretrained"]["scores"].items()}
    assert base.keys() == before.keys() and all(base[t] != before[t] for t in base)
    assert set(manifest["losses"]) >= {"pretrained", "base"}


def test_tiny_zoo_catalog_and_checkpoints(tiny_zoo):
    cat = Catalog.load(tiny_zoo / "catalog.yaml")
    cfg = ZooConfig.load(TINY)
    assert cat.names == [v.name for _, v in cfg.experts()]
    assert sorted(cat.tasks) == sorted(cfg.domains)
    assert [m.name for m in cat.experts("math")] == ["math-a", "math-lora"]
    for path in [cat.base, *(m.path for m in cat.models)]:
        ck = Checkpoint.open(path)
        assert ck.config["model_type"] == "llama"
        assert ck.num_layers == 2
        assert (path / "tokenizer.json").exists()
    for t, entry in cat.tasks.items():
        evals = [json.loads(line) for line in entry.eval.read_text().splitlines()]
        probes = [json.loads(line) for line in entry.probes.read_text().splitlines()]
        assert len(evals) == cfg.data.eval_examples and set(evals[0]) == {"prompt", "answer"}
        assert len(probes) == cfg.data.probe_prompts and set(probes[0]) == {"text"}
    # the LoRA expert moved only linear layers (blocks and head), each by a rank <= 4 update
    base = load_file(str(cat.base / "model.safetensors"))
    lora = load_file(str(cat.model("math-lora").path / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(base[name], lora[name])
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"):
        assert 0 < torch.linalg.matrix_rank(lora[name] - base[name]) <= 4


def test_tiny_zoo_experts_beat_base_and_others_on_their_domain(tiny_zoo):
    scores = pl.read_parquet(tiny_zoo / "scores.parquet")
    s = {(r["model"], r["task"]): r["score"] for r in scores.iter_rows(named=True)}
    cfg = ZooConfig.load(TINY)
    for domain, v in cfg.experts():
        assert s[(v.name, domain)] > s[("base", domain)], (v.name, domain)
    for domain in cfg.domains:
        best_own = max(s[(v.name, domain)] for v in cfg.domains[domain].variants)
        others = [s[(v.name, domain)] for d, v in cfg.experts() if d != domain]
        assert best_own > max(others), domain


# ---- labels on the tiny zoo -------------------------------------------------------------------
def test_label_run_resumes_without_redoing_finished_plans(tiny_zoo, tmp_path):
    from simmerge_ray.testbed.labels import run_labels

    out = tmp_path / "labels"
    first = run_labels(tiny_zoo / "catalog.yaml", out, LABELS, max_plans=20, log=lambda *_: None)
    assert (first.computed, first.cached, first.complete) == (20, 0, False)
    assert not (out / "labels.parquet").exists()
    done = {p: p.stat().st_mtime_ns for p in (out / "cache").glob("*.json")}
    assert len(done) == 20
    # A corrupt entry (a killed disk, a truncated copy) is measured again, not a crash on every rerun.
    corrupt = sorted(done)[0]
    corrupt.write_text('{"models": ["a"], "sco')
    del done[corrupt]
    lines: list[str] = []

    second = run_labels(tiny_zoo / "catalog.yaml", out, LABELS, log=lines.append)
    assert second.cached == 19 and second.computed == second.total - 19 and second.complete
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    assert any(f"ignoring cache entry {corrupt}" in line for line in lines)
    assert "scores" in json.loads(corrupt.read_text())
    # An entry that reads but lacks a task's scores is measured again too (it raised a KeyError
    # while writing the tables, on every rerun).
    record = json.loads(corrupt.read_text())
    corrupt.write_text(json.dumps({**record, "scores": {}}))
    third = run_labels(tiny_zoo / "catalog.yaml", out, LABELS, log=lines.append)
    assert (third.cached, third.computed) == (second.total - 1, 1) and json.loads(corrupt.read_text()) == record
    # The key covers the eval sets as the base's tokenizer encodes them, not only their files:
    # with fewer BPE merges every plan is another measurement.
    copy = tmp_path / "zoo-copy"
    shutil.copytree(tiny_zoo, copy)
    tok_file = Catalog.load(copy / "catalog.yaml").base / "tokenizer.json"
    tok = json.loads(tok_file.read_text())
    tok["model"]["merges"] = tok["model"]["merges"][:20]
    tok_file.write_text(json.dumps(tok))
    retokenised = run_labels(copy / "catalog.yaml", out, LABELS, max_plans=0, log=lambda *_: None)
    assert (retokenised.cached, retokenised.complete) == (0, False)

    cat = Catalog.load(tiny_zoo / "catalog.yaml")
    experts = {m.name: m.task for m in cat.models}
    labels = pl.read_parquet(out / "labels.parquet")
    cross = sum(1 for a, b in itertools.permutations(experts, 2) if experts[a] != experts[b])
    info = json.loads((out / "label_summary.json").read_text())
    assert labels.height + info["dropped_2way_small_gap"] == cross * len(ARM_NAMES)
    # the checkpoints measured, as the feature stages record them (fit checks the two agree)
    assert info["checkpoints"] == {"base": Checkpoint.open(cat.base).fingerprint()} | {
        m.name: Checkpoint.open(m.path).fingerprint() for m in cat.models}
    assert info["pairs_2way"] == labels.select("task", "expert", "aux").unique().height == labels.height // len(ARM_NAMES)
    assert set(labels["operator"]) == set(ARM_NAMES)
    both = labels.filter(pl.col("aux_gap_closed").is_not_null())
    assert ((both["gap_closed"] + both["aux_gap_closed"]) / 2 - both["utility"]).abs().max() < 1e-12
    # a mirrored arm is one merge: linear_expert of (a, b) scored the same as linear_aux of (b, a)
    mirrored = labels.filter(pl.col("operator") == "linear_expert").join(
        labels.filter(pl.col("operator") == "linear_aux"), left_on=["expert", "aux"], right_on=["aux", "expert"])
    assert mirrored.height > 0 and (mirrored["s_merge_task"] - mirrored["s_merge_aux_task_right"]).abs().max() == 0
    recomputed = (labels["s_merge_task"] - labels["s_aux_task"]) / (labels["s_expert_task"] - labels["s_aux_task"])
    assert (recomputed - labels["gap_closed"]).abs().max() < 1e-12
    scores = pl.read_parquet(out / "model_scores.parquet")
    row = labels.row(0, named=True)
    s = {(r["model"], r["task"]): r["score"] for r in scores.iter_rows(named=True)}
    assert row["s_expert_task"] == s[(row["expert"], row["task"])]
    assert row["s_aux_aux_task"] == s[(row["aux"], row["aux_task"])]
    assert json.loads(row["params"]) == info["params"][row["operator"]]
    multi = pl.read_parquet(out / "labels_multiway.parquet")
    # weightings x (one sequence per step arm + mixed) x orders
    assert int((multi["k"] == 3).sum()) == 2 * 4 * 6 and int((multi["k"] == 4).sum()) == 2 * 4 * 4
    assert info["labels_3way"] == 48 and info["labels_4way"] == 32
    assert set(multi["weighting"]) == {"half", "anchor"}
    for r in multi.filter(pl.col("k") == 3).head(5).iter_rows(named=True):
        kept = json.loads(r["retention"])
        assert set(kept) == set(r["models"]) and r["expert_retention"] == kept[r["models"][0]]
        sc = json.loads(r["scores"])
        for m, t in zip(r["models"], r["model_tasks"]):
            assert kept[m] == pytest.approx(sc[t] / s[(m, t)] - 1)
        assert r["mean_retention"] == pytest.approx(sum(kept.values()) / 3)


def test_a_label_cache_of_the_wrong_kind_is_named_and_left_alone(tiny_zoo, tmp_path):
    """A file where the cache folder goes, or a folder where an entry goes, was a traceback (mkdir,
    unlink); neither is removed: simmerge did not write them."""
    from simmerge_ray.errors import OutputError
    from simmerge_ray.testbed.labels import run_labels

    out = tmp_path / "labels"
    out.mkdir()
    (out / "cache").write_text("mine")
    with pytest.raises(OutputError, match=r"cache: not a folder, where the label run keeps its cache"):
        run_labels(tiny_zoo / "catalog.yaml", out, LABELS, max_plans=1, log=lambda *_: None)
    assert (out / "cache").read_text() == "mine"
    (out / "cache").unlink()
    run_labels(tiny_zoo / "catalog.yaml", out, LABELS, max_plans=1, log=lambda *_: None)
    entry = next((out / "cache").glob("*.json"))
    entry.unlink()
    entry.mkdir()
    (entry / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"\.json: a folder, where the label cache keeps an entry"):
        run_labels(tiny_zoo / "catalog.yaml", out, LABELS, max_plans=1, log=lambda *_: None)
    assert (entry / "notes.txt").read_text() == "mine"


def test_a_label_cache_entry_is_served_only_under_its_digest(tiny_zoo, tmp_path):
    """A cache entry edited into other valid JSON (a score changed), copied under another plan's
    key, or stripped of its digest is a logged miss: removed, measured again, never served."""
    from simmerge_ray.testbed.labels import run_labels

    out = tmp_path / "labels"
    assert run_labels(tiny_zoo / "catalog.yaml", out, LABELS, max_plans=4, log=lambda *_: None).computed == 4
    entries = sorted((out / "cache").glob("*.json"))
    originals = {p: json.loads(p.read_text()) for p in entries}
    assert all(len(r["digest"]) == 32 for r in originals.values())
    edited, renamed, stripped, kept = entries
    task = next(iter(originals[edited]["scores"]))
    wrong = originals[edited]["scores"][task]["accuracy"] + 0.5
    edited.write_text(json.dumps({**originals[edited], "scores": {
        **originals[edited]["scores"], task: {**originals[edited]["scores"][task], "accuracy": wrong}}}))
    renamed.write_text(kept.read_text())  # the other plan's scores, with its (valid) digest
    stripped.write_text(json.dumps({k: v for k, v in originals[stripped].items() if k != "digest"}))
    lines: list[str] = []
    rerun = run_labels(tiny_zoo / "catalog.yaml", out, LABELS, max_plans=0, log=lines.append)
    assert (rerun.cached, rerun.computed) == (1, 0)
    assert sorted((out / "cache").glob("*.json")) == [kept]
    assert f"label: ignoring cache entry {edited} (digest mismatch); removed, measuring it again" in lines
    assert f"label: ignoring cache entry {renamed} (digest mismatch); removed, measuring it again" in lines
    assert any(line.startswith("label: ignoring 1 cache entries without a digest") and str(stripped) in line
               for line in lines)
    # measured again: the values of the first run, not the edited score
    again = run_labels(tiny_zoo / "catalog.yaml", out, LABELS, max_plans=3, log=lambda *_: None)
    assert (again.cached, again.computed) == (1, 3)
    assert {p: json.loads(p.read_text()) for p in entries} == originals


def test_a_model_named_base_is_refused_even_without_a_task(tiny_zoo, tmp_path):
    """A task-less model named 'base' stood for the catalog's base in the label keys and in
    label_summary.json's checkpoints, so fit then refused the labels as another base's."""
    from simmerge_ray.testbed.labels import check_label_catalog

    raw = yaml.safe_load((tiny_zoo / "catalog.yaml").read_text())
    raw["models"].append({"name": "base", "path": raw["models"][0]["path"]})
    (tiny_zoo / "named-base.yaml").write_text(yaml.safe_dump(raw))
    try:
        with pytest.raises(ConfigError, match="a model may not be named 'base'"):
            check_label_catalog(Catalog.load(tiny_zoo / "named-base.yaml"))
    finally:
        (tiny_zoo / "named-base.yaml").unlink()


def test_label_refuses_a_negative_max_plans(tmp_path, capsys):
    """`--max-plans -1` sliced todo[:-1]: every plan but one measured, exit 0. Refused by the
    parser in one line naming the flag (and by run_labels, its library entry), nothing written."""
    from simmerge_ray.cli import main
    from simmerge_ray.testbed.labels import run_labels

    out = tmp_path / "labels"
    with pytest.raises(SystemExit) as exc:
        main(["label", "--catalog", str(tmp_path / "catalog.yaml"), "--out", str(out), "--max-plans", "-1"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert err == "simmerge label: error: argument --max-plans: -1 is not at least 0 (see simmerge label --help)"
    with pytest.raises(ConfigError, match=r"^max_plans: -1 is not at least 0$"):
        run_labels(tmp_path / "catalog.yaml", out, LABELS, max_plans=-1, log=lambda *_: None)
    assert not out.exists()


def _joined_token(zoo: Path) -> str:
    """A token of the base's vocabulary of plain letters, two or more: split after its first letter
    into prompt and answer, the tokenizer joins them again."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(zoo / "checkpoints" / "base"))
    return sorted(t for t in tok.get_vocab() if t.isalpha() and t.isascii() and len(t) > 1
                  and tok.tokenize(t) == [t])[0]


def _prepend_unsplittable(zoo: Path) -> None:
    word = _joined_token(zoo)
    evals = zoo / "data" / "math" / "eval.jsonl"
    evals.write_text(json.dumps({"prompt": word[0], "answer": word[1:]}) + "\n" + evals.read_text())


def test_label_checks_the_base_tokenizer_and_every_config_before_any_work(tiny_zoo, tmp_path, capsys):
    """A base without tokenizer files, a config.json without model_type, or one whose sizes are not
    its weights' (base or expert): one line naming the folder or config.json, exit 2, before Ray
    is asked for anything (it was a transformers or Ray actor traceback), and no --out created."""
    from simmerge_ray.cli import main

    def broken(name: str, model: str, edit) -> Path:
        copy = tmp_path / name
        shutil.copytree(tiny_zoo, copy)
        edit(copy / "checkpoints" / model)
        return copy

    def set_config(**changes):
        def edit(folder: Path) -> None:
            cfg = json.loads((folder / "config.json").read_text())
            cfg.update(changes)
            (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
        return edit

    def no_tokenizer(folder: Path) -> None:
        for f in folder.glob("tokenizer*"):
            f.unlink()

    cfg = Checkpoint.open(tiny_zoo / "checkpoints" / "base").config
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    cases = [
        (broken("notok", "base", no_tokenizer), "checkpoints/base: the catalog's base has no tokenizer files"),
        (broken("notype", "base", set_config(model_type=None)),
         "checkpoints/base/config.json: model_type: missing or not a name"),
        (broken("wide", "base", set_config(intermediate_size=inter * 2)),
         f"checkpoints/base/config.json: does not match the weights beside it (against the model it describes, "
         f"the weights: shape of 'model.layers.0.mlp.down_proj.weight' is [{hidden}, {inter}] not "
         f"[{hidden}, {inter * 2}]"),
        (broken("deep", "rag-a", set_config(num_hidden_layers=3)),
         "checkpoints/rag-a/config.json: does not match the weights beside it (against the model it describes, "
         "the weights: lacks 'model.layers.2.input_layernorm.weight'"),
        # a one-letter prompt the tokenizer joins with its answer into one token: no prompt tokens to
        # score from (an actor's error without the file, after Ray had started)
        (broken("unsplit", "base", lambda folder: _prepend_unsplittable(folder.parents[1])),
         "data/math/eval.jsonl: eval example with prompt 'X': no prompt or answer tokens (the base's tokenizer, "
         "task 'math')".replace("X", _joined_token(tiny_zoo)[0])),
    ]
    for zoo, needle in cases:
        out = tmp_path / f"out-{zoo.name}"
        assert main(["label", "--catalog", str(zoo / "catalog.yaml"), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{zoo}/{needle}" in err, err
        assert not out.exists()


def test_label_encodes_the_eval_sets_once_on_the_driver(tiny_zoo, tmp_path, monkeypatch):
    """check_label_models encodes every eval set before Ray is asked for anything (an example the
    base's tokenizer cannot split is named there); run_labels encoded them all again for their
    digests. Now the run reuses the check's (the real function, spied on; the actors, given the
    catalog path, encode their own in their processes). Its last line counts distinct merges."""
    from simmerge_ray.pipeline.zoo import label
    from simmerge_ray.testbed import label_evals

    calls = []
    real = label_evals.encoded_evals
    monkeypatch.setattr(label_evals, "encoded_evals", lambda cat: (calls.append(cat.source), real(cat))[1])
    said: list[str] = []
    rep = label(tiny_zoo / "catalog.yaml", tmp_path / "labels", LabelSettings(), max_plans=2, echo=said.append)
    assert rep.computed == 2 and rep.total > 2 and not rep.complete
    assert len(calls) == 1
    # It ended "2 measured, 0 cached of N plans" where N counts distinct merges (a new user's review).
    assert said[-1] == (f"label: 2 measured, 0 cached of {rep.total} distinct merges in {rep.seconds:.0f}s "
                        f"(incomplete: rerun to resume) -> {tmp_path / 'labels'}")


def test_label_merge_matches_a_hand_merge(tiny_zoo, ray_cluster):
    """One plan measured by the actor equals merging and scoring by hand."""
    from transformers import AutoModelForCausalLM

    from simmerge_ray.testbed.evaluate import load_examples, score
    from simmerge_ray.testbed.labels import PlanEvaluator
    from simmerge_ray.testbed.tokenizer import load_tokenizer

    cat = Catalog.load(tiny_zoo / "catalog.yaml")
    actor = ray_cluster.remote(PlanEvaluator).remote(str(tiny_zoo / "catalog.yaml"))
    plans = [LabelPlan(("code-a", "rag-a"), ("linear",), tasks=("code", "rag")),
             LabelPlan(("code-a", "rag-a", "ml-a"), ("linear", "ties"), "equal", tasks=("code", "rag", "multilingual")),
             LabelPlan(("rag-a", "ml-a", "code-a"), ("linear", "linear"), "equal", tasks=("rag", "multilingual", "code"))]
    got = ray_cluster.get(actor.run.remote(plans))
    # per-example accuracies (for resampling the eval sets) average to the label's accuracy
    examples = ray_cluster.get(actor.example_accuracy.remote(plans[:2]))
    ray_cluster.kill(actor)
    for per_example, scores in zip(examples, got):
        assert set(per_example) == set(scores)
        for t, values in per_example.items():
            assert len(values) == len(load_examples(cat.tasks[t].eval))
            assert sum(values) / len(values) == pytest.approx(scores[t]["accuracy"], abs=1e-12)
    assert examples[0]["code"] != examples[1]["code"]
    a, b, c = (load_file(str(cat.model(m).path / "model.safetensors")) for m in ("code-a", "rag-a", "ml-a"))
    model = AutoModelForCausalLM.from_pretrained(str(cat.base))
    tok = load_tokenizer(cat.base)
    rag = encode(load_examples(cat.tasks["rag"].eval), tok, 192)
    model.load_state_dict({k: 0.5 * a[k] + 0.5 * b[k] for k in a})
    assert got[0]["rag"]["score"] == pytest.approx(score(model, rag)["score"], rel=1e-6)
    # the running mean of three, folded into one combination, is the mean of the three
    model.load_state_dict({k: (a[k] + b[k] + c[k]) / 3 for k in a})
    assert got[2]["rag"]["score"] == pytest.approx(score(model, rag)["score"], rel=1e-5)
    assert got[1]["rag"]["score"] != pytest.approx(got[2]["rag"]["score"], rel=1e-3)  # a TIES step is not


def test_a_gpt_neox_catalog_is_checked_and_labelled_under_its_loaded_names(tiny_zoo, tmp_path):
    """transformers saves GPT-NeoX's head as `embed_out.weight` and (from version 5) loads it as
    `lm_head.weight`: the config check refused a gpt_neox zoo's own checkpoints ("lacks
    'lm_head.weight'"), and with it skipped the label actors could not load their merges. A
    2-way linear label equals the score of the same merge written by `merge` and loaded by
    transformers."""
    from transformers import AutoModelForCausalLM

    from simmerge_ray.io.architecture import check_config_matches_weights
    from simmerge_ray.merge.config import MergeSpec
    from simmerge_ray.merge.executor import ExecOptions, run_merge
    from simmerge_ray.testbed.evaluate import load_examples, score
    from simmerge_ray.testbed.labels import PlanEvaluator, check_label_catalog, check_label_models
    from simmerge_ray.testbed.tokenizer import load_tokenizer

    tiny = Catalog.load(tiny_zoo / "catalog.yaml")
    tok = load_tokenizer(tiny.base)
    arch = ArchitectureConfig(type="gpt_neox", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                              max_position_embeddings=192)
    for name, seed in (("base", 0), ("code-a", 1), ("rag-a", 2)):
        model = init_model(arch, len(tok), tok.eos_token_id, tok.pad_token_id, seed=0)
        with torch.no_grad():  # a fine-tune's small move from the base
            g = torch.Generator().manual_seed(seed)
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g) * (name != "base"))
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    ck = Checkpoint.open(tmp_path / "code-a")
    assert "embed_out.weight" in ck.entries and "lm_head.weight" not in ck.entries
    check_config_matches_weights(ck)  # raised: lacks 'lm_head.weight'; has extra 'embed_out.weight'
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump({
        "base": str(tmp_path / "base"),
        "models": [{"name": m, "path": str(tmp_path / m), "task": t} for m, t in (("code-a", "code"), ("rag-a", "rag"))],
        "tasks": {t: {"probes": str(tiny.tasks[t].probes), "eval": str(tiny.tasks[t].eval)} for t in ("code", "rag")}}))
    cat = Catalog.load(tmp_path / "catalog.yaml")
    check_label_models(cat, check_label_catalog(cat))
    got = PlanEvaluator(str(tmp_path / "catalog.yaml")).run([LabelPlan(("code-a", "rag-a"), ("linear",), tasks=("code", "rag"))])
    spec = MergeSpec.from_dict({"merge_method": "linear", "dtype": "float32",
                                "models": [{"model": str(tmp_path / m), "parameters": {"weight": 0.5}}
                                           for m in ("code-a", "rag-a")]})
    run_merge(spec, tmp_path / "merged", ExecOptions(placement="local", workers=1))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager")
    for task in ("code", "rag"):
        want = score(merged, encode(load_examples(cat.tasks[task].eval), tok, 192))
        assert got[0][task]["score"] == pytest.approx(want["score"], rel=1e-5)
        assert got[0][task]["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)


def test_a_tied_expert_is_labelled_as_its_untied_twin(tiny_zoo, tmp_path):
    """An expert that ties its head (no lm_head.weight on disk) beside experts that store one is
    merged with its embedding as its head, as `merge` does, and scored untied: its labels equal
    those of a twin that stores that embedding as its head."""
    from simmerge_ray.io.synthetic import write_checkpoint
    from simmerge_ray.testbed.labels import PlanEvaluator

    raw = yaml.safe_load((tiny_zoo / "catalog.yaml").read_text())
    raw["base"] = str(tiny_zoo / raw["base"])
    for entry in raw["tasks"].values():
        entry.update({k: str(tiny_zoo / v) for k, v in entry.items()})
    src = Checkpoint.open(tiny_zoo / "checkpoints" / "code-a")
    tensors = {n: src.read(n) for n in src.entries}
    embed = tensors["model.embed_tokens.weight"]
    twins = {"tied": ({k: v for k, v in tensors.items() if k != "lm_head.weight"}, True),
             "twin": ({**tensors, "lm_head.weight": embed}, False)}
    plans = [LabelPlan(("code-a", "rag-a"), ("linear",), tasks=("code", "rag")),
             LabelPlan(("rag-a", "code-a"), ("ties",), tasks=("rag", "code")),
             LabelPlan(("code-a", "rag-a", "ml-a"), ("linear", "ties"), "equal", tasks=("code", "rag", "multilingual"))]
    got = {}
    for kind, (state, tie) in twins.items():
        write_checkpoint(tmp_path / kind, {**src.config, "tie_word_embeddings": tie},
                         [(n, tuple(t.shape), src.entries["model.embed_tokens.weight"].dtype, lambda t=t: t)
                          for n, t in state.items()], 10**9)
        models = [{**m, "path": str(tmp_path / kind if m["name"] == "code-a" else tiny_zoo / m["path"])}
                  for m in raw["models"]]
        (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump({**raw, "models": models}))
        got[kind] = PlanEvaluator(str(tmp_path / f"{kind}.yaml")).run(plans)
    assert Checkpoint.open(tmp_path / "tied").tied_head == "lm_head.weight"
    assert got["tied"] == got["twin"]
    assert got["tied"][0]["code"] != PlanEvaluator(str(tiny_zoo / "catalog.yaml")).run(plans[:1])[0]["code"]


def test_an_expert_with_an_extended_vocabulary_is_labelled_on_the_shared_rows(tiny_zoo, tmp_path):
    """An expert that added two chat tokens and padded its embedding and head (as a chat
    fine-tune ships) is merged and scored on the rows it shares with the base: its labels equal
    those of the expert it extends."""
    from simmerge_ray.testbed.labels import PlanEvaluator, check_label_catalog, check_label_models
    from vocab_fixtures import extended_copy  # beside this file (the tests folder is on sys.path)

    raw = yaml.safe_load((tiny_zoo / "catalog.yaml").read_text())
    raw["base"] = str(tiny_zoo / raw["base"])
    for entry in raw["tasks"].values():
        entry.update({k: str(tiny_zoo / v) for k, v in entry.items()})
    src = tiny_zoo / "checkpoints" / "code-a"
    ext = extended_copy(src, tmp_path / "ext", rows=Checkpoint.open(src).config["vocab_size"] + 6)
    models = [{**m, "path": str(ext if m["name"] == "code-a" else tiny_zoo / m["path"])} for m in raw["models"]]
    (tmp_path / "ext.yaml").write_text(yaml.safe_dump({**raw, "models": models}))
    cat = Catalog.load(tmp_path / "ext.yaml")
    check_label_models(cat, check_label_catalog(cat))  # accepted from the headers and tokenizers
    plans = [LabelPlan(("code-a", "rag-a"), ("ties",), tasks=("code", "rag")),
             LabelPlan(("code-a", "rag-a", "ml-a"), ("linear", "ties"), "equal", tasks=("code", "rag", "multilingual"))]
    got = PlanEvaluator(str(tmp_path / "ext.yaml")).run(plans)
    assert got == PlanEvaluator(str(tiny_zoo / "catalog.yaml")).run(plans)


# ---- pure parts -------------------------------------------------------------------------------
def test_gap_closed_and_tables_on_a_hand_checked_case():
    experts = {"c1": "code", "m1": "math", "m2": "math"}
    singles = {
        "c1": {"code": 0.30, "math": 0.10},
        "m1": {"code": 0.10, "math": 0.40},
        "m2": {"code": 0.2995, "math": 0.20},
    }
    results = [
        (LabelPlan(("c1", "m1"), ("linear",), tasks=("code", "math")), {"code": 0.25, "math": 0.31}),
        (LabelPlan(("c1", "m1"), ("ties",), tasks=("code", "math")), {"code": 0.20, "math": 0.37}),
        (LabelPlan(("c1", "m2"), ("linear",), tasks=("code", "math")), {"code": 0.29, "math": 0.15}),
        (LabelPlan(("m1", "c1"), ("linear",), tasks=("math", "code")), {"math": 0.31, "code": 0.25}),
    ]
    labels, dropped = pairwise_table(results, singles, experts, epsilon=1e-3)
    assert dropped == 1  # c1 vs m2 on code: gap 0.0005 < epsilon
    r = {(x["expert"], x["aux"], x["operator"]): x for x in labels.iter_rows(named=True)}
    assert r[("c1", "m1", "linear")]["gap_closed"] == pytest.approx((0.25 - 0.10) / (0.30 - 0.10))  # 0.75
    assert r[("c1", "m1", "linear")]["aux_gap_closed"] == pytest.approx((0.31 - 0.10) / (0.40 - 0.10))  # 0.7
    assert r[("c1", "m1", "ties")]["gap_closed"] == pytest.approx(0.5)
    assert r[("m1", "c1", "linear")]["gap_closed"] == pytest.approx((0.31 - 0.10) / (0.40 - 0.10))
    assert r[("c1", "m1", "linear")]["utility"] == pytest.approx((0.75 + 0.7) / 2)
    assert r[("c1", "m1", "ties")]["utility"] == pytest.approx((0.5 + 0.9) / 2)
    two_sided = {x["task"]: x for x in gap_summary(labels).iter_rows(named=True)}
    assert two_sided["code"]["oracle"] == pytest.approx(0.725) and two_sided["code"]["best_linear"] == 1
    summary = {x["task"]: x for x in gap_summary(labels, "gap_closed").iter_rows(named=True)}
    assert summary["code"]["linear"] == pytest.approx(0.75) and summary["code"]["ties"] == pytest.approx(0.5)
    assert summary["code"]["oracle"] == pytest.approx(0.75) and summary["code"]["best_linear"] == 1
    assert summary["mean"]["pairs"] == 2 and summary["mean"]["best_ties"] == 0
    # Pairs whose auxiliary side has no gap to close have no utility: with none left, the summary
    # is empty (it raised ColumnNotFoundError, after every plan had been measured).
    flat = {m: {"code": 0.2, "math": 0.2} for m in ("m1", "m2")}
    flat["c1"] = {"code": 0.3, "math": 0.2}
    labels, _ = pairwise_table(results[:2], flat, experts, epsilon=1e-3)
    assert labels.height == 2 and labels["utility"].null_count() == 2
    empty = gap_summary(labels)
    assert empty.is_empty() and {"linear", "ties", "oracle", "pairs", "best_linear"} <= set(empty.columns)

    multi = multiway_table([(LabelPlan(("c1", "m1", "m2"), ("linear", "ties"), "equal", tasks=("code", "math", "math")),
                             {"code": 0.24, "math": 0.3})], singles, experts)
    row = multi.row(0, named=True)
    assert row["k"] == 3 and row["task"] == "code" and row["operators"] == ["linear", "ties"]
    assert row["weighting"] == "equal" and row["model_tasks"] == ["code", "math", "math"]
    assert row["expert_retention"] == pytest.approx(0.24 / 0.30 - 1)
    kept = {"c1": 0.24 / 0.30 - 1, "m1": 0.3 / 0.4 - 1, "m2": 0.3 / 0.2 - 1}
    assert json.loads(row["retention"]) == pytest.approx(kept)
    assert row["mean_retention"] == pytest.approx(sum(kept.values()) / 3)


@pytest.mark.parametrize("field, value", [("subsets_3", True), ("seed", 1.0), ("orders_4", "8"),
                                          ("gap_epsilon", "0.1")])
def test_label_settings_refuse_a_count_or_number_of_another_type(field: str, value: object) -> None:
    """True was read as 1 and "0.1" as 0.1 (pydantic's lax mode), as the zoo config never reads them."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        LabelSettings(**{field: value})


def test_enumerate_plans_counts_and_sampling_is_seeded():
    experts = {f"{d}-{i}": d for d in ("a", "b", "c", "d") for i in range(2)}
    s = LabelSettings(subsets_3=2, subsets_4=1, mixed_3=2, mixed_4=5, orders_4=6)
    plans = enumerate_plans(experts, ["a", "b", "c", "d"], s)
    by_k = {k: [p for p in plans if p.k == k] for k in (1, 2, 3, 4)}
    assert len(by_k[1]) == 9  # base + 8 experts
    assert len(by_k[2]) == (8 * 6) * len(ARM_NAMES)  # ordered cross-task pairs x arms
    assert all(p.weighting is None for p in by_k[2])  # pairwise arms run as declared
    w = len(s.weightings)
    assert len(by_k[3]) == 2 * w * (3 + 2) * 6  # subsets x weightings x sequences x every order
    assert len(by_k[4]) == 1 * w * (3 + 5) * 6  # ... x sampled orders
    assert all(len({experts[m] for m in p.models}) == p.k for p in plans if p.k > 1)
    # every (weighting, arm sequence) rule of a subset is measured in the same orders, and the
    # first model of those orders takes every position
    for k in (3, 4):
        rules: dict = {}
        for p in by_k[k]:
            rules.setdefault((frozenset(p.models), p.weighting, p.operators), set()).add(p.models)
        orders = {frozenset(m): o for (m, _, _), o in rules.items()}
        assert all(o == orders[m] for (m, _, _), o in rules.items())
        for subset, o in orders.items():
            assert {order[0] for order in o} == set(subset) or k == 4
    assert sum(len(set(p.operators)) > 1 for p in by_k[4]) == w * 5 * 6
    assert plans == enumerate_plans(experts, ["a", "b", "c", "d"], s)
    assert plans != enumerate_plans(experts, ["a", "b", "c", "d"], s.model_copy(update={"seed": 1}))
    # a half-weighted fold is the merge the previous (unweighted) labels measured: same cache key
    fp = {m: m for m in experts} | {"base": "base"}
    digests = {t: t for t in "abcd"}
    p = by_k[3][0]
    half = LabelPlan(p.models, p.operators, "half", tasks=p.tasks)
    assert half.key(fp, digests) == LabelPlan(p.models, p.operators, tasks=p.tasks).key(fp, digests)
    assert LabelPlan(p.models, p.operators, "equal", tasks=p.tasks).key(fp, digests) != half.key(fp, digests)
    # a fold of linear steps is one linear combination, measured once: the running mean of three
    # models is the same merge in all six orders; half-weighted folds differ by their last model
    linear = {w: {LabelPlan(o, ("linear", "linear"), w, tasks=tuple(experts[m] for m in o)).key(fp, digests)
                  for o in itertools.permutations(p.models)} for w in ("equal", "half", "anchor")}
    assert {w: len(keys) for w, keys in linear.items()} == {"equal": 1, "half": 3, "anchor": 3}
    assert LabelPlan(p.models, ("linear", "ties"), "equal", tasks=p.tasks).key(fp, digests) not in linear["equal"]


def test_merge_state_dicts_operators():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 8, generator=g)}
    a = {"w": base["w"] + torch.randn(4, 8, generator=g) * 0.1}
    b = {"w": base["w"] + torch.randn(4, 8, generator=g) * 0.1}
    lin = merge_state_dicts("linear", [a, b], base, {"weight": [0.5, 0.5]})
    assert torch.allclose(lin["w"], 0.5 * a["w"] + 0.5 * b["w"])
    assert torch.equal(merge_state_dicts("slerp", [a, b], None, {"t": 0.0})["w"], a["w"])
    ties = merge_state_dicts("ties", [a, b], base, {"weight": [1.0, 1.0], "density": [1.0, 1.0]})
    da, db = a["w"] - base["w"], b["w"] - base["w"]
    agree = da.sign() == db.sign()
    assert torch.allclose(ties["w"][agree], (base["w"] + (da + db) / 2)[agree])
    with pytest.raises(MergeError, match="weight"):
        merge_state_dicts("linear", [a, b], None, {"weight": [1.0]})
    with pytest.raises(MergeError, match="missing"):
        merge_state_dicts("linear", [a, {"v": a["w"]}], None, {"weight": [0.5, 0.5]})


def test_lora_merges_back_to_the_same_function():
    arch = ArchitectureConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    model = init_model(arch, 300, 0, 1, seed=0)
    trainable = add_lora(model, rank=2, alpha=4.0, seed=0)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.05)
    x = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        wrapped = model(input_ids=x).logits
        merge_lora(model)
        merged = model(input_ids=x).logits
    assert torch.allclose(wrapped, merged, atol=1e-5)
    assert all(type(m).__name__ != "LoRALinear" for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt_neox"])
def test_every_supported_architecture_builds_and_runs(arch):
    cfg = ArchitectureConfig(type=arch, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    m1 = init_model(cfg, 300, 0, 1, seed=3)
    m2 = init_model(cfg, 300, 0, 1, seed=3)
    assert m1.config.model_type == arch
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert m1(input_ids=torch.randint(0, 300, (1, 8))).logits.shape == (1, 8, 300)


def test_held_out_items_never_reach_training():
    for name in ("math", "rag", "instruct"):
        dom = DOMAINS[name]
        train = set(itertools.islice(dom.train_texts(0), 3000))
        held = [e.text for e in itertools.islice(dom.examples("eval", 0), 200)]
        assert len(held) == 200 and not train & set(held), name
    code_eval = {ex.prompt for ex in itertools.islice(DOMAINS["code"].examples("eval", 0), 20)}
    code_train = "".join(itertools.islice(DOMAINS["code"].train_texts(0), 4000))
    assert not any(p in code_train for p in code_eval)
    ml_eval = {ex.prompt.split("\n")[0] for ex in itertools.islice(DOMAINS["multilingual"].examples("eval", 0), 50)}
    ml_train = {t.split("\n")[0] for t in itertools.islice(DOMAINS["multilingual"].train_texts(0), 5000)}
    assert ml_eval and not ml_eval & ml_train


def test_generated_languages_follow_their_grammar():
    """Each invented language applies its own word order, adjective side and markers, with one
    fixed lexicon whatever the seed; the held-out sentences are unseen combinations."""
    from simmerge_ray.testbed.domains.multilingual import LANGUAGES, _LEXICONS, make_example

    lex = {lang.name: _LEXICONS[lang.name] for lang in LANGUAGES}
    assert all(len(set(v.values())) == len(v) for v in lex.values())  # one word per lemma
    rng = random.Random(3)
    seen = {lang.name: 0 for lang in LANGUAGES}
    for _ in range(300):
        ex = make_example(rng)
        english, name = ex.prompt.removeprefix("English: ").removesuffix(":").split("\n")
        lang = next(lang for lang in LANGUAGES if lang.name == name)
        seen[name] += 1
        words = ex.answer.split()
        assert ex.answer.startswith(" ") and words.count(lang.article) == 2
        if lang.order == "SOV":  # the verb (and its past marker) ends the sentence
            assert words[-1] == lang.past_particle or words[-1] in lex[name].values()
        if lang.order == "VSO":
            assert words[0] in lex[name].values() and words[0] != lang.article
        if lang.order == "SVO":
            assert words[0] == lang.article
        past = english.split()[3] in {v[2] for v in _VERBS}
        assert (lang.past_particle in words) == past
    assert min(seen.values()) > 50
    # Velan puts the adjective after the noun: "the red fox ..." -> "lo <fox> <red> ..."
    velan = next(lang for lang in LANGUAGES if lang.name == "Velan")
    fox, red = lex["Velan"]["fox"], lex["Velan"]["red"]
    while True:
        ex = make_example(rng)
        if ex.prompt.startswith("English: the red fox ") and ex.prompt.endswith("Velan:"):
            assert f" {velan.article} {fox} {red} " in ex.answer + " "
            break


def test_an_eval_file_skips_blank_lines_and_names_a_bad_one(tmp_path):
    from simmerge_ray.testbed.evaluate import load_examples

    f = tmp_path / "eval.jsonl"
    f.write_text('\n{"prompt": "q1", "answer": "a1"}\n  \n{"prompt": "q2", "answer": "a2"}\n\n')
    assert [(e.prompt, e.answer) for e in load_examples(f)] == [("q1", "a1"), ("q2", "a2")]
    f.write_text('{"prompt": "q1", "answer": "a1"}\n\n[1]\n')
    with pytest.raises(ConfigError, match=rf"^{f}: line 3: expected a JSON object"):
        load_examples(f)
    f.write_text("\n \n")
    with pytest.raises(ConfigError, match=rf"^{f}: empty eval set$"):
        load_examples(f)


def test_eval_encoding_marks_exactly_the_answer_tokens():
    from simmerge_ray.testbed.domains.base import Example

    tok = train_tokenizer(["Problem: 3 + 4\nAnswer: 7\n" * 50, "Passage: x y\nAnswer: Kalo Asas\n" * 50], 300)
    exs = [Example("Problem: 3 + 4\nAnswer:", " 7"), Example("Passage: x y\nAnswer:", " Kalo Asas")]
    enc = encode(exs, tok, 64)
    for i, ex in enumerate(exs):
        targets = enc.input_ids[i, 1:][enc.target_mask[i, :-1]]
        assert tok.decode(targets.tolist()) == ex.answer
        assert int(enc.attention_mask[i].sum()) == len(tok(ex.text)["input_ids"])


def test_the_documented_zoo_config_loads(tmp_path):
    """docs/testbed.md's annotated zoo YAML is a config the loader accepts (it listed one domain
    where two are required), with the defaults it shows."""
    from simmerge_ray.testbed.zoo_config import ZooConfig

    text = (Path(__file__).resolve().parents[1] / "docs" / "testbed.md").read_text()
    example = text.split("### Zoo config (YAML)\n\n```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "zoo.yaml").write_text(example)
    cfg = ZooConfig.load(tmp_path / "zoo.yaml")
    assert sorted(cfg.domains) == ["code", "math"] and cfg.skills is not None and cfg.continued is not None
    assert [(d, v.name) for d, v in cfg.experts()][:2] == [("code", "code-l"), ("math", "math-s")]


def test_zoo_config_errors_name_the_field(tmp_path):
    good = ZooConfig.load(DEFAULT)
    assert len(good.experts()) == 15 and sum(v.lora is not None for _, v in good.experts()) == 4
    bad = tmp_path / "zoo.yaml"
    bad.write_text(TINY.read_text().replace("multilingual:", "klingon:"))
    with pytest.raises(ConfigError, match=r"zoo\.yaml: domains: .*klingon"):
        ZooConfig.load(bad)
    bad.write_text(TINY.read_text().replace("name: rag-a", "name: code-a"))
    with pytest.raises(ConfigError, match="code-a"):
        ZooConfig.load(bad)
    bad.write_text(TINY.read_text().replace("num_heads: 2", "num_heads: 3"))
    with pytest.raises(ConfigError, match="architecture.*num_heads"):
        ZooConfig.load(bad)
    bad.write_text(TINY.read_text().replace("{name: code-a, steps: 40, lr: 0.004", "{name: code-a, steps: 40, lr: .inf"))
    with pytest.raises(ConfigError, match="lr"):  # used to fail inside a Ray task, after pretraining
        ZooConfig.load(bad)
    # The digest keys the weights: how many workers build them is not part of it, a learning rate is.
    digest = ZooConfig.load(TINY).digest()
    bad.write_text(TINY.read_text().replace("runtime: {workers: 2}", "runtime: {workers: 1}"))
    assert ZooConfig.load(bad).digest() == digest
    bad.write_text(TINY.read_text().replace("{name: code-a, steps: 40, lr: 0.004", "{name: code-a, steps: 40, lr: 0.005"))
    assert ZooConfig.load(bad).digest() != digest
    bad.write_text(TINY.read_text().replace("{name: code-a, steps: 40,", "{name: code-a, subset: [150, 200], steps: 40,"))
    with pytest.raises(ConfigError, match=r"subset is \(index, of\) with 0 <= index < of <= 100"):
        ZooConfig.load(bad)  # used to stream forever: items fall in 100 buckets


@pytest.mark.parametrize("old, new, field", [
    ("base: {steps: 60,", "base: {steps: true,", r"base\.steps: Input should be a valid integer \(got True\)"),
    ("batch_size: 8, warmup_steps: 5", "batch_size: 8.0, warmup_steps: 5", r"base\.batch_size: .*integer"),
    ("seed: 1}", "seed: 1, threads: '2'}", r"base\.threads: .*integer \(got '2'\)"),
    ("domain_share: 0.3,", "domain_share: false,", r"base\.domain_share: .*number \(got False\)"),
    ("lr: 0.01, seed: 22", "lr: true, seed: 22", r"domains\.math\.variants\.1\.lr: .*number"),
    ("head: true", "head: 1", r"domains\.math\.variants\.1\.lora\.head: .*boolean"),
    ("alpha: 8,", "alpha: .inf,", r"domains\.math\.variants\.1\.lora\.alpha: .*finite"),
    ("subset: [0, 2]", "subset: [true, 2]", r"domains\.multilingual\.variants\.0\.subset\.0: .*integer"),
    ("runtime: {workers: 2}", "runtime: {workers: true}", r"runtime\.workers: .*integer"),
    ("vocab_size: 384", "vocab_size: 384.0", r"tokenizer\.vocab_size: .*integer"),
])
def test_zoo_config_numbers_and_flags_take_their_own_type(tmp_path, old, new, field):
    """Pydantic's lax mode read `steps: true` as 1 (and 8.0 as 8, '2' as 2, `head: 1` as True):
    a typo trained another zoo without a word. Each is now one error naming the file and field."""
    assert TINY.read_text().count(old) == 1
    bad = tmp_path / "zoo.yaml"
    bad.write_text(TINY.read_text().replace(old, new))
    with pytest.raises(ConfigError, match=r"zoo\.yaml: " + field) as e:
        ZooConfig.load(bad)
    assert len(str(e.value).splitlines()) == 1


def test_zoo_config_floats_still_take_yaml_ints(tmp_path):
    """A guard on the strict types (passes with and without them): a float field given a YAML int
    (`lr: 1`, `alpha: 8`, `domain_share: 1`) is that number, with the digest the same values
    written as floats give; an int with a fraction stays refused."""
    raw = TINY.read_text()
    (tmp_path / "frac.yaml").write_text(raw.replace("batch_size: 8, warmup_steps: 5", "batch_size: 8.5, warmup_steps: 5"))
    with pytest.raises(ConfigError, match=r"frac\.yaml: base\.batch_size: Input should be a valid integer"):
        ZooConfig.load(tmp_path / "frac.yaml")
    ints = tmp_path / "ints.yaml"
    ints.write_text(raw.replace("lr: 0.01, seed: 22", "lr: 1, seed: 22").replace("domain_share: 0.8", "domain_share: 1"))
    floats = tmp_path / "floats.yaml"
    floats.write_text(raw.replace("lr: 0.01, seed: 22", "lr: 1.0, seed: 22").replace("domain_share: 0.8", "domain_share: 1.0")
                      .replace("alpha: 8,", "alpha: 8.0,"))
    a, b = ZooConfig.load(ints), ZooConfig.load(floats)
    lora = next(v for _, v in a.experts() if v.name == "math-lora")
    assert lora.lr == 1.0 and isinstance(lora.lr, float) and lora.lora.alpha == 8.0 and a.skills.domain_share == 1.0
    assert a.digest() == b.digest()
    assert ZooConfig.load(TINY).digest() == "b090030aae5391034eef3b5c"  # valid configs keep their digest (and caches)


@pytest.mark.parametrize("name", ["..", "."])
def test_an_expert_named_dot_or_dotdot_is_refused_before_any_work(tmp_path, capsys, name):
    """`checkpoints/..` is the zoo root: an expert named `..` wrote its checkpoint files there. The
    name is refused, one line naming the file and field, and nothing is written."""
    from simmerge_ray.cli import main

    bad = tmp_path / "zoo.yaml"
    bad.write_text(TINY.read_text().replace("name: rag-a", f"name: '{name}'"))
    assert main(["zoo", "build", "--config", str(bad), "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"zoo.yaml: domains.rag.variants.0.name: Value error, must be non-empty with no slashes or " \
           f"whitespace, and not '.' or '..'" in err
    assert not (tmp_path / "z").exists()


def test_pretraining_threads_beyond_any_node_are_refused_before_training(ray_cluster, tmp_path, capsys):
    """A stage asking more CPUs (`threads`) than any node has was never scheduled: the build hung
    in silence. It is one line naming the field and the cluster's CPUs (4 in the tests' Ray), and
    no output. Run in a thread, so that a regression fails here instead of hanging the suite."""
    import threading

    from simmerge_ray.cli import main

    raw = TINY.read_text()
    for old, new, field in (("seed: 1}", "seed: 1, threads: 8}", "base"), ("seed: 2}", "seed: 2, threads: 5}", "skills")):
        bad = tmp_path / f"{field}.yaml"
        bad.write_text(raw.replace(old, new))
        out = tmp_path / f"z-{field}"
        rc: list[int] = []
        worker = threading.Thread(target=lambda: rc.append(main(["zoo", "build", "--config", str(bad), "--out", str(out)])),
                                  daemon=True)
        worker.start()
        worker.join(120)
        assert rc == [2], "zoo build neither failed nor finished in 120 s (the infeasible task waits forever)"
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        want = 8 if field == "base" else 5
        assert err.startswith(f"simmerge zoo: error: {bad}: {field}.threads: the {field} pretraining task asks for "
                              f"CPU={want} "), err
        assert "the most: 4;" in err, err
        assert not out.exists()


def test_a_later_stage_beyond_any_node_is_refused_before_the_base_trains(ray_cluster, tmp_path, capsys, monkeypatch):
    """Every stage the cache lacks is checked once the tokenizer exists: a `skills.threads` no node
    has was refused only after the base (a miss) had trained, minutes to hours later."""
    from simmerge_ray.cli import main
    from simmerge_ray.io.digest_cache import cache_root

    monkeypatch.setenv("SIMMERGE_CACHE", str(tmp_path / "cold-cache"))  # the base is a miss
    raw = TINY.read_text()
    bad = tmp_path / "zoo.yaml"
    bad.write_text(raw.replace("seed: 2}", "seed: 2, threads: 5}"))
    out = tmp_path / "z"
    assert main(["zoo", "build", "--config", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}: skills.threads: the skills pretraining task asks for CPU=5 " in err, err
    assert not (cache_root() / "testbed-pretrain").exists()  # nothing trained, nothing cached
    assert not out.exists()


def test_cached_pretraining_builds_whatever_threads_it_was_trained_with(tiny_zoo, tmp_path, capsys):
    """`threads` shapes the weights (it is in the cache key), so a zoo pretrained with 8 threads on a
    large machine keeps `threads: 8` when rebuilt on a smaller cluster. With its base and skills
    stages cached, nothing asks for 8 CPUs: the build runs (it was refused, as an uncached one is)
    and gives the same experts as the same stages trained with the default threads."""
    from simmerge_ray.io.digest_cache import cache_root
    from simmerge_ray.testbed import pretrain_cache
    from simmerge_ray.cli import main
    from simmerge_ray.testbed.build import _tokenizer_corpus, pretrain_parts

    raw = TINY.read_text()
    assert raw.count("seed: 1}") == 1 and raw.count("seed: 2}") == 1
    big = tmp_path / "zoo-8-threads.yaml"
    big.write_text(raw.replace("seed: 1}", "seed: 1, threads: 8}").replace("seed: 2}", "seed: 2, threads: 8}"))
    small, large = ZooConfig.load(TINY), ZooConfig.load(big)
    tok_json = train_tokenizer(_tokenizer_corpus(small), small.tokenizer.vocab_size).backend_tokenizer.to_str()
    root = cache_root() / "testbed-pretrain"
    for role in ("base", "skills"):  # as if trained with 8 threads elsewhere: the same tensors under its key
        have = root / pretrain_cache.pretrain_key(pretrain_parts(small, tok_json, role), role)
        want = root / pretrain_cache.pretrain_key(pretrain_parts(large, tok_json, role), role)
        assert have.is_dir() and have != want
        shutil.copytree(have, want, dirs_exist_ok=True)
    assert main(["zoo", "build", "--config", str(big), "--out", str(tmp_path / "z")]) == 0
    out = capsys.readouterr().out
    assert "base: reused" in out and "skills: reused" in out, out
    built = tmp_path / "z"
    for name in ("base", "code-a", "math-lora"):
        ours = load_file(str(built / "checkpoints" / name / "model.safetensors"))
        theirs = load_file(str(tiny_zoo / "checkpoints" / name / "model.safetensors"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_the_order_of_the_domains_is_part_of_the_pretraining_key(tmp_path):
    """The pretraining mixture draws its domain streams in config order, so two configs that list
    the same domains in another order train other bases: their cache keys and digests differ (the
    key sorted the domains, and a reordered config reused the other's base)."""
    from simmerge_ray.testbed.build import pretrain_parts
    from simmerge_ray.testbed.pretrain_cache import pretrain_key

    raw = yaml.safe_load(TINY.read_text())
    raw["domains"] = dict(reversed(list(raw["domains"].items())))
    (tmp_path / "reordered.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    a, b = ZooConfig.load(TINY), ZooConfig.load(tmp_path / "reordered.yaml")
    assert sorted(a.domains) == sorted(b.domains) and list(a.domains) != list(b.domains)
    assert a.digest() != b.digest()
    for role in ("base", "skills", "continued"):
        assert pretrain_key(pretrain_parts(a, "{}", role), role) != pretrain_key(pretrain_parts(b, "{}", role), role)
    assert pretrain_key(pretrain_parts(a, "{}", "base"), "base") == pretrain_key(pretrain_parts(ZooConfig.load(TINY), "{}", "base"), "base")


def test_cli_reports_bad_inputs_without_traceback(tmp_path, capsys):
    from simmerge_ray.cli import main

    assert main(["zoo", "build", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "z")]) == 2
    assert "none.yaml: zoo config not found" in capsys.readouterr().err
    cat = tmp_path / "catalog.yaml"
    cat.write_text(f"models:\n  - {{name: a, path: {tmp_path}}}\n")  # no base
    assert main(["label", "--catalog", str(cat), "--out", str(tmp_path / "l")]) == 2
    assert "base" in capsys.readouterr().err


def test_score_equals_a_per_example_computation():
    """The batched, length-sorted score equals scoring each example on its own."""
    import math

    from simmerge_ray.testbed.domains.base import Example
    from simmerge_ray.testbed.evaluate import score

    tok = train_tokenizer(["Problem: 12 + 30\nAnswer: 42\nPassage: a b c d e f\nAnswer: Kalo\n" * 40], 300)
    arch = ArchitectureConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    model = init_model(arch, len(tok), tok.eos_token_id, tok.pad_token_id, seed=1).eval()
    exs = [Example("Problem: 12 + 30\nAnswer:", " 42"), Example("Passage: a b c d e f\nAnswer:", " Kalo"),
           Example("Problem: 1\nAnswer:", " 12 + 30 42")]
    got = score(model, encode(exs, tok, 64), batch_size=2)
    per_example = []
    with torch.no_grad():
        for ex in exs:
            n_prompt = len(tok(ex.prompt)["input_ids"])
            ids = torch.tensor([tok(ex.text)["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            lps = [logp[j - 1, ids[0, j]] for j in range(n_prompt, ids.shape[1])]
            per_example.append(float(sum(lps) / len(lps)))
    want = sum(per_example) / len(per_example)
    assert got["loglik"] == pytest.approx(want, abs=1e-5)
    assert got["score"] == pytest.approx(math.exp(want), rel=1e-5)
    # A tokenizer without a pad token (Llama's and Mistral's ship none) encodes too: padding is
    # masked and past every row's end, so the scores are the same (label was a TypeError traceback).
    tok.pad_token = None
    assert tok.pad_token_id is None
    assert score(model, encode(exs, tok, 64), batch_size=2) == got


def test_label_output_checks_come_before_any_work(tiny_zoo, tmp_path, capsys):
    """`label --out` inside a model, on a file, or over a user's own label tables: one line, exit
    2, nothing written."""
    from simmerge_ray.cli import main

    cat = Catalog.load(tiny_zoo / "catalog.yaml")
    model = cat.models[0].path
    afile = tmp_path / "afile"
    afile.write_text("x")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "labels.parquet").write_bytes(b"my own labels")
    # A model folder that looks like an old labels folder: still an input, never adopted.
    summary = Path(model) / "label_summary.json"
    summary.write_text(json.dumps({"settings": {}, "plans": 1, "labels_2way": 1}))
    try:
        before = sorted(p.name for p in Path(model).iterdir())
        for out, needle in ((Path(model) / "labels", "lies inside the input"), (Path(model), "the output is the input"),
                            (afile, "not a folder"), (mine, "labels.parquet: not written by simmerge")):
            assert main(["label", "--catalog", str(tiny_zoo / "catalog.yaml"), "--out", str(out)]) == 2
            err = capsys.readouterr().err.strip()
            assert needle in err and len(err.splitlines()) == 1, err
        assert sorted(p.name for p in Path(model).iterdir()) == before  # no stage marker written into the model
    finally:
        for f in (summary, Path(model) / ".simmerge-stage-labels.json"):
            f.unlink(missing_ok=True)
    assert (mine / "labels.parquet").read_bytes() == b"my own labels" and afile.read_text() == "x"


def test_a_finished_stage_whose_outputs_changed_runs_again(tiny_zoo, tmp_path):
    """A stage's marker records the files it wrote: a finished stage is reused while they are as
    it left them; removed or truncated, it runs again (it used to be reused on its marker alone, and
    the next stage failed on the missing file, on every rerun)."""
    from simmerge_ray.pipeline import PipelineSettings, run

    settings = PipelineSettings(TINY, tmp_path / "run")
    lines: list[str] = []
    run(settings, echo=lines.append, until="zoo")
    assert lines[0] == "[1/1] zoo           build the testbed (pretrain a base, fine-tune experts) ..."
    assert [line for line in lines if line.startswith("zoo: ")] == [  # the stage's own lines reach echo too
        f"zoo: 6 experts + base -> {tmp_path / 'run' / 'zoo' / 'catalog.yaml'}"]
    marker = json.loads((tmp_path / "run" / ".stage-zoo.json").read_text())
    weights = "zoo/checkpoints/base/model.safetensors"
    assert weights in marker["files"] and "zoo/catalog.yaml" in marker["files"]
    lines.clear()
    run(settings, echo=lines.append, until="zoo")
    assert lines == [f"[1/1] zoo           done earlier ({marker['seconds']:.0f} s), reused"]
    (tmp_path / "run" / "notes.txt").write_text("mine")  # not the stage's: changes nothing
    path = tmp_path / "run" / weights
    path.write_bytes(path.read_bytes()[:100])
    lines.clear()
    run(settings, echo=lines.append, until="zoo")
    assert lines[0] == f"[1/1] zoo           1 of its outputs changed since it finished ({weights}); running it again"
    assert path.stat().st_size == marker["files"][weights][0]
