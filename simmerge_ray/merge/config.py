"""mergekit-compatible merge configs: parsing and validation, before any checkpoint is opened.

Accepted, as mergekit reads them: `models:` lists; `slices:` of `sources` with `layer_range`
(subsets of layers, and several slices stacked one after another), each slice with its own
`base_model` and `parameters`; `modules:` with one module, or several for the modular
architectures declared in `modules` (Mistral3, Qwen2-VL: each module's slices are tagged with its
name, its parameters sit between the global ones and the slice's); `base_model`, `merge_method`,
`parameters` (global, per module, per slice, per source), `dtype` (the compute dtype),
`out_dtype`, `tokenizer_source` (`base`, `union` or a model) or the `tokenizer:` block (see
`tokenizer`), `chat_template` (a name or a Jinja text). Parameter values are scalars, gradients
(lists interpolated over a slice's relative depth) or filtered lists (`- filter: self_attn\n  value:
...`); every value written is type- and range-checked here. Any other key is an error naming it.
Which input tensors make each output tensor is decided in `tensor_plan`, once the inputs' headers
are open.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.model_refs import local_checkpoint
from simmerge_ray.io.safetensors_format import FLOAT_DTYPES, TORCH_NAMES, dtype_code
from simmerge_ray.merge.chat_templates import check_template
from simmerge_ray.merge.modules import parse_modules
from simmerge_ray.merge.operators import MergeMethod, get_method
from simmerge_ray.merge.parameter_values import ParamChecker
from simmerge_ray.merge.tokenizer import TokenizerSpec, parse_tokenizer
from simmerge_ray.yaml_io import read_yaml

_TOP_KEYS = {"merge_method", "models", "slices", "modules", "base_model", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template"}


@dataclass(frozen=True)
class InputModel:
    """One input checkpoint as a config names it."""

    ref: str  # as written in the config
    path: Path


@dataclass(frozen=True)
class SliceSource:
    """One model's layers in an output slice (mergekit's `sources:` entry)."""

    model: InputModel
    layer_range: tuple[int, int] | None  # None: every layer of the model (the `models:` form)
    parameters: dict[str, Any]
    where: str  # config path, for messages


@dataclass(frozen=True)
class OutputSlice:
    """A run of output layers merged from the same layers of its sources."""

    sources: tuple[SliceSource, ...]
    base: InputModel | None
    parameters: dict[str, Any]
    where: str
    module: str = ""  # the `modules:` entry it belongs to ("" without `modules:`)


@dataclass(frozen=True)
class Provenance:
    """What a model card says about a merge whose config names its inputs by path only: a step
    of a plan, whose inputs are catalog models and the output of the step before it."""

    origin: str  # one line: which plan, which step, the whole chain
    names: dict[str, str]  # ref -> the catalog name of a model input
    steps: dict[str, str]  # ref -> an earlier step's output, described (an intermediate folder)
    models: tuple[str, ...]  # every checkpoint behind the output so far (the card's base_model)
    kept: dict[str, str] = field(default_factory=dict)  # ref -> the folder an earlier output is kept in


@dataclass(frozen=True)
class MergeSpec:
    """A validated merge config: method, slices in output order, settings."""

    method: MergeMethod
    slices: tuple[OutputSlice, ...]
    base: InputModel | None  # the config's base_model (slices may name their own)
    parameters: dict[str, Any]  # global settings
    dtype: str | None  # the compute dtype, as mergekit (ExecOptions.compute_dtype overrides it)
    out_dtype: str | None
    tokenizer: TokenizerSpec | None
    chat_template: str | None = None  # a template name (chat_templates.NAMES), "auto" or Jinja text
    source: str = "config"  # for messages
    seed: int = 0
    config: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # as given (model card)
    provenance: Provenance | None = field(default=None, compare=False, repr=False)  # a plan step's (model card)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  # `modules:` names -> their parameters

    def module_slices(self, name: str) -> tuple[OutputSlice, ...]:
        return tuple(sl for sl in self.slices if sl.module == name)

    @property
    def module_parameters(self) -> dict[str, Any]:
        """The settings of a config's one `modules:` entry ({} without one, or with several)."""
        return next(iter(self.modules.values())) if len(self.modules) == 1 else {}

    @property
    def inputs(self) -> tuple[InputModel, ...]:
        """Every model the merge reads, each once, in config order."""
        seen: dict[str, InputModel] = {}
        for sl in self.slices:
            for s in sl.sources:
                seen.setdefault(s.model.ref, s.model)
            if sl.base is not None:
                seen.setdefault(sl.base.ref, sl.base)
        if self.base is not None:
            seen.setdefault(self.base.ref, self.base)
        return tuple(seen.values())

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, seed: int = 0) -> "MergeSpec":
        path = Path(path)
        raw = read_yaml(path, "merge config")
        return cls.from_dict(raw, root=path.parent, source=str(path), seed=seed)

    @classmethod
    def from_dict(cls, raw: Any, *, root: Path | None = None, source: str = "config",
                  seed: int = 0, pending: Mapping[str, Path] | None = None) -> "MergeSpec":
        """`pending`: model references that name outputs not written yet (an earlier merge of a
        multi-document config), taken as those paths unchecked, so the config is validated whole
        before the merge it reads runs."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a merge config is a mapping")
        for key in raw:
            if key not in _TOP_KEYS:
                raise ConfigError(f"{source}: unsupported key {key!r} (known: {', '.join(sorted(_TOP_KEYS))})")
        if "merge_method" not in raw:
            raise ConfigError(f"{source}: missing key 'merge_method'")
        try:
            method = get_method(str(raw["merge_method"]))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        resolve = _path_resolver(root, source, pending or {})
        base = None if raw.get("base_model") is None else InputModel(str(raw["base_model"]),
                                                                     resolve(str(raw["base_model"]), "base_model"))
        check = ParamChecker(method, source)
        global_params = check.scope(raw.get("parameters"), "parameters")
        modules: dict[str, dict[str, Any]] = {}
        slices: tuple[OutputSlice, ...] = ()
        for name, body in _module_bodies(raw, source):
            prefix = f"modules.{name}." if name else ""
            if name:
                modules[name] = check.scope(body.get("parameters"), f"{prefix}parameters")
            if "models" in body:
                part = (_models_slice(body["models"], base, method, resolve, check, f"{prefix}models"),)
            else:
                part = _slices(body["slices"], base, method, resolve, check, f"{prefix}slices")
            slices += tuple(replace(sl, module=name) for sl in part)
        if len(modules) > 1 and (raw.get("tokenizer") is not None or raw.get("tokenizer_source") is not None):
            key = "tokenizer" if raw.get("tokenizer") is not None else "tokenizer_source"
            raise ConfigError(f"{source}: {key}: not supported with several modules (got {raw[key]!r})")
        for dt_key in ("dtype", "out_dtype"):
            if raw.get(dt_key) is not None:
                check_float_dtype(raw[dt_key], f"{source}: {dt_key}")
        names = {m.ref for sl in slices for m in (*(s.model for s in sl.sources), sl.base) if m is not None}
        tok = parse_tokenizer(raw, names, source)
        template = raw.get("chat_template")
        if template is not None:
            check_template(template, f"{source}: chat_template")
        spec = cls(method, slices, base, global_params, raw.get("dtype"), raw.get("out_dtype"),
                   tok, template, source, seed, config=raw, modules=modules)
        spec._check_required()
        return spec

    def _check_required(self) -> None:
        """Fail before any tensor is read if a required parameter has no value anywhere."""
        for p in self.method.params:
            if p.default is not None:
                continue
            for sl in self.slices:
                if p.per_model:
                    for s in method_sources(self.method, sl):
                        if all(p.name not in scope for scope in (s.parameters, *self.shared_scopes(sl))):
                            raise ConfigError(f"{self.source}: {s.where}: model {s.model.ref!r}: "
                                              f"missing parameter {p.name!r}")
                elif all(p.name not in scope for scope in self.shared_scopes(sl)):
                    raise ConfigError(f"{self.source}: missing parameter {p.name!r} for {self.method.name}")

    def shared_scopes(self, sl: OutputSlice) -> tuple[dict[str, Any], ...]:
        """Settings below a source's own, highest precedence first (as mergekit reads them)."""
        return sl.parameters, self.modules.get(sl.module, {}), self.parameters


