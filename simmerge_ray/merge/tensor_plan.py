"""Which input tensors make each output tensor, with their parameters resolved.

mergekit's layout, from the config's slices and the inputs' headers: the tensors before the
blocks (embeddings) come from the first slice's sources, the blocks from each slice in turn
(output block k of a slice reads block start + k of each source and is renumbered to follow the
previous slices), the tensors after the blocks (final norm, head) from the last slice. Gradients
are spread over each slice's own depth; tensors outside blocks take t = 0. Everything here runs
on the driver before any tensor is read, so a bad range, a missing tensor, a shape mismatch or
a bad parameter value fails first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from simmerge_ray.errors import CheckpointError, ConfigError
from simmerge_ray.features.module_groups import is_vocabulary_name
from simmerge_ray.io.architecture import check_same_model_type
from simmerge_ray.io.checkpoint import Checkpoint, layer_index, merged_head, with_layer_index
from simmerge_ray.io.safetensors_format import FLOAT_DTYPES
from simmerge_ray.merge.config import MergeSpec, OutputSlice, SliceSource, method_sources
from simmerge_ray.merge.parameter_values import evaluate_setting
from simmerge_ray.merge.modules import (ModuleLayout, depth_key, module_depth, module_layouts, owner,
                                        whole_model_layouts)
from simmerge_ray.merge.tokenizer import BuiltVocabulary, token_rows
from simmerge_ray.merge.vocabulary import VocabRemap, row_sources

log = logging.getLogger(__name__)

Value = float | int | bool


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: the method's inputs (model ref, tensor name) in order, the base, and
    its parameter values."""

    name: str
    reads: tuple[tuple[str, str], ...]
    base: tuple[str, str] | None
    options: dict[str, Value]
    per_model: dict[str, list[Value]]
    vocab: VocabRemap | None = None  # embeddings and head when the config builds a tokenizer
    compute: str = "F32"  # dtype code it computes in (set by the executor's plan_merge)

    @property
    def all_reads(self) -> tuple[tuple[str, str], ...]:
        return self.reads + ((self.base,) if self.base is not None else ())


# Names of tensors outside the blocks that come before them: input embeddings (`embed_tokens`,
# GPT-2-style `wte` and its position embedding `wpe`), and the position tables of chatglm
# (`rotary_pos_emb.inv_freq`) and jais (`relative_pe.slopes`), as mergekit's architecture files
# list them (its pre_weights; checked against them in tests/test_merge_vs_mergekit.py).
PRE_MARKERS = ("embed", ".wte.", ".wpe.", ".rotary_pos_emb.", ".relative_pe.")


def _is_pre(name: str) -> bool:
    """Whether a tensor outside the blocks comes before them: a frankenmerge takes those from its
    first slice, every other one (norms, heads) from its last."""
    return any(m in f".{name}" for m in PRE_MARKERS) and "embed_out" not in name and "lm_head" not in name


@dataclass(frozen=True)
class _Part:
    """The tensors one run of slices merges: a whole checkpoint, or one module of a modular one."""

    slices: tuple[OutputSlice, ...]
    module: str = ""
    layouts: dict[str, ModuleLayout] | None = None

    def owns(self, name: str) -> bool:
        return self.layouts is None or owner(name, self.layouts) == self.module

    def depth(self, ck: Checkpoint) -> tuple[int, str]:
        """A model's depth in this part, and where it was read (for messages)."""
        if self.layouts is None:
            return checked_depth(ck), ""
        layout = self.layouts[self.module]
        return module_depth(layout, ck.config), f" ({depth_key(layout, ck.config) or 'no blocks'})"

    def outside_t(self, name: str) -> float:
        """The t of a tensor outside blocks: 0, but for those mergekit plans as unindexed layers."""
        return float(self.layouts is not None and name.startswith(self.layouts[self.module].t_one))

    def is_pre(self, name: str) -> bool:
        return _is_pre(name) if self.layouts is None else name not in self.layouts[self.module].post


