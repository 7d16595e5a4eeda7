"""The small files of a merged checkpoint: index, config, generation config, tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from simmerge_ray.io.checkpoint import INDEX_FILE, Checkpoint
from simmerge_ray.io.safetensors_format import dtype_code
from simmerge_ray.io.side_files import copy_tokenizer
from simmerge_ray.merge.config import MergeSpec

_TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def write_side_files(spec: MergeSpec, ckpts: dict[str, Checkpoint], num_layers: int, plans: list, out: Path) -> None:
    """Index, config (the base model's, else the first model's, with the output's depth and
    dtype), generation config, tokenizer (`tokenizer_source`, else the config's model) and its
    chat template."""
    if len(plans) > 1:
        weight_map = {name: p.file for p in plans for name, _, _ in p.tensors}
        total = sum((out / p.file).stat().st_size for p in plans)
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    source = ckpts[spec.base.ref] if spec.base is not None else ckpts[spec.inputs[0].ref]
    if source.path.is_dir():
        config = output_config(spec, source, num_layers)
        if config:
            (out / "config.json").write_text(json.dumps(config, indent=2))
        if (source.path / "generation_config.json").exists():
            shutil.copy2(source.path / "generation_config.json", out / "generation_config.json")
    tok_source = source
    if spec.tokenizer_source not in (None, "base"):
        tok_source = ckpts[spec.tokenizer_source]
    if tok_source.path.is_dir():
        copy_tokenizer(tok_source.path, out)
        if spec.chat_template is not None:
            set_chat_template(out, spec.chat_template)
    (out / "simmerge_merge.json").write_text(json.dumps({
        "merge_method": spec.method.name,
        "models": [m.ref for m in spec.inputs],
        "base_model": spec.base.ref if spec.base else None,
        "seed": spec.seed,
    }, indent=2))


def output_config(spec: MergeSpec, source: Checkpoint, num_layers: int) -> dict:
    """The source's config.json with the output's num_hidden_layers and dtype."""
    config = dict(source.config)
    if not config:
        return config
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


def set_chat_template(out: Path, template: str) -> None:
    """Write a Jinja chat template into the output's tokenizer_config.json."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2))
