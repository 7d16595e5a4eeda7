"""Vocabularies, chat templates and the compute dtype, against mergekit run in-process.

Two tiny checkpoints (llama, and qwen2; gpt_neox checked without mergekit) whose word-level tokenizers share only part of their
vocabulary, in another order, each with its own special token: the output tokenizer (`union`,
`base`, a model, the `tokenizer:` block with per-token sources, forcing and padding) holds
mergekit's tokens, and every token's embedding and head row equals mergekit's. mergekit numbers
the tokens `union` adds in a hash order, so rows are compared by token. BPE tokenizers with
tokens past the model's vocab_size are trimmed as mergekit trims them. Merges compute in `dtype`
as mergekit does (bf16, fp16), without `dtype` in the inputs' dtype, or in float32 with the
option.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from mergekit_oracle import load_all, make_zoo, run_mergekit, ulps

from simmerge_ray.features.module_groups import is_vocabulary_name
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint
from simmerge_ray.merge.chat_templates import NAMES
from simmerge_ray.errors import ConfigError, SimMergeError
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, run_merge

WORDS = {"a": [f"w{i}" for i in range(26)], "b": [f"w{i}" for i in range(10, 36)][::-1]}
SPECIAL = {"a": "<|im_start|>", "b": "<|tool|>"}


def _tokenizer(words: list[str], special: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out.add_special_tokens({"additional_special_tokens": [special]})
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per architecture (llama, qwen2, gpt_neox), models a and b: different vocabularies (30 tokens each,
    16 shared words)."""
    out = {}
    for arch in ("llama", "qwen2", "gpt_neox"):
        root = out[arch] = tmp_path_factory.mktemp(f"vocab-{arch}")
        for seed, name in enumerate(("a", "b"), start=1):
            tok = _tokenizer(WORDS[name], SPECIAL[name])
            if arch == "qwen2":  # its tokenizer class adds <|endoftext|> when absent: give it a row
                tok.add_special_tokens({"pad_token": "<|endoftext|>"})
            spec = SyntheticSpec(architecture=arch, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                                 vocab_size=len(tok.get_vocab()), seed=seed)
            make_checkpoint(root / name, spec)
            tok.save_pretrained(root / name)
    return out


@pytest.fixture(scope="module")
def pair(pairs: dict[str, Path]) -> Path:
    return pairs["llama"]


def _both(cfg: dict, root: Path, tmp: Path, opts: ExecOptions = ExecOptions()) -> tuple[Path, Path]:
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run_merge(MergeSpec.load(root / "cfg.yaml"), tmp / "ours", opts)
    run_mergekit(cfg, root, tmp / "mk", copy_tokenizer=True)
    return tmp / "ours", tmp / "mk"


TOKENIZER_CASES = {
    "union_linear": {"merge_method": "linear", "base_model": "a", "tokenizer_source": "union", "models": [
        {"model": "a", "parameters": {"weight": 0.6}}, {"model": "b", "parameters": {"weight": 0.4}}]},
    "model_source_ties_fp16": {"merge_method": "ties", "base_model": "a", "tokenizer_source": "b",
                               "parameters": {"density": 0.5, "weight": 1.0}, "dtype": "float16",
                               "models": [{"model": "a"}, {"model": "b"}]},
    "base_slerp": {"merge_method": "slerp", "base_model": "b", "tokenizer_source": "base", "parameters": {"t": 0.3},
                   "models": [{"model": "a"}, {"model": "b"}]},
    "block_bf16": {"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.3}, "dtype": "bfloat16",
                   "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
                       "<|im_start|>": {"source": "a"},
                       "<|tool|>": {"source": {"kind": "zero"}, "force": True},
                       "w3": {"source": {"kind": "model_token", "model": "b", "token": "w20"}, "force": True},
                       "<new>": {"source": {"kind": "model_token", "model": "a", "token_id": 5}}}},
                   "models": [{"model": "a"}, {"model": "b"}]},
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_vocabulary_matches_mergekit(pairs: dict[str, Path], tmp_path: Path, case: str, arch: str) -> None:
    cfg = {"dtype": "float32", **TOKENIZER_CASES[case]}
    _check_vocabulary(cfg, pairs[arch], tmp_path, case)


