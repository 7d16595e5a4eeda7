"""Multi-document configs whose later merge builds its vocabulary from an earlier merge's output,
with real tokenizers and models of different vocabularies: `tokenizer_source: union`, `base`,
the earlier merge by name, and the `tokenizer:` block (per-token sources naming the earlier merge,
forcing, padding) with a chat template. The result equals mergekit-multi's on the same file (the
tokens, the added tokens, every token's rows) and the documents run one by one by hand (byte for
byte); the dry run's estimate of the later merge is the one of its document run alone on the
written intermediate; an interrupted run resumes unless a tokenizer file the kept merge read
changed. Real checkpoints, real merges; the interruption is a checkpoint's corrupt bytes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from simmerge_ray.cli import main as cli_main
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.estimate import estimate_merge, estimate_stages
from simmerge_ray.merge.executor import ExecOptions
from simmerge_ray.merge.multi import load_multi
from mergekit_oracle import load_all, run_mergekit_multi
from test_mergekit_tokenizer_dtype import _tokenizer
from test_merge_multi import _interrupted, _leftovers, _merge, _write

# Three vocabularies that share only part of their words, in other orders, each with its own
# special token: a (26 words), b (26, reversed, 16 shared with a), c (26, 10 shared with b).
WORDS = {"a": [f"w{i}" for i in range(26)], "b": [f"w{i}" for i in range(10, 36)][::-1],
         "c": [f"w{i}" for i in range(26, 52)]}
SPECIAL = {"a": "<|im_start|>", "b": "<|tool|>", "c": "<|c|>"}
F32 = {"dtype": "float32", "out_dtype": "float32"}
OPTS = ExecOptions(workers=1)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def zoo(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """a, b and c of one architecture (llama, or qwen2, whose tokenizer class adds <|endoftext|>
    on load when absent: each has it, with a row)."""
    root = tmp_path_factory.mktemp(f"multi-vocab-{request.param}")
    for seed, name in enumerate(WORDS, start=1):
        tok = _tokenizer(WORDS[name], SPECIAL[name])
        if request.param == "qwen2":
            tok.add_special_tokens({"pad_token": "<|endoftext|>"})
        spec = SyntheticSpec(architecture=request.param, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                             vocab_size=len(tok.get_vocab()), seed=seed, dtype="float32")
        make_checkpoint(root / name, spec)
        tok.save_pretrained(root / name)
    return root


@pytest.fixture
def models(zoo: Path, tmp_path: Path) -> Path:
    """A copy each test may corrupt or edit."""
    return Path(shutil.copytree(zoo, tmp_path / "models"))


def _first(m: Path, case: str = "union") -> dict:
    """`ab`: a linear merge of a and b on a's vocabulary extended by b's (union); `block`: that by
    the `tokenizer:` block, padded to a multiple of 8 (its config's vocab_size past its tokens),
    with a forced row and a chat template."""
    doc = {"name": "ab", "merge_method": "linear", "base_model": str(m / "a"), "tokenizer_source": "union",
           "models": [{"model": str(m / "a"), "parameters": {"weight": 0.6}},
                      {"model": str(m / "b"), "parameters": {"weight": 0.4}}], **F32}
    if case == "block":
        del doc["tokenizer_source"]
        doc["chat_template"] = "chatml"
        doc["tokenizer"] = {"source": "union", "pad_to_multiple_of": 8, "tokens": {
            "<|tool|>": {"source": str(m / "b"), "force": True}}}
    return doc


def _second(m: Path, case: str) -> dict:
    """The final: SLERP of `ab` with c, its vocabulary built from `ab`'s output as `case` says."""
    doc = {"merge_method": "slerp", "base_model": "ab", "parameters": {"t": 0.3},
           "models": [{"model": "ab"}, {"model": str(m / "c")}], **F32}
    if case == "union":
        doc["tokenizer_source"] = "union"
    elif case == "base":
        doc["tokenizer_source"] = "base"
    elif case == "by_name":  # the earlier merge named as the tokenizer's model
        doc["tokenizer_source"] = "ab"
    elif case == "block":
        doc["chat_template"] = "chatml"
        doc["tokenizer"] = {"source": "union", "pad_to_multiple_of": 8, "tokens": {
            "<|im_start|>": {"source": "ab"},
            "<|c|>": {"source": {"kind": "zero"}, "force": True},
            "w12": {"source": {"kind": "model_token", "model": str(m / "c"), "token": "w30"}, "force": True},
            "<new>": {"source": {"kind": "model_token", "model": "ab", "token": "w3"}}}}
    return doc


# (the first merge's tokenizer, the final's)
CASES = [("union", "union"), ("union", "base"), ("union", "by_name"), ("union", "block"), ("block", "union"),
         ("block", "base")]


def _by_hand(docs: list[dict], folder: Path) -> Path:
    """The documents run one by one with `simmerge merge`, the name `ab` replaced by the folder the
    first wrote; returns the final's folder."""
    folder.mkdir()
    first = {k: v for k, v in docs[0].items() if k != "name"}
    assert _merge(_write(folder / "ab.yaml", [first]), "--out", folder / "ab") == 0
    second = _substituted(docs[1], folder / "ab")
    assert _merge(_write(folder / "final.yaml", [second]), "--out", folder / "final") == 0
    return folder / "final"


def _substituted(doc: dict, ab: Path) -> dict:
    from simmerge_ray.merge.model_refs import substitute_refs

    return substitute_refs(doc, lambda _, ref: str(ab) if ref == "ab" else ref)


def _files(out: Path) -> dict[str, bytes]:
    """The weights, the index, config.json and the tokenizer's files (the model card and recorded
    config say how the output was made, which differs by design)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.suffix == ".safetensors" or p.name in ("model.safetensors.index.json", "config.json",
                                                        *TOKENIZER_FILES)}


def _same_as_mergekit(ours: Path, mk: Path, case: str) -> None:
    """mergekit's tokens and added tokens; every token's embedding and head rows equal mergekit's
    (compared by token: mergekit numbers the tokens `union` adds in a hash order, in both merges),
    every other tensor too, to the multi-document oracle tests' tolerance."""
    from transformers import AutoTokenizer

    mine, theirs = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(mk)
    vo, vm = mine.get_vocab(), theirs.get_vocab()
    assert set(vo) == set(vm), case
    assert {t for t, i in vo.items() if i in mine.added_tokens_decoder} == \
           {t for t, i in vm.items() if i in theirs.added_tokens_decoder}, case
    assert (mine.chat_template is None) == (theirs.chat_template is None), case
    if mine.chat_template is not None:  # the text differs by design (merge/chat_templates.py), not the rendering
        chat = [{"role": "user", "content": "w3 w30"}, {"role": "assistant", "content": "w12"}]
        for gen in (False, True):
            assert mine.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == \
                   theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    a, b = load_all(ours), load_all(mk)
    assert sorted(a) == sorted(b) and a
    rows = json.loads((ours / "config.json").read_text())["vocab_size"]
    assert rows == json.loads((mk / "config.json").read_text())["vocab_size"], case
    tol = {"rtol": 2e-6, "atol": 2e-6}
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32 and a[name].shape == b[name].shape, name
        if "embed_tokens" in name or "lm_head" in name:
            assert a[name].shape[0] == rows
            for tok, i in vo.items():
                torch.testing.assert_close(a[name][i], b[name][vm[tok]], **tol, msg=f"{case} {name} {tok!r}")
            torch.testing.assert_close(a[name][len(vo):], b[name][len(vm):], **tol)  # padding
        else:
            torch.testing.assert_close(a[name], b[name], **tol, msg=f"{case} {name}")


@pytest.mark.parametrize("first, case", CASES)
def test_a_later_merge_builds_its_vocabulary_from_the_earlier_output(models: Path, tmp_path: Path, first: str,
                                                                     case: str) -> None:
    """`ab` (union of a and b), then SLERP of `ab` with c, the tokenizer `case`: mergekit-multi's
    tokens and rows, and the documents run by hand byte for byte (weights and tokenizer files)."""
    docs = [_first(models, first), _second(models, case)]
    cfg = _write(tmp_path / "multi.yaml", docs)
    assert _merge(cfg, "--out", tmp_path / "ours") == 0
    assert _leftovers(tmp_path) == []
    run_mergekit_multi(cfg, tmp_path / "theirs", tmp_path / "mk-intermediates")
    _same_as_mergekit(tmp_path / "ours", tmp_path / "theirs", case)
    got, want = _files(tmp_path / "ours"), _files(_by_hand(docs, tmp_path / "by-hand"))
    assert "tokenizer.json" in got and any(k.endswith(".safetensors") for k in got)
    assert got == want
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tmp_path / "ours").get_vocab()
    rows = json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"]
    if case in ("union", "block"):  # every model's tokens: c's too
        assert {"w0", "w35", "w51", "<|im_start|>", "<|tool|>", "<|c|>"} <= set(vocab)
    else:  # ab's vocabulary: a's and b's tokens, none of c's own
        assert {"w0", "w35", "<|tool|>"} <= set(vocab) and not {"w51", "<|c|>"} & set(vocab)
    assert rows == (len(vocab) + 7) // 8 * 8 if case == "block" else rows == len(vocab)
    if case == "block":
        embed = load_all(tmp_path / "ours")["model.embed_tokens.weight"]
        assert not embed[vocab["<|c|>"]].any() and "<new>" in vocab


