"""The small files of a merged checkpoint: index, config, generation config, tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from simmerge_ray.io.checkpoint import INDEX_FILE, Checkpoint
from simmerge_ray.io.safetensors_format import dtype_code
from simmerge_ray.io.side_files import copy_tokenizer
from simmerge_ray.merge.chat_templates import resolve_template
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.tokenizer import BuiltVocabulary

_TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def write_side_files(spec: MergeSpec, ckpts: dict[str, Checkpoint], num_layers: int, plans: list, out: Path,
                     vocab: BuiltVocabulary | None = None) -> None:
    """Index, config (the base model's, else the first model's, with the output's depth, dtype
    and vocabulary size), generation config, and the tokenizer: the one built for the config
    (`vocab`), else the config model's files; saved by transformers with the chat template when
    one is set, as mergekit does."""
    if len(plans) > 1:
        weight_map = {name: p.file for p in plans for name, _, _ in p.tensors}
        total = sum((out / p.file).stat().st_size for p in plans)
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    source = ckpts[spec.base.ref] if spec.base is not None else ckpts[spec.inputs[0].ref]
    if source.path.is_dir():
        config = output_config(spec, source, num_layers, vocab.rows if vocab is not None else None)
        if config:
            (out / "config.json").write_text(json.dumps(config, indent=2))
        if (source.path / "generation_config.json").exists():
            shutil.copy2(source.path / "generation_config.json", out / "generation_config.json")
    if vocab is not None:
        save_tokenizer(vocab.tokenizer, spec, ckpts, out)
    elif source.path.is_dir():
        if spec.chat_template is None:
            copy_tokenizer(source.path, out)
        elif has_tokenizer(source.path):
            from transformers import AutoTokenizer

            save_tokenizer(AutoTokenizer.from_pretrained(str(source.path)), spec, ckpts, out)
    (out / "simmerge_merge.json").write_text(json.dumps({
        "merge_method": spec.method.name,
        "models": [m.ref for m in spec.inputs],
        "base_model": spec.base.ref if spec.base else None,
        "seed": spec.seed,
    }, indent=2))


def output_config(spec: MergeSpec, source: Checkpoint, num_layers: int, vocab_size: int | None = None) -> dict:
    """The source's config.json with the output's num_hidden_layers, dtype and vocab_size."""
    config = dict(source.config)
    if not config:
        return config
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    out_dtype = spec.out_dtype or spec.dtype
    if out_dtype:
        key = "dtype" if "dtype" in config else "torch_dtype"
        config[key] = _TORCH_NAMES[dtype_code(out_dtype)]
    for key in ("num_hidden_layers", "n_layer"):
        if key in config:
            config[key] = num_layers
    if isinstance(config.get("layer_types"), list) and len(config["layer_types"]) != num_layers:
        kinds = config["layer_types"]
        config["layer_types"] = [kinds[i % len(kinds)] for i in range(num_layers)]
    return config


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").exists() and any(
        (folder / f).exists() for f in ("tokenizer.json", "tokenizer.model"))


def save_tokenizer(tokenizer, spec: MergeSpec, ckpts: dict[str, Checkpoint], out: Path) -> None:
    """Save `tokenizer` (a transformers tokenizer) into `out`, with the config's chat template."""
    if spec.chat_template is not None:
        own = [] if spec.chat_template != "auto" else [_template_of(ck.path) for ck in ckpts.values()]
        template = resolve_template(spec.chat_template, own)
        if template is not None:
            tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out))


def _template_of(folder: Path) -> str | None:
    """A model's own chat template (a dict of templates: its default), None without one."""
    if not has_tokenizer(folder):
        return None
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(str(folder)).chat_template
    return template.get("default") if isinstance(template, dict) else template