def _parts(spec: MergeSpec, ckpts: dict[str, Checkpoint]) -> list[_Part]:
    """The whole checkpoint as one part, or each module of a modular architecture: the config's
    `modules:`, or (top-level `models:`, as mergekit) every module of the architecture, each
    merged by that one `models:` slice over its own blocks."""
    lead = ckpts[spec.slices[0].sources[0].model.ref]
    if not spec.modules:
        layouts = whole_model_layouts(spec.slices, lead.config, spec.config, spec.source)
        if layouts is None:
            return [_Part(spec.slices)]
        return [_Part((replace(spec.slices[0], module=name),), name, layouts) for name in layouts]
    layouts = module_layouts(list(spec.modules), lead.config, spec.source)
    if layouts is None:
        return [_Part(spec.slices)]
    return [_Part(spec.module_slices(name), name, layouts) for name in spec.modules]


def checked_depth(ck: Checkpoint) -> int:
    """The depth config.json declares, refused when the tensors hold fewer blocks (the output's
    config would promise blocks it lacks). More blocks than declared (an MTP head stored as one
    more layer) are allowed, and said: only the declared ones are merged."""
    depth = ck.num_layers
    found = max((i for i in map(layer_index, ck.entries) if i is not None), default=-1) + 1
    if 0 < found < depth:
        raise CheckpointError(f"{ck.path / 'config.json'}: declares {depth} layers but the tensors hold blocks "
                              f"0-{found - 1} only")
    if found > depth:
        log.warning("%s: tensors of blocks %d-%d lie beyond the %d layers config.json declares; they are not merged",
                    ck.path, depth, found - 1, depth)
    return depth


def check_parts(spec: MergeSpec, ckpts: dict[str, Checkpoint]) -> None:
    """Fail now (before any tokenizer or tensor is read) on a config form the architecture refuses."""
    _parts(spec, ckpts)


def slice_ranges(spec: MergeSpec, ckpts: dict[str, Checkpoint],
                 part: _Part | None = None) -> list[list[tuple[int, int]]]:
    """Each slice's layer range per source (a `models:` source spans its model), checked
    against the model's depth (in its module, for a modular architecture)."""
    part = part or _Part(spec.slices)
    out = []
    for sl in part.slices:
        ranges = []
        for s in sl.sources:
            depth, key = part.depth(ckpts[s.model.ref])
            lo, hi = s.layer_range if s.layer_range is not None else (0, depth)
            if hi > depth:
                raise ConfigError(f"{spec.source}: {s.where}.layer_range: {[lo, hi]} is beyond the {depth} "
                                  f"layers{key} of model {s.model.ref!r}")
            ranges.append((lo, hi))
        first, want = sl.sources[0].model.ref, ranges[0][1] - ranges[0][0]
        for src, (lo, hi) in zip(sl.sources, ranges):  # else the output would take the first's depth, dropping layers
            if hi - lo != want:
                raise ConfigError(f"{spec.source}: {src.where}: model {src.model.ref!r} gives {hi - lo} layers, "
                                  f"model {first!r} {want}: every model of a merge must give the same number "
                                  f"(use slices with a layer_range per source)")
        out.append(ranges)
    return out


def output_layers(spec: MergeSpec, ckpts: dict[str, Checkpoint]) -> int | dict[str, int]:
    """num_hidden_layers of the output; for a modular architecture, each module's depth by the
    config key it is written to."""
    parts = _parts(spec, ckpts)
    if parts[0].layouts is None:
        return sum(r[0][1] - r[0][0] for r in slice_ranges(spec, ckpts))
    lead = ckpts[spec.slices[0].sources[0].model.ref].config
    out = {}
    for part in parts:
        key = depth_key(part.layouts[part.module], lead)
        if key is not None:
            out[key] = sum(r[0][1] - r[0][0] for r in slice_ranges(spec, ckpts, part))
    return out