def test_gpt_neox_embedding_rows_follow_their_tokens(pairs: dict[str, Path], tmp_path: Path) -> None:
    """GPT-NeoX's input embedding (`embed_in`) is re-indexed with its head: a union
    merge's row of every word both models know is the weighted mean of their rows of that word.
    Its embedding was merged by id before (the head re-indexed, the embedding not: 30 rows under a
    config of the union's size). mergekit cannot run here as the oracle: its GPT-NeoX file asks for
    `attention.bias`, which transformers no longer stores."""
    from transformers import AutoTokenizer

    root = pairs["gpt_neox"]
    cfg = {"dtype": "float32", "merge_method": "linear", "tokenizer_source": "union",
           "models": [{"model": str(root / "a"), "parameters": {"weight": 0.6}},
                      {"model": str(root / "b"), "parameters": {"weight": 0.4}}]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run_merge(MergeSpec.load(tmp_path / "cfg.yaml"), tmp_path / "ours", ExecOptions())
    out, a, b = (load_all(p) for p in (tmp_path / "ours", root / "a", root / "b"))
    vo, va, vb = (AutoTokenizer.from_pretrained(p).get_vocab() for p in (tmp_path / "ours", root / "a", root / "b"))
    rows = json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"]
    both = sorted(set(va) & set(vb) - {"<unk>", "<s>", "</s>"})
    assert len(both) == 16
    vocabulary = sorted(n for n in out if out[n].shape[0] == rows)
    assert vocabulary == ["gpt_neox.embed_in.weight", "lm_head.weight"] and rows > 30  # transformers names its head so
    for name in vocabulary:
        for w in both:
            want = 0.6 * a[name][va[w]].float() + 0.4 * b[name][vb[w]].float()
            torch.testing.assert_close(out[name][vo[w]], want, msg=f"{name} {w}")


@pytest.mark.parametrize("case", ["union_linear", "model_source_ties_fp16"])
def test_remapped_rows_merge_the_same_in_small_work_units(pair: Path, tmp_path: Path, case: str) -> None:
    """Tensors whose rows are remapped to the output vocabulary are merged whole: work units
    smaller than the embedding (many workers on a large model) must not cut them into element
    ranges, which once wrote the whole tensor at every range's offset and published a file
    safetensors could not read."""
    from safetensors.torch import load_file

    (pair / "cfg.yaml").write_text(yaml.safe_dump({"dtype": "float32", **TOKENIZER_CASES[case]}))
    spec = MergeSpec.load(pair / "cfg.yaml")
    run_merge(spec, tmp_path / "whole", ExecOptions(workers=1))
    run_merge(spec, tmp_path / "small", ExecOptions(workers=2, unit_elems=100))
    whole, small = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "small" / "model.safetensors")
    assert whole["model.embed_tokens.weight"].numel() > 100  # the embedding is larger than a unit
    assert sorted(whole) == sorted(small)
    for name in whole:
        assert torch.equal(whole[name], small[name]), name


def _check_vocabulary(cfg: dict, root: Path, tmp_path: Path, case: str) -> dict[str, int]:
    """Our tokenizer's tokens (added ones too) and every token's embedding and head rows are
    mergekit's; returns our vocabulary."""
    from transformers import AutoTokenizer

    ours, mk = _both(cfg, root, tmp_path)
    mine, theirs = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(mk)
    vo, vm = mine.get_vocab(), theirs.get_vocab()
    assert set(vo) == set(vm)
    assert {t for t, i in vo.items() if i in mine.added_tokens_decoder} == \
           {t for t, i in vm.items() if i in theirs.added_tokens_decoder}
    a, b = load_all(ours), load_all(mk)
    assert sorted(a) == sorted(b)
    rows = json.loads((ours / "config.json").read_text())["vocab_size"]
    assert rows == json.loads((mk / "config.json").read_text())["vocab_size"]
    for name in a:
        assert a[name].shape == b[name].shape, name
        if is_vocabulary_name(name):
            assert a[name].shape[0] == rows
            for tok, i in vo.items():
                if i >= rows:  # a special token the tokenizer's own files add back on load (both sides)
                    continue
                torch.testing.assert_close(a[name][i], b[name][vm[tok]], msg=f"{case} {name} {tok!r}")
            torch.testing.assert_close(a[name][len(vo):], b[name][len(vm):])  # padding: the rows' mean
        else:  # SLERP's float32 arithmetic may differ from mergekit's in the last bit
            torch.testing.assert_close(a[name], b[name], msg=f"{case} {name}")
    if case == "block_bf16":  # a forced zero row, and a row borrowed from another token of b
        embed = next(t for n, t in a.items() if n.endswith(("embed_tokens.weight", "embed_in.weight")))
        assert not embed[vo["<|tool|>"]].any()
        assert embed[vo["w3"]].any()
    return vo


