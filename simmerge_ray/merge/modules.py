"""Several modules in one merge: mergekit's modular architectures (a multimodal model's text
decoder, vision tower and projector, each merged by its own `models` or `slices` and `parameters`).

A module owns the tensors under its name prefixes (the longest matching prefix wins, so Qwen2-VL's
`visual.merger.` projector is not part of the `visual.` tower); its blocks are found by the usual
block index (`.layers.N.`, `.blocks.N.`) and its depth is read from the config key the
architecture names, which is also the key the output's depth is written to. The layouts are
declared here as data (the prefixes, depth keys and tensor order of mergekit's architecture
files for these models), so merging needs no mergekit. Only architectures tested against
mergekit are listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simmerge_ray.errors import ConfigError


@dataclass(frozen=True)
class ModuleLayout:
    """Where one module's tensors are in a checkpoint."""

    prefixes: tuple[str, ...]  # the module owns every tensor whose name starts with one of these
    depth_keys: tuple[str, ...]  # dotted config keys of its depth, first present wins; () for no blocks
    post: tuple[str, ...] = ()  # tensors outside blocks that follow them (final norm, head); others precede
    # prefixes of tensors outside blocks whose gradients take t = 1, not 0: mergekit's Qwen2-VL
    # projector declares 2 layers (override_num_layers) whose template is the unindexed
    # `visual.merger.mlp.*`, so it plans each of them at t = 0, then at t = 1, and writes the last
    t_one: tuple[str, ...] = ()


_QWEN2_VL = {
    "text_decoder": ModuleLayout(("model.", "lm_head."), ("num_hidden_layers", "text_config.num_hidden_layers"),
                                 ("model.norm.weight", "lm_head.weight")),
    "multi_modal_projector": ModuleLayout(("visual.merger.",), (), t_one=("visual.merger.mlp.",)),
    "vision_tower": ModuleLayout(("visual.",), ("vision_config.depth",)),
}

LAYOUTS: dict[str, dict[str, ModuleLayout]] = {
    "Mistral3ForConditionalGeneration": {
        "text_decoder": ModuleLayout(("language_model.",), ("text_config.num_hidden_layers",),
                                     ("language_model.model.norm.weight", "language_model.lm_head.weight")),
        "multi_modal_projector": ModuleLayout(("multi_modal_projector.",), ()),
        "vision_tower": ModuleLayout(("vision_tower.",), ("vision_config.num_hidden_layers",)),
    },
    "Qwen2VLForConditionalGeneration": _QWEN2_VL,
}


def architecture_of(config: dict) -> str:
    archs = config.get("architectures") or []
    return str(archs[0]) if archs else str(config.get("model_type", "unknown"))


def parse_modules(raw: Any, source: str) -> list[tuple[str, dict]]:
    """`modules:` as (name, body) pairs in config order, each body with one of `models` or
    `slices` and optional `parameters` (which modules an architecture has is checked once the
    inputs' configs are open)."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: modules: expected a mapping of module names, got {raw!r}")
    out = []
    for name, body in raw.items():
        at = f"modules.{name}"
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: {at}: expected a mapping")
        extra = set(body) - {"models", "slices", "parameters"}
        if extra:
            raise ConfigError(f"{source}: {at}.{sorted(extra)[0]}: unsupported key")
        if bool(body.get("models")) == bool(body.get("slices")):
            raise ConfigError(f"{source}: {at}: give exactly one of 'models' or 'slices'")
        out.append((str(name), body))
    return out


def module_layouts(names: list[str], config: dict, source: str) -> dict[str, ModuleLayout] | None:
    """Every module's layout for a model of `config` (all of them: a tensor's owner is decided
    among all), after checking `names` are among them; None for one module of an architecture not
    declared modular (the whole checkpoint is that module, as before)."""
    arch = architecture_of(config)
    layouts = LAYOUTS.get(arch)
    if layouts is None:
        if len(names) <= 1:
            return None
        raise ConfigError(f"{source}: modules: {len(names)} modules {names} given, but {arch} is not a "
                          f"supported modular architecture (supported: {', '.join(LAYOUTS)})")
    for name in names:
        if name not in layouts:
            raise ConfigError(f"{source}: modules.{name}: unknown module {name!r} for {arch} "
                              f"(known: {', '.join(layouts)})")
    return layouts


def whole_model_layouts(slices: tuple, config: dict, raw: dict | None, source: str) -> dict[str, ModuleLayout] | None:
    """A config without `modules:` on a modular architecture, as mergekit reads it: its top-level
    `models:` is given to every module of the architecture (each module merged over its own blocks,
    so a gradient spreads over that module's depth), so every module's layout is returned; top-level
    `slices:` mergekit refuses ("must use modules: config syntax"), and so do we, as tokenizer
    settings (as with several modules). None for an architecture not declared modular."""
    arch = architecture_of(config)
    layouts = LAYOUTS.get(arch)
    if layouts is None:
        return None
    names = ", ".join(layouts)
    if len(slices) != 1 or any(s.layer_range is not None for s in slices[0].sources):
        ranges = [list(sl.sources[0].layer_range) for sl in slices if sl.sources[0].layer_range is not None]
        raise ConfigError(f"{source}: slices: top-level slices (layer_range {ranges}) on {arch}, whose modules are "
                          f"{names}: give each module's slices under 'modules:' (mergekit refuses them too)")
    raw = raw or {}
    key = next((k for k in ("tokenizer", "tokenizer_source") if raw.get(k) is not None), None)
    if key is not None:
        raise ConfigError(f"{source}: {key}: not supported on {arch}, whose 'models:' is merged as its modules "
                          f"{names} (got {raw[key]!r})")
    return layouts


def owner(tensor: str, layouts: dict[str, ModuleLayout]) -> str | None:
    """The module that owns a tensor: the one with the longest prefix it starts with."""
    best, size = None, -1
    for name, layout in layouts.items():
        for p in layout.prefixes:
            if tensor.startswith(p) and len(p) > size:
                best, size = name, len(p)
    return best


def depth_key(layout: ModuleLayout, config: dict) -> str | None:
    """The first of the module's depth keys present in `config`."""
    for key in layout.depth_keys:
        if _get(config, key) is not None:
            return key
    return None


def module_depth(layout: ModuleLayout, config: dict) -> int:
    key = depth_key(layout, config)
    return 0 if key is None else int(_get(config, key))


def set_depth(config: dict, key: str, value: int) -> None:
    """Set a dotted key (`text_config.num_hidden_layers`) in a copy-on-write way."""
    *path, last = key.split(".")
    node = config
    for part in path:
        node[part] = dict(node[part])
        node = node[part]
    node[last] = value


def _get(config: dict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
