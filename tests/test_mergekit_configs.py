"""Real-world-style mergekit configs (tests/data/mergekit_configs: slices, stacking, gradients,
filters, modules, tokenizer settings) run unchanged and match mergekit, on tiny llama, qwen2 and
EXAONE 3 checkpoints (GPT-2-style names: transformer.wte, transformer.h.N) with tokenizers. Both
compute in the config's `dtype` (docs/merge.md: what `dtype` means) and the bytes are mergekit's (SLERP
to one ulp). `compute_dtype="float32"` gives the bytes of the config with
`dtype: float32` and the same output dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mergekit_oracle import load_all, make_zoo, run_mergekit, ulps

from simmerge_ray.io.checkpoint import layer_index
from simmerge_ray.io.synthetic import SyntheticSpec
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, run_merge

CONFIGS = sorted((Path(__file__).parent / "data" / "mergekit_configs").glob("*.yml"))
ARCHS = {arch: SyntheticSpec(architecture=arch, hidden_size=16, num_layers=4, num_heads=2, vocab_size=32,
                             intermediate_size=32) for arch in ("llama", "qwen2", "exaone")}


def _write_tokenizer(folder: Path, max_length: int) -> None:
    """A 32-token word-level tokenizer; `max_length` tells the models' tokenizers apart."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # qwen2's tokenizer class adds <|endoftext|> when absent: it is one of the 32 tokens here
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 31)}, "<|endoftext|>": 31}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            model_max_length=max_length).save_pretrained(folder)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    out = {}
    for arch, spec in ARCHS.items():
        out[arch] = make_zoo(root / arch, spec)
        for i, name in enumerate(("base", "m1", "m2", "m3")):
            _write_tokenizer(out[arch] / name, 100 + i)
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_matches_mergekit(zoo, tmp_path: Path, arch: str, path: Path) -> None:
    root = zoo[arch]
    cfg = yaml.safe_load(path.read_text())
    out_dtype = cfg.get("out_dtype") or cfg["dtype"]
    f32_cfg = {**cfg, "dtype": "float32", "out_dtype": out_dtype}
    (root / path.name).write_text(path.read_text())
    run_merge(MergeSpec.load(root / path.name), tmp_path / "ours", ExecOptions())
    ours = load_all(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    depth = config["num_hidden_layers"]
    assert depth == len({layer_index(n) for n in ours} - {None})
    # mergekit 0.1.5 cannot write a qwen2 config of another depth (layer_types keeps the input's
    # length, and transformers refuses it after the weights are written): the weights are still
    # compared; our config lists one layer type per output layer
    mk_config_fails = arch == "qwen2" and depth != 4
    if mk_config_fails:
        assert config["layer_types"] == ["full_attention"] * depth
    (root / f"f32-{path.name}").write_text(yaml.safe_dump(f32_cfg))
    run_merge(MergeSpec.load(root / f"f32-{path.name}"), tmp_path / "ours-f32", ExecOptions())
    run_merge(MergeSpec.load(root / path.name), tmp_path / "ours-opt", ExecOptions(compute_dtype="float32"))
    same, opt = load_all(tmp_path / "ours-f32"), load_all(tmp_path / "ours-opt")
    assert all(torch.equal(opt[n], same[n]) for n in opt)  # the float32 option: the old behaviour
    if mk_config_fails:
        with pytest.raises(Exception, match=r"num_hidden_layers` \(\d+\) must be equal to the number of `layer_types"):
            run_mergekit(cfg, root, tmp_path / "mk", copy_tokenizer=True)
    else:
        run_mergekit(cfg, root, tmp_path / "mk", copy_tokenizer=True)
    theirs = load_all(tmp_path / "mk")
    assert sorted(ours) == sorted(theirs)
    # every method computes in `dtype` in mergekit's order of operations; SLERP's coefficients
    # come from a float64 Gram matrix (its streamed form), so to one ulp
    slack = 1 if cfg["merge_method"] == "slerp" else 0
    for name in ours:
        assert ulps(ours[name], theirs[name]) <= slack, f"{path.stem} {arch} {name}"
    if mk_config_fails:
        return
    mk_config = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert depth == mk_config["num_hidden_layers"]
    _check_tokenizer(cfg, root, tmp_path / "ours", tmp_path / "mk")


def _check_tokenizer(cfg: dict, root: Path, ours: Path, theirs: Path) -> None:
    from transformers import AutoTokenizer

    source = cfg.get("tokenizer_source")
    if source is None:
        return
    mine, mk = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(theirs)
    want = AutoTokenizer.from_pretrained(root / (cfg["base_model"] if source == "base" else source))
    assert mine.get_vocab() == mk.get_vocab() == want.get_vocab()
    assert mine.model_max_length == mk.model_max_length == want.model_max_length
    assert mine.chat_template == mk.chat_template == cfg.get("chat_template")


def test_exponents_without_a_dot_are_numbers(zoo, tmp_path: Path) -> None:
    """`weight: 1e-1` is a string to PyYAML (YAML 1.1) and a number to mergekit (pydantic) and to
    YAML 1.2; it was refused as "expected a finite number, got '1e-1'"."""
    root = zoo["llama"]
    text = ("merge_method: ties\nbase_model: base\nmodels:\n"
            "  - model: m1\n    parameters: {weight: WEIGHT, density: DENSITY}\n"
            "  - model: m2\n    parameters: {weight: 0.5, density: 0.5}\ndtype: float32\n")
    for name, weight, density in (("exp", "6e-1", "3E-1"), ("dot", "0.6", "0.3")):
        (root / f"{name}.yml").write_text(text.replace("WEIGHT", weight).replace("DENSITY", density))
        run_merge(MergeSpec.load(root / f"{name}.yml"), tmp_path / name, ExecOptions())
    exp, dot = load_all(tmp_path / "exp"), load_all(tmp_path / "dot")
    assert sorted(exp) == sorted(dot) and all(torch.equal(exp[n], dot[n]) for n in exp)
