"""mergekit-compatible merge configs: parsing, validation, and per-tensor parameter resolution.

Accepted: `models:` lists, or `slices:` whose sources all span the same full layer range (the
usual SLERP form); `base_model`, `merge_method`, `parameters` (global and per model), `dtype`,
`out_dtype`, `tokenizer_source` (base or a model). Parameter values may be scalars, gradients
(lists interpolated over relative depth, as mergekit reads them) or filtered lists
(`- filter: self_attn\n  value: ...`). Any other key is an error naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simmerge_ray.errors import ConfigError
from simmerge_ray.yaml_io import read_yaml
from simmerge_ray.io.checkpoint import layer_index
from simmerge_ray.io.safetensors_format import dtype_code
from simmerge_ray.merge.operators import MergeMethod, get_method

_TOP_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
             "tokenizer_source"}
_UNSUPPORTED = {
    "modules": "per-module configs (multimodal models) are not supported",
    "tokenizer": "tokenizer surgery is not supported; use tokenizer_source: base or a model",
    "chat_template": "chat_template is not supported; edit the output's tokenizer_config.json",
}


@dataclass(frozen=True)
class InputModel:
    """One input checkpoint and its own parameter settings (mergekit's `models:` entry)."""

    ref: str  # as written in the config
    path: Path
    parameters: dict[str, Any]


@dataclass(frozen=True)
class MergeSpec:
    """A validated merge: method, inputs in order, base, settings, output dtype."""

    method: MergeMethod
    inputs: tuple[InputModel, ...]  # models whose tensors the method receives, in order
    base: InputModel | None
    parameters: dict[str, Any]  # global settings
    dtype: str | None  # mergekit's working dtype; we always compute in float32
    out_dtype: str | None
    tokenizer_source: str | None
    source: str = "config"  # for messages
    seed: int = 0

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, seed: int = 0) -> "MergeSpec":
        path = Path(path)
        raw = read_yaml(path, "merge config")
        return cls.from_dict(raw, root=path.parent, source=str(path), seed=seed)

    @classmethod
    def from_dict(cls, raw: Any, *, root: Path | None = None, source: str = "config",
                  seed: int = 0) -> "MergeSpec":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a merge config is a mapping")
        for key in raw:
            if key in _UNSUPPORTED:
                raise ConfigError(f"{source}: key {key!r}: {_UNSUPPORTED[key]}")
            if key not in _TOP_KEYS:
                raise ConfigError(f"{source}: unsupported key {key!r} (known: {', '.join(sorted(_TOP_KEYS))})")
        if "merge_method" not in raw:
            raise ConfigError(f"{source}: missing key 'merge_method'")
        method = get_method(str(raw["merge_method"]))
        if ("models" in raw) == ("slices" in raw):
            raise ConfigError(f"{source}: give exactly one of 'models' or 'slices'")
        entries = _model_entries(raw, source)
        global_params = _params(raw.get("parameters"), f"{source}: parameters")
        for name in global_params:
            _check_param_name(method, name, f"{source}: parameters")
        for ref, params, where in entries:
            for name in params:
                _check_param_name(method, name, f"{where}.parameters")
        resolve = _path_resolver(root, source)
        models = [InputModel(ref, resolve(ref, where), params) for ref, params, where in entries]
        base = None
        if raw.get("base_model") is not None:
            ref = str(raw["base_model"])
            base = next((m for m in models if m.ref == ref), None) or InputModel(
                ref, resolve(ref, "base_model"), {}
            )
        if method.needs_base and base is None:
            raise ConfigError(f"{source}: merge_method {method.name!r} needs a base_model")
        if method.base_in_inputs:
            inputs = list(models)
            if base is not None and all(m.ref != base.ref for m in models):
                inputs.append(base)  # mergekit adds a base that is not listed
            if base is not None and method.base_first:
                inputs.sort(key=lambda m: m.ref != base.ref)  # the base is slerp's t=0 end
        else:
            inputs = [m for m in models if base is None or m.ref != base.ref]
        if len(inputs) < method.min_models or (method.max_models and len(inputs) > method.max_models):
            want = f"{method.min_models}" + (f"-{method.max_models}" if method.max_models else "+")
            raise ConfigError(
                f"{source}: merge_method {method.name!r} takes {want} models"
                f"{' including the base' if method.base_in_inputs and method.needs_base else ''}, got {len(inputs)}"
            )
        for dt_key in ("dtype", "out_dtype"):
            if raw.get(dt_key) is not None:
                try:
                    dtype_code(str(raw[dt_key]))
                except ValueError as e:
                    raise ConfigError(f"{source}: {dt_key}: {e}") from None
        tok = raw.get("tokenizer_source")
        if tok is not None and tok != "base" and all(m.ref != tok for m in models):
            raise ConfigError(f"{source}: tokenizer_source {tok!r} must be 'base' or one of the models")
        spec = cls(method, tuple(inputs), base, global_params, raw.get("dtype"), raw.get("out_dtype"),
                   tok, source, seed)
        spec._check_required()
        return spec

    def _check_required(self) -> None:
        """Fail before any tensor is read if a required parameter has no value anywhere."""
        for p in self.method.params:
            if p.default is not None:
                continue
            if p.per_model:
                for m in self.inputs:
                    if p.name not in m.parameters and p.name not in self.parameters:
                        raise ConfigError(f"{self.source}: model {m.ref!r}: missing parameter {p.name!r}")
            elif p.name not in self.parameters:
                raise ConfigError(f"{self.source}: missing parameter {p.name!r} for {self.method.name}")

    def check_tensors(self, names: list[str], num_layers: int) -> None:
        """Resolve every tensor's parameters up front: a bad value fails before any read."""
        for name in names:
            options, per_model = self.resolve(name, num_layers)
            if self.method.check is not None:
                try:
                    self.method.check(name, options, per_model)
                except ConfigError as e:
                    raise ConfigError(f"{self.source}: {e}") from None

    # ---- per-tensor resolution -----------------------------------------------------------
    def resolve(self, tensor_name: str, num_layers: int) -> tuple[dict[str, Any], dict[str, list[Any]]]:
        """(global options, per-model values) for one tensor, gradients and filters applied.

        A tensor in block i of n gets t = i/(n-1) (1 when n == 1); tensors outside blocks get
        t = 0, as mergekit does.
        """
        idx = layer_index(tensor_name)
        t = 0.0 if idx is None else (idx / (num_layers - 1) if num_layers > 1 else 1.0)
        options: dict[str, Any] = {}
        per_model: dict[str, list[Any]] = {}
        for p in self.method.params:
            if p.per_model:
                per_model[p.name] = [
                    self._value(p.name, (m.parameters, self.parameters), tensor_name, t, p.default, m.ref)
                    for m in self.inputs
                ]
            else:
                options[p.name] = self._value(p.name, (self.parameters,), tensor_name, t, p.default, None)
        return options, per_model

    def _value(self, name: str, scopes: tuple[dict, ...], tensor_name: str, t: float, default: Any,
               model: str | None) -> Any:
        for scope in scopes:
            if name in scope:
                value = evaluate_setting(scope[name], tensor_name, t)
                if value is not None:
                    return self._typed(name, value, default, model)
        if default is None:
            where = f"model {model!r}, " if model else ""
            raise ConfigError(f"{self.source}: {where}tensor {tensor_name!r}: no value for parameter {name!r}")
        return default


    def _typed(self, name: str, value: Any, default: Any, model: str | None) -> Any:
        """A flag (a parameter whose default is a bool) must be a bool, any other parameter a
        finite number: `density: abc` is a one-line error here, not a traceback mid-merge."""
        where = f"{self.source}: {f'model {model!r}: ' if model else ''}parameter {name!r}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return value


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """A parameter's value for one tensor: scalars as is, numeric lists interpolated at t,
    other lists indexed at t, filtered lists matched by substring of the tensor name."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
                scaled = t * (len(setting) - 1)
                i0 = int(scaled)
                i1 = min(len(setting) - 1, i0 + 1)
                frac = scaled - i0
                return (1 - frac) * setting[i0] + frac * setting[i1]
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or flt in tensor_name:
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    raise ConfigError(f"unexpected parameter value {setting!r}")


def _model_entries(raw: dict, source: str) -> list[tuple[str, dict, str]]:
    """(model ref, its parameters, where) from `models:` or full-range `slices:`."""
    if "models" in raw:
        items = raw["models"]
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{source}: 'models' must be a non-empty list")
        out = []
        for i, m in enumerate(items):
            where = f"{source}: models[{i}]"
            if not isinstance(m, dict) or "model" not in m:
                raise ConfigError(f"{where}: each entry needs a 'model' key")
            extra = set(m) - {"model", "parameters"}
            if extra:
                raise ConfigError(f"{where}: unsupported key {sorted(extra)[0]!r}")
            out.append((str(m["model"]), _params(m.get("parameters"), where), where))
        return out
    slices = raw["slices"]
    if not isinstance(slices, list) or len(slices) != 1:
        raise ConfigError(
            f"{source}: slices: only one slice covering every layer is supported "
            f"(layer-stacking 'passthrough' merges are not)"
        )
    sl = slices[0]
    extra = set(sl) - {"sources"}
    if extra:
        raise ConfigError(f"{source}: slices[0]: unsupported key {sorted(extra)[0]!r}")
    out = []
    ranges = set()
    for i, s in enumerate(sl.get("sources") or []):
        where = f"{source}: slices[0].sources[{i}]"
        extra = set(s) - {"model", "layer_range", "parameters"}
        if extra:
            raise ConfigError(f"{where}: unsupported key {sorted(extra)[0]!r}")
        ranges.add(tuple(s.get("layer_range") or ()))
        out.append((str(s["model"]), _params(s.get("parameters"), where), where))
    if len(ranges) > 1:
        raise ConfigError(f"{source}: slices[0]: sources have different layer_range {sorted(ranges)}")
    return out


def _params(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'parameters' must be a mapping")
    return dict(value)


def _check_param_name(method: MergeMethod, name: str, where: str) -> None:
    try:
        method.param(name)
    except KeyError:
        known = ", ".join(p.name for p in method.params)
        raise ConfigError(f"{where}: unknown parameter {name!r} for {method.name} (known: {known})") from None


def _path_resolver(root: Path | None, source: str):
    def resolve(ref: str, where: str) -> Path:
        for cand in (Path(ref).expanduser(), (root / ref) if root else None):
            if cand is not None and cand.exists():
                return cand.resolve()
        raise ConfigError(
            f"{source}: {where}: model {ref!r} not found as a local path (nothing is downloaded; "
            f"give a checkpoint folder)"
        )
    return resolve
