"""Checkpoints of architectures that tie their head to an embedding of another name than llama's
(`model.embed_tokens`): GPT-2 stores `transformer.wte` and no `lm_head`. Such a zoo was refused
by the config check of `features functional` ("lacks 'lm_head.weight'") though transformers
loads it; and a config.json written before transformers recorded `tie_word_embeddings` (absent:
transformers' default, which is to tie) was read as untied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.synthetic_lm import make_corpus, train_tokenizer
from simmerge_ray.errors import CheckpointError
from simmerge_ray.io.architecture import check_config_matches_weights
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, run_merge
from input_checks import cli_status  # beside this file
from mergekit_oracle import load_all, run_mergekit  # beside this file


@pytest.fixture(scope="module")
def gpt2_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 base, two fine-tune-like variants (tied heads, as transformers saves them),
    probe files and a catalog."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    tok = train_tokenizer(make_corpus(300, seed=3))
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok), n_positions=64,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg)
    for name, scale in (("base", 0.0), ("ft0", 0.01), ("ft1", 0.02)):
        model = GPT2LMHeadModel(cfg)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    for task in ("code", "math"):
        (root / f"{task}.txt").write_text("\n".join(make_corpus(6, seed=hash(task) % 100, max_words=8)) + "\n")
    (root / "catalog.yaml").write_text(yaml.safe_dump({
        "base": "base", "models": [{"name": "ft0", "path": "ft0", "task": "code"},
                                   {"name": "ft1", "path": "ft1", "task": "math"}],
        "tasks": {t: {"probes": f"{t}.txt"} for t in ("code", "math")}}))
    return root


def _with_config(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_a_gpt2_head_is_tied_to_its_wte(gpt2_zoo: Path, tmp_path: Path) -> None:
    ck = Checkpoint.open(gpt2_zoo / "ft0")
    assert "lm_head.weight" not in ck.entries and ck.config["tie_word_embeddings"] is True
    assert ck.tied_head == "lm_head.weight" and ck.stored_name("lm_head.weight") == "transformer.wte.weight"
    check_config_matches_weights(ck)  # raised: lacks 'lm_head.weight'
    # A config.json without the key ties where the weights do; one that says false does not, and
    # the model it describes then lacks its head.
    old = Checkpoint.open(_with_config(gpt2_zoo / "ft0", tmp_path / "old", lambda c: c.pop("tie_word_embeddings")))
    assert old.tied_head == "lm_head.weight"
    check_config_matches_weights(old)
    untied = Checkpoint.open(_with_config(gpt2_zoo / "ft0", tmp_path / "untied",
                                          lambda c: c.update(tie_word_embeddings=False)))
    assert untied.tied_head is None
    with pytest.raises(CheckpointError, match=r"config.json: does not match the weights beside it .*lacks 'lm_head.weight'"):
        check_config_matches_weights(untied)


def test_a_gpt2_merge_matches_mergekit(gpt2_zoo: Path, tmp_path: Path) -> None:
    cfg = {"merge_method": "ties", "base_model": "base", "dtype": "float32",
           "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}} for m in ("ft0", "ft1")]}
    (gpt2_zoo / "ties.yaml").write_text(yaml.safe_dump(cfg))
    run_merge(MergeSpec.load(gpt2_zoo / "ties.yaml"), tmp_path / "ours", ExecOptions())
    run_mergekit(cfg, gpt2_zoo, tmp_path / "mergekit")
    ours, theirs = load_all(tmp_path / "ours"), load_all(tmp_path / "mergekit")
    assert set(ours) == set(theirs) and "lm_head.weight" not in ours
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_functional_features_of_a_gpt2_zoo(ray_cluster, gpt2_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats"
    assert cli_status(["features", "structural", "--catalog", str(gpt2_zoo / "catalog.yaml"), "--out", str(out)]) == 0
    assert cli_status(["features", "functional", "--catalog", str(gpt2_zoo / "catalog.yaml"), "--out", str(out)]) == 0
    import polars as pl

    table = pl.read_parquet(out / "features.parquet")
    assert set(zip(table["a"].to_list(), table["b"].to_list())) == {("ft0", "ft1"), ("ft1", "ft0")}
    assert set(table["task"].to_list()) == {"code", "math"} and table.height == 4
    assert table.select(pl.col("f_act_cos_mean").is_finite().all()).item()


def test_a_zoo_of_tied_models_is_labelled_as_transformers_loads_it(ray_cluster, gpt2_zoo: Path, tmp_path: Path) -> None:
    """Every model tied (no head stored anywhere): the scoring model's state dict lists the tied
    head under its own name, so a strict load of the merged weights was a traceback from the
    label actor ("Missing key(s): lm_head.weight"). The scores are those of transformers'
    own loading of each model (its head is its wte)."""
    import polars as pl
    from transformers import AutoModelForCausalLM

    from simmerge_ray.catalog import Catalog
    from simmerge_ray.testbed import label_evals
    from simmerge_ray.testbed.evaluate import score

    for task in ("code", "math"):
        (gpt2_zoo / f"{task}.eval.jsonl").write_text("".join(
            json.dumps({"prompt": p, "answer": " " + p.split()[-1]}) + "\n" for p in make_corpus(8, seed=len(task))))
    catalog = yaml.safe_load((gpt2_zoo / "catalog.yaml").read_text())
    for t in ("code", "math"):
        catalog["tasks"][t]["eval"] = f"{t}.eval.jsonl"
    (gpt2_zoo / "labelled.yaml").write_text(yaml.safe_dump(catalog))
    assert cli_status(["label", "--catalog", str(gpt2_zoo / "labelled.yaml"), "--out", str(tmp_path / "labels"),
                       "--metric", "score"]) == 0  # the smooth likelihood: a head other than wte would show
    alone = pl.read_parquet(tmp_path / "labels" / "model_scores.parquet")
    evals = label_evals.encoded_evals(Catalog.load(gpt2_zoo / "labelled.yaml"))
    model = AutoModelForCausalLM.from_pretrained(gpt2_zoo / "ft0", attn_implementation="eager", dtype=torch.float32)
    want = score(model, evals["code"])
    row = alone.filter((pl.col("model") == "ft0") & (pl.col("task") == "code")).to_dicts()
    assert len(row) == 1 and abs(row[0]["score"] - want["score"]) < 1e-6, (row, want)