def _bpe(words: list[str], past: list[str], added_past: str):
    """A BPE tokenizer: characters, `words` made by one merge each, then the characters `past`
    and the special token `added_past`, which the model (vocab_size: the tokens before them) has
    no rows for."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted({c for w in words for c in w} - set(past))
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *chars, *words, *past])}
    tok = Tokenizer(models.BPE(vocab, [(w[0], w[1:]) for w in words], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out.add_special_tokens({"additional_special_tokens": [added_past]})
    return out, len(vocab) - len(past)


@pytest.fixture(scope="module")
def past_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama models a and b whose BPE tokenizers hold tokens past their config's vocab_size
    (a's "z" and "<|a_pad|>", b's "q" and "<|b_pad|>"; a's merge z + 1 names one): mergekit
    trims them from the base's tokenizer."""
    root = tmp_path_factory.mktemp("past")
    words = {"a": [f"w{i}" for i in range(8)] + ["x1", "z1"], "b": [f"x{i}" for i in range(8)] + ["w1", "w9"]}
    past = {"a": ["z"], "b": ["q"]}
    for seed, name in enumerate(("a", "b"), start=1):
        tok, rows = _bpe(words[name], past[name], f"<|{name}_pad|>")
        make_checkpoint(root / name, SyntheticSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                                   vocab_size=rows, seed=seed))
        tok.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("source", ["union", "base"])
def test_tokens_past_vocab_size_are_trimmed_as_mergekit(past_pair: Path, tmp_path: Path, source: str) -> None:
    cfg = {"merge_method": "linear", "dtype": "float32", "base_model": "a", "tokenizer_source": source, "models": [
        {"model": "a", "parameters": {"weight": 0.6}}, {"model": "b", "parameters": {"weight": 0.4}}]}
    vocab = _check_vocabulary(cfg, past_pair, tmp_path, source)
    rows = json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"]
    assert not {"z", "q", "<|b_pad|>"} & set(vocab) and "z1" in vocab
    if source == "base":  # trimmed; its tokenizer_config.json names it, so it comes back on load, without a row
        assert vocab["<|a_pad|>"] >= rows
    assert ("w9" in vocab) == (source == "union")
    merges = json.loads((tmp_path / "ours" / "tokenizer.json").read_text())["model"]["merges"]
    assert ["w", "1"] in merges and ["z", "1"] not in merges


def test_tokens_past_vocab_size_refused_unless_bpe(pair: Path, tmp_path: Path) -> None:
    """Only a BPE tokenizer can be trimmed (mergekit's rule): a word-level one with a token past
    vocab_size fails before any tensor, in one line naming the file, the model and the token."""
    from transformers import AutoTokenizer

    if not (pair / "p").exists():
        _copy_model(pair / "a", pair / "p")
        tok = AutoTokenizer.from_pretrained(pair / "p")
        tok.add_special_tokens({"additional_special_tokens": ["<|past|>"]})
        tok.save_pretrained(pair / "p")
    cfg = {"merge_method": "linear", "base_model": "p", "tokenizer_source": "union",
           "models": [{"model": "p", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 1.0}}]}
    (pair / "past.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as err:
        run_merge(MergeSpec.load(pair / "past.yaml"), tmp_path / "out", ExecOptions())
    msg = str(err.value)
    assert "\n" not in msg and "past.yaml" in msg and "'p'" in msg and "'<|past|>'" in msg and "WordLevel" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(NAMES))