def is_vocabulary(name: str, ck: Checkpoint) -> bool:
    """An embedding or head tensor (or a head's bias) whose rows are the model's tokens (mergekit's
    vocabulary axis 0). BLOOM's and Falcon's `word_embeddings` and GPT-NeoX's `embed_in` were not
    taken for one: a `tokenizer:` merge re-indexed their heads but not their embeddings."""
    entry = ck.entries.get(name)
    size = ck.config.get("vocab_size") or (ck.config.get("text_config") or {}).get("vocab_size")  # Mistral3's
    return (layer_index(name) is None and entry is not None and is_vocabulary_name(name)
            and (entry.shape[:1] == (size,) and len(entry.shape) <= 2 if isinstance(size, int)
                 else len(entry.shape) == 2))


def plan_tensors(spec: MergeSpec, ckpts: dict[str, Checkpoint], vocab: BuiltVocabulary | None = None, *,
                 allow_crimes: bool = False) -> list[TensorTask]:
    """Every output tensor's task, in output order (before, blocks, after; module by module for
    a modular architecture); with `vocab` (the config builds a tokenizer) the vocabulary tensors
    carry their rows' re-indexing. Inputs of different architectures (config.json model_type)
    are refused unless `allow_crimes` (mergekit's --allow-crimes)."""
    lead = spec.slices[0].sources[0].model.ref
    _check_same_architecture(lead, ckpts)  # first: tensors that cannot be merged, whatever the flag
    if not allow_crimes:  # mergekit refuses it too without the flag
        refs = sorted(ckpts, key=lambda ref: ref != lead)  # the lead first
        check_same_model_type([f"model {ref!r}" for ref in refs], [ckpts[ref] for ref in refs],
                              "are not merged unless you pass --allow-crimes, as mergekit does")
    parts = _parts(spec, ckpts)
    ranges = [slice_ranges(spec, ckpts, part) for part in parts]  # every range checked before planning
    return [t for part, rng in zip(parts, ranges) for t in _plan_part(spec, ckpts, part, rng, vocab)]


def _plan_part(spec: MergeSpec, ckpts: dict[str, Checkpoint], part: _Part, ranges: list[list[tuple[int, int]]],
               vocab: BuiltVocabulary | None) -> list[TensorTask]:
    first_slice, last = part.slices[0], part.slices[-1]
    first = ckpts[first_slice.sources[0].model.ref]
    outside = [n for n in first.tensor_names if layer_index(n) is None and part.owns(n)]
    head = merged_head(ckpts.values())
    if head is not None and head == first.tied_head and part.owns(head):
        outside.append(head)  # the lead ties it, another model stores it: merged, as mergekit does
    tasks = [_task(spec, ckpts, first_slice, n, [n] * len(first_slice.sources), part.outside_t(n), vocab)
             for n in outside if part.is_pre(n)]
    out_layer = 0
    blocks: dict[str, dict[int, list[str]]] = {}
    for sl, rng in zip(part.slices, ranges):
        for s in sl.sources:
            if s.model.ref not in blocks:
                blocks[s.model.ref] = _block_tensors(ckpts[s.model.ref], part)
        by_layer = blocks[sl.sources[0].model.ref]
        n_layers = rng[0][1] - rng[0][0]
        for k in range(n_layers):
            t = k / (n_layers - 1) if n_layers > 1 else 1.0
            _check_block(ckpts, blocks, sl, [lo + k for lo, _ in rng])
            for name in by_layer.get(rng[0][0] + k, []):
                ins = [with_layer_index(name, lo + k) for lo, _ in rng]
                tasks.append(_task(spec, ckpts, sl, with_layer_index(name, out_layer), ins, t))
            out_layer += 1
    tasks += [_task(spec, ckpts, last, n, [n] * len(last.sources), part.outside_t(n), vocab)
              for n in outside if not part.is_pre(n)]
    return tasks


def _block_tensors(ck: Checkpoint, part: _Part) -> dict[int, list[str]]:
    """A model's tensor names of each block (of the part's module)."""
    out: dict[int, list[str]] = {}
    for n in ck.tensor_names:
        idx = layer_index(n)
        if idx is not None and part.owns(n):
            out.setdefault(idx, []).append(n)
    return out


