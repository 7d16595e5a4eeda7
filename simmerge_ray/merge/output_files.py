"""The small files of a merged checkpoint: index, config, generation config, tokenizer, and its
provenance: simmerge_merge.json, the exact config (mergekit_config.yml) and a README.md model card."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from simmerge_ray.io.checkpoint import TIED_HEADS, Checkpoint, config_ties
from simmerge_ray.io.checkpoint_files import INDEX_FILE
from simmerge_ray.io.safetensors_format import DTYPE_BYTES, FLOAT_DTYPES, TORCH_NAMES, dtype_code
from simmerge_ray.io.side_files import copy_tokenizer, has_loadable_tokenizer
from simmerge_ray.merge.chat_templates import resolve_template
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.modules import set_depth
from simmerge_ray.merge.tokenizer import BuiltVocabulary, load_tokenizer_at

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def write_side_files(spec: MergeSpec, ckpts: dict[str, Checkpoint], num_layers: int | dict[str, int], plans: list,
                     out: Path, vocab: BuiltVocabulary | None = None, compute: str = "float32") -> None:
    """Index, config (the base model's, else the first model's, with the output's depth, dtype
    and vocabulary size), generation config, and the tokenizer: the one built for the config
    (`vocab`), else the config model's files; saved by transformers with the chat template when
    one is set, as mergekit does."""
    if len(plans) > 1:
        weight_map = {name: p.file for p in plans for name, _, _ in p.tensors}
        # the tensors' bytes, headers excluded, as transformers and mergekit count an index's total_size
        total = sum(math.prod(shape) * DTYPE_BYTES[code] for p in plans for _, shape, code in p.tensors)
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    source = config_source(spec, ckpts)
    if source is not None:
        config = written_config(spec, source, num_layers, plans, vocab)
        if config:
            (out / "config.json").write_text(json.dumps(config, indent=2))
        if (source.path / "generation_config.json").exists():
            shutil.copy2(source.path / "generation_config.json", out / "generation_config.json")
    if vocab is not None:
        save_tokenizer(vocab.tokenizer, spec, ckpts, out)
    elif source is not None:
        if spec.chat_template is None:
            copy_tokenizer(source.path, out)
        elif has_loadable_tokenizer(source.path):
            save_tokenizer(load_tokenizer_at(source.path, "chat_template"), spec, ckpts, out)
    write_provenance(spec, out, compute)


def written_config(spec: MergeSpec, source: Checkpoint, num_layers: int | dict[str, int], plans: list,
                   vocab: BuiltVocabulary | None) -> dict:
    """The config.json the output gets ({}: none): also what a dry run's later merges read of it."""
    written = {code for p in plans for _, _, code in p.tensors if code in FLOAT_DTYPES}
    config = output_config(spec, source, num_layers, vocab.rows if vocab is not None else None,
                           next(iter(written)) if len(written) == 1 else None)
    heads = any(n in TIED_HEADS for p in plans for n, _, _ in p.tensors)
    if config_ties(config) and heads:
        config["tie_word_embeddings"] = False  # a head written (beside a tied model) is loaded as written
    return config


def config_source(spec: MergeSpec, ckpts: dict[str, Checkpoint], warn: bool = True) -> Checkpoint | None:
    """The folder the output's config and tokenizer come from: the base model's, else the first
    model's. A model given as a lone .safetensors file has neither, so the next folder in that
    order serves; with none, the output has no config.json, and the log says so (`warn`)."""
    refs = ([spec.base.ref] if spec.base is not None else []) + [m.ref for m in spec.inputs]
    source = next((ckpts[r] for r in refs if ckpts[r].is_folder), None)
    if not warn:
        return source
    if source is None:
        log.warning("every input is a lone .safetensors file: the output has no config.json or tokenizer "
                    "(transformers needs a config.json beside the weights to load them)")
    elif source is not ckpts[refs[0]]:
        log.warning("%s is a lone .safetensors file: the output's config.json and tokenizer come from %s",
                    ckpts[refs[0]].path, source.path)
    return source


CONFIG_FILE = "mergekit_config.yml"
CARD_FILE = "README.md"