@pytest.mark.parametrize("first, case", CASES)
def test_the_dry_run_plans_the_later_merge_on_the_earlier_vocabulary(models: Path, tmp_path: Path, first: str,
                                                                     case: str) -> None:
    """Each merge's estimate (bytes read and written, peak, tensors, shards) equals the one of its
    document run alone: the second's on the intermediate written for real, whose vocabulary (rows
    of the embedding and head) the stand-in must have."""
    docs = [_first(models, first), _second(models, case)]
    cfg = _write(tmp_path / "multi.yaml", docs)
    est = estimate_stages(load_multi(cfg).graph, OPTS)
    assert [s.name for s in est.stages] == ["ab", "the final"]
    first = MergeSpec.from_dict({k: v for k, v in docs[0].items() if k != "name"}, source="first")
    assert est.stages[0].estimate == estimate_merge(first, OPTS)
    ab = tmp_path / "by-hand" / "ab"
    ab.parent.mkdir()
    assert _merge(_write(ab.parent / "ab.yaml", [docs[0]]), "--out", ab) == 0
    alone = estimate_merge(MergeSpec.from_dict(_substituted(docs[1], ab), source="second"), OPTS)
    got = est.stages[1].estimate
    assert (got.bytes_read, got.bytes_written, got.peak_bytes_per_worker, got.tensors, got.shards) == (
        alone.bytes_read, alone.bytes_written, alone.peak_bytes_per_worker, alone.tensors, alone.shards)
    assert got == alone
    assert est.stages[0].estimate.bytes_written == sum(p.stat().st_size for p in ab.glob("*.safetensors"))
    assert _merge(cfg, "--out", tmp_path / "dry", "--dry-run") == 0
    assert not (tmp_path / "dry").exists() and _leftovers(tmp_path) == []