def _check_block(ckpts: dict[str, Checkpoint], blocks: dict[str, dict[int, list[str]]], sl: OutputSlice,
                 layers: list[int]) -> None:
    """The lead source's block holds every tensor the other sources' blocks hold: the lead's names
    are what is merged, so a tensor it lacks in one block (and holds in others, which the
    architecture check sees) would be left out of the output without a word. What the others
    lack is _check_tensors' to say."""
    lead, lead_layer = sl.sources[0].model.ref, layers[0]
    held = {with_layer_index(n, 0) for n in blocks[lead].get(lead_layer, [])}
    for s, layer in zip(sl.sources[1:], layers[1:]):
        for n in blocks[s.model.ref].get(layer, []):
            if with_layer_index(n, 0) not in held:
                name = with_layer_index(n, lead_layer)
                raise CheckpointError(f"model {lead!r} ({ckpts[lead].path}) lacks tensor {name!r}, which model "
                                      f"{s.model.ref!r} holds{f' (as {n!r})' if n != name else ''}; models must "
                                      f"share one architecture")


def _task(spec: MergeSpec, ckpts: dict[str, Checkpoint], sl: OutputSlice, out_name: str, in_names: list[str],
          t: float, vocab: BuiltVocabulary | None = None) -> TensorTask:
    names = {s.model.ref: n for s, n in zip(sl.sources, in_names)}  # what parameters are resolved on
    reads = {ref: ckpts[ref].stored_name(n) for ref, n in names.items()}  # what is read
    lead = sl.sources[0].model.ref
    remap = None
    if vocab is not None and is_vocabulary(reads[lead], ckpts[lead]):
        remap = _remap(spec, ckpts, sl, reads, vocab)
    _check_tensors(ckpts, [(s.model.ref, reads[s.model.ref]) for s in sl.sources], rows_may_differ=remap is not None)
    method = spec.method
    inputs = method_sources(method, sl)
    base = None
    if not method.base_in_inputs and sl.base is not None:
        base = (sl.base.ref, reads[sl.base.ref])
    shared = spec.shared_scopes(sl)
    options = {p.name: _value(spec, p, shared, out_name, t, None) for p in method.params if not p.per_model}
    per_model = {p.name: [_value(spec, p, (s.parameters, *shared), names[s.model.ref], t, s) for s in inputs]
                 for p in method.params if p.per_model}
    if method.check is not None:
        try:
            method.check(out_name, options, per_model)
        except ConfigError as e:
            raise ConfigError(f"{spec.source}: {e}") from None
    return TensorTask(out_name, tuple((s.model.ref, reads[s.model.ref]) for s in inputs), base, options, per_model,
                      remap)


def _remap(spec: MergeSpec, ckpts: dict[str, Checkpoint], sl: OutputSlice, names: dict[str, str],
           vocab: BuiltVocabulary) -> VocabRemap:
    """The re-indexing of one vocabulary tensor over the slice's models (mergekit's gather)."""
    assert spec.tokenizer is not None
    models = [s.model.ref for s in sl.sources]
    explicit, forced = token_rows(spec.tokenizer, vocab, spec.source)
    rows = {m: ckpts[m].entries[n].shape[0] for m, n in names.items()}  # `names`: the stored names read
    for tid, src in explicit.items():
        if src.model is None:
            continue
        word = next(w for w, i in vocab.vocab.items() if i == tid)
        where = f"{spec.source}: tokenizer.tokens.{word}.source"
        if src.model not in names:
            raise ConfigError(f"{where}: model {src.model!r} is not a source of {names[models[0]]!r}")
        if src.row >= rows[src.model]:
            raise ConfigError(f"{where}: row {src.row} is past the {rows[src.model]} rows of {src.model!r}'s "
                              f"{names[src.model]!r}")
    perms = {m: vocab.perms[m] for m in models}
    for m in models:  # a truncated checkpoint: an IndexError in a worker otherwise
        need = max(perms[m], default=-1) + 1
        if need > rows[m]:
            raise CheckpointError(f"{ckpts[m].path}: tensor {names[m]!r} has {rows[m]} rows, but model {m!r}'s "
                                  f"tokenizer and config name ids up to {need - 1}")
    base = sl.base.ref if sl.base is not None else None
    return VocabRemap(vocab.rows, len(vocab.vocab), perms, row_sources(perms, models, base, explicit, forced), forced)