def merge_parameters(spec: MergeSpec) -> dict[str, Any]:
    """Every parameter the config set, by scope: global, the module's, and per slice and source
    (each source names its model; `layer_range` is null in the `models:` form)."""
    return {
        "global": spec.parameters,
        "module": spec.module_parameters,
        **({"modules": spec.modules} if len(spec.modules) > 1 else {}),
        "slices": [{"parameters": sl.parameters,
                    "base_model": sl.base.ref if sl.base else None,
                    **({"module": sl.module} if len(spec.modules) > 1 else {}),
                    "sources": [{"model": s.model.ref, "layer_range": list(s.layer_range) if s.layer_range else None,
                                 "parameters": s.parameters} for s in sl.sources]}
                   for sl in spec.slices],
    }


def mergekit_dtype_names(config: dict[str, Any]) -> dict[str, Any]:
    """The config with `dtype` and `out_dtype` named as mergekit reads them: simmerge takes `bf16`,
    `fp16`, `half`, `fp32` and `float`, which mergekit refuses ("Unimplemented dtype"), so a
    mergekit_config.yml written with them as given did not run again under mergekit."""
    out = dict(config)
    for key in ("dtype", "out_dtype"):
        if isinstance(out.get(key), str):
            out[key] = TORCH_NAMES[dtype_code(out[key])]
    return out


def write_provenance(spec: MergeSpec, out: Path, compute: str = "float32") -> None:
    """simmerge_merge.json (method, inputs, parameters, seed, tool version), the config as
    mergekit_config.yml (as given, dtype aliases named as mergekit reads them), and a README.md
    model card, as mergekit writes them."""
    from simmerge_ray import __version__

    params = merge_parameters(spec)
    prov = spec.provenance
    plan = None if prov is None else {"origin": prov.origin, "model_names": prov.names, "steps": prov.steps,
                                      "models": list(prov.models), **({"kept": prov.kept} if prov.kept else {})}
    steps = {} if prov is None else prov.steps  # an earlier merge's output: its folder when kept, else gone
    paths = {m.ref: prov.kept.get(m.ref) if m.ref in steps else str(m.path) for m in spec.inputs}
    (out / "simmerge_merge.json").write_text(json.dumps({
        "merge_method": spec.method.name,
        "models": [m.ref for m in spec.inputs],
        "model_paths": paths,
        "base_model": spec.base.ref if spec.base else None,
        "parameters": params,
        "dtype": spec.dtype,
        "out_dtype": spec.out_dtype,
        "compute_dtype": compute,
        "seed": spec.seed,
        "tool": f"simmerge {__version__}",
        "config_file": CONFIG_FILE if spec.config is not None else None,
        **({"plan": plan} if plan is not None else {}),
    }, indent=2, default=str))
    config_text = None
    if spec.config is not None:
        config_text = yaml.safe_dump(mergekit_dtype_names(spec.config), sort_keys=False)
        (out / CONFIG_FILE).write_text(config_text)
    (out / CARD_FILE).write_text(model_card(spec, params, config_text, __version__, compute))