def check_float_dtype(value: Any, where: str) -> None:
    """A ConfigError naming `where` (a config's key, or an option) unless `value` names a float
    dtype: weights are merged and written as floats."""
    try:
        code = dtype_code(str(value))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if code not in FLOAT_DTYPES:
        raise ConfigError(f"{where}: {value!r} is not a float dtype; use one of "
                          f"{', '.join(TORCH_NAMES[c] for c in sorted(FLOAT_DTYPES))}")


def method_sources(method: MergeMethod, sl: OutputSlice) -> list[SliceSource]:
    """The slice's sources the method receives as `tensors`, in order: all of them for methods
    that take the base as an input (SLERP's base first), else all but the base."""
    base = sl.base.ref if sl.base is not None else None
    if method.base_in_inputs:
        out = list(sl.sources)
        if base is not None and method.base_first:
            out.sort(key=lambda s: s.model.ref != base)
        return out
    return [s for s in sl.sources if s.model.ref != base]


def _module_bodies(raw: dict, source: str) -> list[tuple[str, dict]]:
    """The mappings that hold `models` or `slices`, by module name: the config itself (name ""),
    or each of its modules."""
    forms = [k for k in ("models", "slices", "modules") if raw.get(k)]
    if len(forms) != 1:
        raise ConfigError(f"{source}: give exactly one of 'models', 'slices' or 'modules'")
    if forms[0] != "modules":
        return [("", raw)]
    return parse_modules(raw["modules"], source)