def test_named_chat_template_renders_as_mergekits(pair: Path, tmp_path: Path, name: str) -> None:
    from transformers import AutoTokenizer

    cfg = {"merge_method": "linear", "dtype": "float32", "chat_template": name,
           "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 1.0}}]}
    if name == "chatml":  # with a built tokenizer too
        cfg["tokenizer_source"] = "a"
    cfg["models"][1]["model"] = "a2"
    (pair / "a2").exists() or _copy_model(pair / "a", pair / "a2")
    ours, mk = _both(cfg, pair, tmp_path)
    mine, theirs = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(mk)
    # how simmerge loaded the inputs (local files only) is not written into the published tokenizer
    assert "local_files_only" not in json.loads((Path(ours) / "tokenizer_config.json").read_text())
    chats = [[{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"},
              {"role": "user", "content": "more"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]]
    for chat in chats:
        for gen in (False, True):
            want = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert mine.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == want


def test_a_chat_template_is_written_with_a_vocab_json_tokenizer(pair: Path, tmp_path: Path) -> None:
    """An older checkpoint's tokenizer (vocab.json + merges.txt, no tokenizer.json) takes the
    config's chat template as mergekit does: the merge wrote no tokenizer at all for it."""
    import json
    import shutil

    from transformers import AutoTokenizer

    words = ["<|endoftext|>", *(f"w{i}" for i in range(20))]
    for name in ("old1", "old2"):
        if not (pair / name).exists():
            (pair / name).mkdir()
            for f in ("model.safetensors", "config.json"):
                shutil.copy2(pair / "a" / f, pair / name / f)
            (pair / name / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
            (pair / name / "merges.txt").write_text("#version: 0.2\n")
            (pair / name / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 64}))
    cfg = {"merge_method": "linear", "dtype": "float32", "chat_template": "chatml",
           "models": [{"model": "old1", "parameters": {"weight": 1.0}}, {"model": "old2", "parameters": {"weight": 1.0}}]}
    ours, mk = _both(cfg, pair, tmp_path)
    mine, theirs = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(mk)
    chat = [{"role": "user", "content": "w3 w4"}]
    want = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user" in want and mine.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == want
    assert mine.get_vocab() == theirs.get_vocab()
    # Tokenizer files transformers cannot read: one line naming the folder, no output.
    shutil.copytree(pair / "old1", tmp_path / "broken")
    (tmp_path / "broken" / "vocab.json").write_text("{")
    cfg["models"][0]["model"], cfg["models"][1]["model"] = str(tmp_path / "broken"), str(pair / "old2")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=re.escape(f"chat_template: cannot load the tokenizer of {tmp_path / 'broken'}: "
                                                    f"{tmp_path / 'broken' / 'vocab.json'} is not valid JSON: ")):
        run_merge(MergeSpec.load(tmp_path / "b.yaml"), tmp_path / "out-broken", ExecOptions())
    assert not (tmp_path / "out-broken").exists()


def _copy_model(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


def test_chat_template_text_and_auto(pair: Path, tmp_path: Path) -> None:
    """A Jinja text is written as given; `auto` takes the template most inputs carry (not the
    first model's), none when no input has one; a name is a built-in template."""
    from transformers import AutoTokenizer

    from simmerge_ray.merge.chat_templates import resolve_template

    text = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    other = "{{ messages[-1]['content'] }}"
    for name, template in (("c", text), ("d", text), ("e", other)):
        if not (pair / name).exists():
            _copy_model(pair / "a", pair / name)
            tok = AutoTokenizer.from_pretrained(pair / name)
            tok.chat_template = template
            tok.save_pretrained(pair / name)
    models = [{"model": m, "parameters": {"weight": 1.0}} for m in ("e", "c", "d")]  # the minority first
    for template, want in ((text.replace("] ", "]: "), text.replace("] ", "]: ")), ("auto", text)):
        cfg = {"merge_method": "linear", "tokenizer_source": "union", "chat_template": template, "models": models}
        (pair / "t.yaml").write_text(yaml.safe_dump(cfg))
        run_merge(MergeSpec.load(pair / "t.yaml"), tmp_path / "out", ExecOptions(overwrite=True))
        assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == want
    assert resolve_template("auto", [None, other, text, None, text]) == text
    assert resolve_template("auto", [None, None]) is None
    assert resolve_template("chatml", [text]).startswith("{%") and "<|im_start|>" in resolve_template("chatml", [text])


COMPUTE_CASES = {
    "ties": {"merge_method": "ties", "base_model": "base", "parameters": {"normalize": True}, "models": [
        {"model": "m1", "parameters": {"weight": 1.0, "density": [1, 0.7, 0.1]}},
        {"model": "m2", "parameters": {"weight": [0, 0.3, 0.7, 1], "density": 0.5}},
        {"model": "m3", "parameters": {"weight": 0.5, "density": 0.33}}]},
    "linear": {"merge_method": "linear", "models": [
        {"model": "m1", "parameters": {"weight": 0.7}}, {"model": "m2", "parameters": {"weight": [0.1, 0.9]}}]},
    "slerp": {"merge_method": "slerp", "base_model": "m1", "parameters": {"t": [0, 0.4, 1]},
              "models": [{"model": "m1"}, {"model": "m2"}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.8},
                        "models": [{"model": "m1", "parameters": {"weight": 0.5}},
                                   {"model": "m2", "parameters": {"weight": 0.9}}]},
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=3, num_heads=4, vocab_size=64,
                         intermediate_size=64, dtype="float32")
    return make_zoo(tmp_path_factory.mktemp("zoo"), spec)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", list(COMPUTE_CASES))
def test_compute_dtype_matches_mergekit(zoo: Path, tmp_path: Path, case: str, dtype: str) -> None:
    """`dtype` is the compute dtype: mergekit's bytes (float32 inputs, so the rounding of the
    inputs to `dtype` matters; SLERP, whose coefficients come from a float64 Gram matrix here,
    to one ulp); `--compute-dtype float32` gives the float32 merge."""
    cfg = {**COMPUTE_CASES[case], "dtype": dtype}
    ours, mk = _both(cfg, zoo, tmp_path)
    a, b = load_all(ours), load_all(mk)
    for name in a:
        assert a[name].dtype == b[name].dtype == getattr(torch, dtype)
        assert ulps(a[name], b[name]) <= (1 if case == "slerp" else 0), f"{case} {dtype} {name}"
    run_merge(MergeSpec.load(zoo / "cfg.yaml"), tmp_path / "f32",
              ExecOptions(compute_dtype="float32"))
    (zoo / "old.yaml").write_text(yaml.safe_dump({**cfg, "dtype": "float32", "out_dtype": dtype}))
    run_merge(MergeSpec.load(zoo / "old.yaml"), tmp_path / "old", ExecOptions())
    f32, old = load_all(tmp_path / "f32"), load_all(tmp_path / "old")
    assert all(torch.equal(f32[n], old[n]) for n in f32)
    assert any(not torch.equal(f32[n], a[n]) for n in a)  # the two modes do differ


@pytest.fixture(scope="module")
def stored_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, m1, m2 stored in bf16, and h (m3's family) stored in fp16."""
    spec = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=1, num_heads=4, vocab_size=64,
                         intermediate_size=64, dtype="bfloat16")
    root = make_zoo(tmp_path_factory.mktemp("stored"), spec, n=2)
    make_checkpoint(root / "h", SyntheticSpec(**{**spec.__dict__, "seed": 3, "dtype": "float16"}),
                    base=root / "base", delta_std=0.01)
    return root


NO_DTYPE_CASES = {  # (config without dtype, the dtype mergekit computes and writes in)
    "ties_bf16": ({**COMPUTE_CASES["ties"], "models": COMPUTE_CASES["ties"]["models"][:2]}, torch.bfloat16),
    "linear_bf16_fp16": ({"merge_method": "linear", "models": [
        {"model": "m1", "parameters": {"weight": 0.7}}, {"model": "h", "parameters": {"weight": 0.3}}]}, torch.float32),
}


@pytest.mark.parametrize("case", list(NO_DTYPE_CASES))
def test_without_dtype_computes_in_the_inputs_dtype(stored_zoo: Path, tmp_path: Path, case: str) -> None:
    """No `dtype`: each tensor computes in its inputs' dtype, promoted when they differ (bf16 with
    fp16: float32), and is written in it, as mergekit does: its bytes. `--compute-dtype float32`
    opts out: the bytes of `dtype: float32` with the output dtype unchanged."""
    cfg, want = NO_DTYPE_CASES[case]
    ours, mk = _both(cfg, stored_zoo, tmp_path)
    a, b = load_all(ours), load_all(mk)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == want, name
        assert ulps(a[name], b[name]) == 0, f"{case} {name}"
    record = json.loads((ours / "simmerge_merge.json").read_text())
    assert record["compute_dtype"] == str(want).removeprefix("torch.")
    config = json.loads((ours / "config.json").read_text())  # says what was written, not the first input's
    assert config.get("dtype", config.get("torch_dtype")) == str(want).removeprefix("torch.")
    run_merge(MergeSpec.load(stored_zoo / "cfg.yaml"), tmp_path / "f32", ExecOptions(compute_dtype="float32"))
    (stored_zoo / "f32.yaml").write_text(yaml.safe_dump({**cfg, "dtype": "float32", "out_dtype": str(want)[6:]}))
    run_merge(MergeSpec.load(stored_zoo / "f32.yaml"), tmp_path / "same", ExecOptions())
    f32, same = load_all(tmp_path / "f32"), load_all(tmp_path / "same")
    assert all(torch.equal(f32[n], same[n]) and f32[n].dtype == want for n in f32)
    if want != torch.float32:
        assert any(not torch.equal(f32[n], a[n]) for n in a)  # computing in bf16 changed bytes


def test_vocabularies_that_map_ids_differently_are_named_when_merged_by_id(pair: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Without tokenizer_source, rows merge id by id (as mergekit does); where the models'
    tokenizers give an id different tokens the merge says so, naming the first one."""
    cfg = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.5}},
                                                {"model": "b", "parameters": {"weight": 0.5}}]}
    (pair / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with caplog.at_level("WARNING"):
        run_merge(MergeSpec.load(pair / "cfg.yaml"), tmp_path / "by-id", ExecOptions(workers=1))
    (line,) = [r.getMessage() for r in caplog.records if "token id(s)" in r.getMessage()]
    assert line.startswith(f"models 'a' ({pair / 'a'}) and 'b' ({pair / 'b'}) map ") and "first: id 3, 'w0' and 'w35'" in line
    caplog.clear()
    import shutil

    shutil.copytree(pair / "a", tmp_path / "a2")  # the same tokenizer: nothing to say
    (tmp_path / "same.yaml").write_text(yaml.safe_dump({**cfg, "models": [
        {"model": str(pair / "a"), "parameters": {"weight": 0.5}}, {"model": str(tmp_path / "a2"), "parameters": {"weight": 0.5}}]}))
    with caplog.at_level("WARNING"):
        run_merge(MergeSpec.load(tmp_path / "same.yaml"), tmp_path / "same", ExecOptions(workers=1))
    assert not [r for r in caplog.records if "token id(s)" in r.getMessage()]


def test_the_written_config_names_dtypes_as_mergekit_reads_them(pair: Path, tmp_path: Path) -> None:
    """simmerge takes `bf16` and `fp16` (and mergekit's `torch.` prefix); mergekit_config.yml names
    them `bfloat16` and `float16`, so mergekit runs the written config again to the same tensors.
    Written as given, mergekit refused it ("Unimplemented dtype")."""
    cfg = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.7}},
                                                {"model": "b", "parameters": {"weight": 0.3}}],
           "dtype": "bf16", "out_dtype": "torch.float16"}
    (pair / "short.yaml").write_text(yaml.safe_dump(cfg))
    run_merge(MergeSpec.load(pair / "short.yaml"), tmp_path / "ours")
    written = yaml.safe_load((tmp_path / "ours" / "mergekit_config.yml").read_text())
    assert written == {**cfg, "dtype": "bfloat16", "out_dtype": "float16"}
    run_mergekit(written, pair, tmp_path / "mk")
    ours, theirs = load_all(tmp_path / "ours"), load_all(tmp_path / "mk")
    assert ours.keys() == theirs.keys() and all(ours[n].dtype == torch.float16 for n in ours)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_an_embedding_shorter_than_its_tokenizer_is_one_line(pair: Path, tmp_path: Path) -> None:
    """A model whose embedding has fewer rows than its tokenizer and config name (a truncated
    checkpoint): a `tokenizer:` merge, which gathers each model's rows by its tokens' ids, refuses
    it before any tensor, naming the model and the tensor."""
    from safetensors.torch import load_file, save_file

    short = tmp_path / "short"
    _copy_model(pair / "b", short)
    weights = next(short.glob("*.safetensors"))
    state = load_file(weights)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:20].clone()
    save_file(state, weights)
    cfg = {"merge_method": "linear", "tokenizer_source": "union",
           "models": [{"model": str(pair / "a"), "parameters": {"weight": 0.5}},
                      {"model": str(short), "parameters": {"weight": 0.5}}]}
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SimMergeError) as err:
        run_merge(MergeSpec.load(tmp_path / "short.yaml"), tmp_path / "out", ExecOptions())
    msg = str(err.value)
    assert "\n" not in msg and "model.embed_tokens.weight" in msg and str(short) in msg, msg
    assert not (tmp_path / "out").exists()