def model_card(spec: MergeSpec, params: dict[str, Any], config_text: str | None, version: str,
               compute: str = "float32") -> str:
    """A Hugging Face model card: inputs, method, parameters, tool version and the config. A plan
    step's card (`spec.provenance`) names its inputs as the user knows them: catalog models by
    name, the step before it by its place in the plan; an earlier merge of a multi-document
    config by its name: never by a temporary folder, which is gone once the run finished."""
    prov = spec.provenance
    names = {} if prov is None else {**prov.names, **prov.steps}
    bases = list(prov.models) if prov is not None else [str(m.path) for m in spec.inputs]
    front = yaml.safe_dump({"base_model": bases, "library_name": "transformers",
                            "tags": ["merge", "mergekit", "simmerge"]}, sort_keys=False)
    base = f" with `{names.get(spec.base.ref, spec.base.ref)}` as the base model" if spec.base else ""
    lines = ["---", front.rstrip(), "---", "# Merged model", "",
             f"Made with simmerge {version} (simmerge_ray), which executes mergekit configurations.", "",
             "## Merge details", "", "### Method", "",
             f"`{spec.method.name}`{base}; computed in {compute}"
             + (f", written as {spec.out_dtype or spec.dtype}" if (spec.out_dtype or spec.dtype) else "")
             + (f"; seed {spec.seed}" if spec.seed else "") + ".", "",
             *([] if prov is None else ["### Plan", "", prov.origin, ""]),
             "### Models merged", ""]
    for m in spec.inputs:
        if prov is not None and m.ref in prov.steps:
            kept = prov.kept.get(m.ref)
            lines.append(f"* `{prov.steps[m.ref]}` (an intermediate output, "
                         + (f"kept in {kept})" if kept else "not kept)"))
        else:
            lines.append(f"* `{names.get(m.ref, m.ref)}`" + (f" ({m.path})" if str(m.path) != names.get(m.ref, m.ref) else ""))
    lines += ["", "### Parameters", ""]
    if params["global"]:
        lines.append(f"* global: `{json.dumps(params['global'], default=str)}`")
    if params["module"]:
        lines.append(f"* module: `{json.dumps(params['module'], default=str)}`")
    for name, module_params in params.get("modules", {}).items():
        if module_params:
            lines.append(f"* module {name}: `{json.dumps(module_params, default=str)}`")
    for i, sl in enumerate(params["slices"]):
        where = f"slice {i}: " if len(params["slices"]) > 1 else ""
        where = f"{sl['module']} {where}" if "module" in sl else where
        if sl["parameters"]:
            lines.append(f"* {where}slice: `{json.dumps(sl['parameters'], default=str)}`")
        for src in sl["sources"]:
            rng = f" layers {src['layer_range']}" if src["layer_range"] else ""
            if src["parameters"] or rng:
                lines.append(f"* {where}`{names.get(src['model'], src['model'])}`{rng}: "
                             f"`{json.dumps(src['parameters'], default=str)}`")
    if lines[-1] == "":
        lines.append("none (every parameter at its default)")
    if config_text is not None:
        given = "as given" if prov is None else "as run" + (
            " (an earlier merge by its name where a model goes: see Models merged)" if prov.steps else "")
        lines += ["", "### Configuration", "", f"The configuration used, {given} (also in `{CONFIG_FILE}`):", "",
                  "```yaml", config_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def output_config(spec: MergeSpec, source: Checkpoint, num_layers: int | dict[str, int],
                  vocab_size: int | None = None, written_dtype: str | None = None) -> dict:
    """The source's config.json with the output's num_hidden_layers (for a modular architecture,
    each module's depth key, as mergekit writes them), dtype and vocab_size. The dtype is the
    config's `out_dtype` or `dtype`, else `written_dtype` (the one float dtype of the tensors
    written: inputs of mixed dtypes are promoted, so it may not be the source's)."""
    config = dict(source.config)
    if not config:
        return config
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    out_dtype = dtype_code(spec.out_dtype or spec.dtype) if spec.out_dtype or spec.dtype else written_dtype
    if out_dtype:
        key = "dtype" if "dtype" in config else "torch_dtype"
        config[key] = TORCH_NAMES[out_dtype]
    if isinstance(num_layers, dict):
        for key, n in num_layers.items():
            set_depth(config, key, n)
        return config
    for key in ("num_hidden_layers", "n_layer"):
        if key in config:
            config[key] = num_layers
    if isinstance(config.get("layer_types"), list) and len(config["layer_types"]) != num_layers:
        kinds = config["layer_types"]
        config["layer_types"] = [kinds[i % len(kinds)] for i in range(num_layers)]
    return config


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, spec: MergeSpec, ckpts: dict[str, Checkpoint], out: Path) -> None:
    """Save `tokenizer` (a transformers tokenizer) into `out`, with the config's chat template."""
    if spec.chat_template is not None:
        own = [] if spec.chat_template != "auto" else [_template_of(ck.path) for ck in ckpts.values()]
        template = resolve_template(spec.chat_template, own)
        if template is not None:
            tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out))


def _template_of(folder: Path) -> str | None:
    """A model's own chat template (a dict of templates: its default), None without one."""
    if not has_loadable_tokenizer(folder):
        return None
    template = load_tokenizer_at(folder, "chat_template: auto").chat_template
    return template.get("default") if isinstance(template, dict) else template