def _value(spec: MergeSpec, param, scopes: tuple[dict[str, Any], ...], tensor_name: str, t: float,
           source: SliceSource | None) -> Value:
    """The first scope's value that applies to this tensor, else the default (mergekit's order)."""
    for scope in scopes:
        if param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t)
            if value is not None:
                problem = param.problem(value)  # an interpolated value stays in range; kept for safety
                if problem:
                    raise ConfigError(f"{spec.source}: parameter {param.name!r}: {problem}, got {value!r}")
                return value
    if param.default is None:
        where = f"{source.where}: model {source.model.ref!r}, " if source is not None else ""
        raise ConfigError(f"{spec.source}: {where}tensor {tensor_name!r}: no value for parameter {param.name!r}")
    return param.default


def _check_tensors(ckpts: dict[str, Checkpoint], reads: list[tuple[str, str]], *, rows_may_differ: bool = False) -> None:
    """Every input holds its tensor, all of one shape (but for the rows of a vocabulary tensor
    re-indexed to a built tokenizer) and of compatible dtypes."""
    ref_model, ref_name = reads[0]
    ref = ckpts[ref_model].entries.get(ref_name)
    for model, name in reads:
        ck = ckpts[model]
        entry = ck.entries.get(name)
        if entry is None:
            hint = " (tied vs untied embeddings?)" if "lm_head" in name or "embed_out" in name else ""
            raise CheckpointError(f"model {model!r} ({ck.path}) lacks tensor {name!r}{hint}; "
                                  f"models must share one architecture")
        if ref is None:
            continue
        if (entry.shape[1:] if rows_may_differ else entry.shape) != (ref.shape[1:] if rows_may_differ else ref.shape):
            rows_only = entry.shape[1:] == ref.shape[1:] and is_vocabulary(name, ck)
            hint = (" (the vocabularies differ: set tokenizer_source: union, base or a model to lay every model's "
                    "rows out in one vocabulary)" if rows_only and not rows_may_differ else "")
            raise CheckpointError(f"model {model!r} ({ck.path}): tensor {name!r} has shape {list(entry.shape)}, "
                                  f"where model {ref_model!r} has {list(ref.shape)} (tensor {ref_name!r}){hint}")
        if entry.dtype != ref.dtype and not (entry.dtype in FLOAT_DTYPES and ref.dtype in FLOAT_DTYPES):
            raise CheckpointError(
                f"model {model!r} ({entry.file}): tensor {name!r} is {entry.dtype}, {ref_model!r} has {ref.dtype}: "
                f"a float tensor is merged only with float tensors, others only with the same dtype")


def _templates(ck: Checkpoint) -> dict[str, None]:
    """A model's tensor names with block indices set to 0 (what every block holds), in order; the
    head it ties to its embedding counts as held."""
    names = dict.fromkeys(n if layer_index(n) is None else with_layer_index(n, 0) for n in ck.tensor_names)
    return names if ck.tied_head is None else {**names, ck.tied_head: None}


def _check_same_architecture(lead: str, ckpts: dict[str, Checkpoint]) -> None:
    """Every input holds the same kinds of tensors as the first (mergekit would silently drop
    a model's extra tensors, such as qwen2's attention biases merged into a llama)."""
    want = _templates(ckpts[lead])
    for ref, ck in ckpts.items():
        have = _templates(ck)
        missing, extra = [t for t in want if t not in have], [t for t in have if t not in want]
        if missing or extra:
            what = f"lacks tensor {missing[0]!r}" if missing else f"has extra tensor {extra[0]!r}"
            hint = " (tied vs untied embeddings?)" if any("lm_head" in t or "embed_out" in t for t in missing + extra) else ""
            raise CheckpointError(f"model {ref!r} ({ck.path}) {what} compared with {lead!r}{hint}; "
                                  f"{len(missing)} missing, {len(extra)} extra: models must share one architecture")