def _refuse_extra(entry: dict, allowed: set[str], at: str, source: str) -> None:
    extra = set(entry) - allowed
    if extra:
        raise ConfigError(f"{source}: {at}: unsupported key {sorted(extra)[0]!r}")


def _source(entry: Any, at: str, noun: str, resolve, check: ParamChecker, *, with_range: bool = False) -> SliceSource:
    """One input of a slice: a `models:` entry, or a `sources:` entry (which may carry a layer_range)."""
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(f"{check.source}: {at}: each {noun} needs a 'model' key")
    _refuse_extra(entry, {"model", "parameters", *(("layer_range",) if with_range else ())}, at, check.source)
    ref = str(entry["model"])
    model = InputModel(ref, resolve(ref, at))
    layers = _layer_range(entry, f"{at}.layer_range", check.source) if with_range else None
    return SliceSource(model, layers, check.scope(entry.get("parameters"), f"{at}.parameters"), at)


def _models_slice(items: Any, base: InputModel | None, method: MergeMethod, resolve, check: ParamChecker,
                  where: str) -> OutputSlice:
    """`models:` is one slice over every layer; a base_model not listed is added (as mergekit)."""
    source = check.source
    if not isinstance(items, list):
        raise ConfigError(f"{source}: {where}: expected a non-empty list")
    sources = [_source(m, f"{where}[{i}]", "entry", resolve, check) for i, m in enumerate(items)]
    if base is not None and all(s.model.ref != base.ref for s in sources):
        sources.append(SliceSource(base, None, {}, "base_model"))
    sl = OutputSlice(tuple(sources), base, {}, where)
    _check_contract(method, sl, source)
    return sl


def _slices(items: Any, base: InputModel | None, method: MergeMethod, resolve, check: ParamChecker,
            where: str) -> tuple[OutputSlice, ...]:
    source = check.source
    if not isinstance(items, list):
        raise ConfigError(f"{source}: {where}: expected a non-empty list")
    out = []
    for i, sl in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise ConfigError(f"{source}: {at}: each slice needs a non-empty 'sources' list")
        _refuse_extra(sl, {"sources", "base_model", "parameters"}, at, source)
        sources = [_source(s, f"{at}.sources[{j}]", "source", resolve, check, with_range=True)
                   for j, s in enumerate(sl["sources"])]
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) > 1:
            raise ConfigError(f"{source}: {at}: sources span different numbers of layers "
                              f"({[list(s.layer_range) for s in sources]}); every source of a slice needs as many")
        sl_base = base
        if sl.get("base_model") is not None:
            ref = str(sl["base_model"])
            sl_base = InputModel(ref, resolve(ref, f"{at}.base_model"))
        out_slice = OutputSlice(tuple(sources), sl_base, check.scope(sl.get("parameters"), f"{at}.parameters"), at)
        _check_contract(method, out_slice, source)
        out.append(out_slice)
    return tuple(out)


def _layer_range(s: dict, where: str, source: str) -> tuple[int, int]:
    value = s.get("layer_range")
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not 0 <= value[0] < value[1]):
        raise ConfigError(f"{source}: {where}: expected [start, end] with 0 <= start < end, got {value!r}")
    return int(value[0]), int(value[1])


def _check_contract(method: MergeMethod, sl: OutputSlice, source: str) -> None:
    """The method's base and input-count rules, per slice, as mergekit's input contracts."""
    refs = [s.model.ref for s in sl.sources]
    if len(set(refs)) != len(refs):
        raise ConfigError(f"{source}: {sl.where}: model {next(r for r in refs if refs.count(r) > 1)!r} "
                          f"is listed twice")
    uses_base = method.needs_base or not method.base_in_inputs
    if method.needs_base and sl.base is None:
        raise ConfigError(f"{source}: merge_method {method.name!r} needs a base_model")
    if uses_base and sl.base is not None and sl.base.ref not in refs:
        raise ConfigError(f"{source}: {sl.where}: base_model {sl.base.ref!r} is not among the slice's sources "
                          f"(merge_method {method.name!r} reads it from them)")
    n = len(method_sources(method, sl))
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = f"{method.min_models}" + (f"-{method.max_models}" if method.max_models is not None else "+")
        if method.max_models == method.min_models:
            want = str(method.min_models)
        noun = "model" if want == "1" else "models"
        what = f"{noun} including the base" if method.base_in_inputs and method.needs_base else (
            f"{noun} besides the base" if uses_base else noun)
        raise ConfigError(f"{source}: {sl.where}: merge_method {method.name!r} takes {want} {what}, got {n}")


def _path_resolver(root: Path | None, source: str, pending: Mapping[str, Path]):
    def resolve(ref: str, where: str) -> Path:
        if (found := Path(pending[ref]) if ref in pending else local_checkpoint(ref, root)) is not None:
            return found
        raise ConfigError(
            f"{source}: {where}: model {ref!r} not found as a local path (nothing is downloaded; "
            f"give a checkpoint folder)"
        )
    return resolve