def _swap_words(model: Path, x: str, y: str) -> None:
    """Exchange two words' ids in the model's tokenizer.json (its rows now name other tokens)."""
    f = model / "tokenizer.json"
    state = json.loads(f.read_text())
    vocab = state["model"]["vocab"]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    f.write_text(json.dumps(state))


@pytest.mark.parametrize("edit", [False, True])
def test_an_interrupted_run_resumes_unless_a_tokenizer_it_read_changed(models: Path, tmp_path: Path, capsys,
                                                                       caplog, edit: bool) -> None:
    """The final reads c, whose data is corrupt (header and tokenizer intact): the run fails after
    `ab`, which is kept. Mended, the same command reuses `ab`; with a's tokenizer.json edited
    (two words' ids exchanged, so `ab`'s union vocabulary maps other rows) it makes `ab` again.
    Either way the output is the one an uninterrupted run writes from the models as they are."""
    cfg, out, shard, raw, work = _interrupted([_first(models), _second(models, "union")], models / "c", tmp_path,
                                              capsys, caplog)
    assert {"ab", "ab.key.json"} <= {p.name for p in work.iterdir()}
    shard.write_bytes(raw)
    if edit:
        _swap_words(models / "a", "w3", "w4")
    caplog.clear()
    assert cli_main(["merge", str(cfg), "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    if edit:
        assert "2 merge(s)" in printed and "resuming" not in printed
        assert f"removed {work}" in caplog.text
    else:
        assert "1 merge(s), resuming" in printed and str(work) in caplog.text
    assert _leftovers(tmp_path) == []
    assert _merge(cfg, "--out", tmp_path / "fresh") == 0
    assert _files(out) == _files(tmp_path / "fresh")
    if edit:  # the edit reached the output: not the merge of the models as they were
        (tmp_path / "old").mkdir()
        _swap_words(models / "a", "w3", "w4")
        assert _merge(cfg, "--out", tmp_path / "old" / "merged") == 0
        assert _files(out) != _files(tmp_path / "old" / "merged")


def test_the_dry_run_warns_of_remapped_ids_as_the_run_does(models: Path, tmp_path: Path, caplog) -> None:
    """Without a tokenizer setting, models of one vocabulary size whose tokenizers map ids to
    other tokens are merged id by id, with a warning naming the first id. The final reads `ab`
    (a's vocabulary, `tokenizer_source: base`) and a copy of a with two words' ids exchanged: the
    dry run warns as the run does, though `ab`'s tokenizer is not written yet."""
    shutil.copytree(models / "a", models / "a-swapped")
    _swap_words(models / "a-swapped", "w3", "w4")
    first = {**_first(models), "tokenizer_source": "base"}
    final = {"merge_method": "linear", "models": [{"model": "ab", "parameters": {"weight": 0.5}},
                                                  {"model": str(models / "a-swapped"), "parameters": {"weight": 0.5}}],
             **F32}
    cfg = _write(tmp_path / "multi.yaml", [first, final])
    caplog.set_level(logging.WARNING)
    assert _merge(cfg, "--out", tmp_path / "dry", "--dry-run") == 0
    dry = [r.getMessage() for r in caplog.records if "map 2 token id(s) to different tokens" in r.getMessage()]
    caplog.clear()
    assert _merge(cfg, "--out", tmp_path / "merged") == 0
    run = [r.getMessage() for r in caplog.records if "map 2 token id(s) to different tokens" in r.getMessage()]
    assert len(run) == 1 and "(first: id 6, 'w3' and 'w4')" in run[0], run
    assert len(dry) == 1 and dry[0].endswith(run[0].split(" map ", 1)[1]), (dry, run)
    assert str(models / "a-swapped") in dry[0]
