"""The small files of a merged checkpoint: index, config, generation config, tokenizer, and its
provenance: simmerge_merge.json, the exact config (mergekit_config.yml) and a README.md model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

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
    write_provenance(spec, out)


CONFIG_FILE = "mergekit_config.yml"
CARD_FILE = "README.md"


def merge_parameters(spec: MergeSpec) -> dict[str, Any]:
    """Every parameter the config set, by scope: global, the module's, and per slice and source
    (each source names its model; `layer_range` is null in the `models:` form)."""
    return {
        "global": spec.parameters,
        "module": spec.module_parameters,
        "slices": [{"parameters": sl.parameters,
                    "base_model": sl.base.ref if sl.base else None,
                    "sources": [{"model": s.model.ref, "layer_range": list(s.layer_range) if s.layer_range else None,
                                 "parameters": s.parameters} for s in sl.sources]}
                   for sl in spec.slices],
    }


def write_provenance(spec: MergeSpec, out: Path) -> None:
    """simmerge_merge.json (method, inputs, parameters, seed, tool version), the exact config
    as mergekit_config.yml, and a README.md model card, as mergekit writes them."""
    from simmerge_ray import __version__

    params = merge_parameters(spec)
    (out / "simmerge_merge.json").write_text(json.dumps({
        "merge_method": spec.method.name,
        "models": [m.ref for m in spec.inputs],
        "model_paths": {m.ref: str(m.path) for m in spec.inputs},
        "base_model": spec.base.ref if spec.base else None,
        "parameters": params,
        "dtype": spec.dtype,
        "out_dtype": spec.out_dtype,
        "seed": spec.seed,
        "tool": f"simmerge {__version__}",
        "config_file": CONFIG_FILE if spec.config is not None else None,
    }, indent=2, default=str))
    config_text = None
    if spec.config is not None:
        config_text = yaml.safe_dump(spec.config, sort_keys=False)
        (out / CONFIG_FILE).write_text(config_text)
    (out / CARD_FILE).write_text(model_card(spec, params, config_text, __version__))


def model_card(spec: MergeSpec, params: dict[str, Any], config_text: str | None, version: str) -> str:
    """A Hugging Face model card: inputs, method, parameters, tool version and the config."""
    bases = [str(m.path) for m in spec.inputs]
    front = yaml.safe_dump({"base_model": bases, "library_name": "transformers",
                            "tags": ["merge", "mergekit", "simmerge"]}, sort_keys=False)
    base = f" with `{spec.base.ref}` as the base model" if spec.base else ""
    lines = ["---", front.rstrip(), "---", "# Merged model", "",
             f"Made with simmerge {version} (simmerge_ray), which executes mergekit configurations.", "",
             "## Merge details", "", "### Method", "",
             f"`{spec.method.name}`{base}; computed in float32"
             + (f", written as {spec.out_dtype or spec.dtype}" if (spec.out_dtype or spec.dtype) else "")
             + (f"; seed {spec.seed}" if spec.seed else "") + ".", "",
             "### Models merged", ""]
    lines += [f"* `{m.ref}`" + (f" ({m.path})" if str(m.path) != m.ref else "") for m in spec.inputs]
    lines += ["", "### Parameters", ""]
    if params["global"]:
        lines.append(f"* global: `{json.dumps(params['global'], default=str)}`")
    if params["module"]:
        lines.append(f"* module: `{json.dumps(params['module'], default=str)}`")
    for i, sl in enumerate(params["slices"]):
        where = f"slice {i}: " if len(params["slices"]) > 1 else ""
        if sl["parameters"]:
            lines.append(f"* {where}slice: `{json.dumps(sl['parameters'], default=str)}`")
        for src in sl["sources"]:
            rng = f" layers {src['layer_range']}" if src["layer_range"] else ""
            if src["parameters"] or rng:
                lines.append(f"* {where}`{src['model']}`{rng}: `{json.dumps(src['parameters'], default=str)}`")
    if lines[-1] == "":
        lines.append("none (every parameter at its default)")
    if config_text is not None:
        lines += ["", "### Configuration", "", f"The configuration used, as given (also in `{CONFIG_FILE}`):", "",
                  "```yaml", config_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


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
