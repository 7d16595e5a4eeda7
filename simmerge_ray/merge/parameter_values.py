"""A `parameters:` value as a mergekit config writes it: a scalar, a gradient (a list of numbers
interpolated over a slice's relative depth, or of other values indexed by it), or filtered values
(`- filter: self_attn\n  value: ...`, matched by substring of the tensor name). Checked once at
load (ParamChecker: every value it can take, so a bad one fails before any checkpoint opens) and
evaluated per tensor when the merge is planned (evaluate_setting)."""

from __future__ import annotations

from typing import Any

from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.operators import MergeMethod, Param


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """A parameter's value for one tensor: scalars as is, numeric lists interpolated at t,
    other lists indexed at t, filtered lists matched by substring of the tensor name."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
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


class ParamChecker:
    """Checks a `parameters:` mapping at load: known names, and every value it can take (each
    scalar, gradient point and filtered value) of the parameter's type and range."""

    def __init__(self, method: MergeMethod, source: str) -> None:
        self.method = method
        self.source = source

    def scope(self, value: Any, where: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.source}: {where}: expected a mapping of parameters, got {value!r}")
        for name, setting in value.items():
            try:
                param = self.method.param(name)
            except KeyError:
                known = ", ".join(p.name for p in self.method.params) or "none"
                raise ConfigError(f"{self.source}: {where}: unknown parameter {name!r} for "
                                  f"{self.method.name} (known: {known})") from None
            self._setting(param, setting, f"{where}.{name}")
        return dict(value)

    def _setting(self, param: Param, setting: Any, where: str) -> None:
        if isinstance(setting, dict):
            setting = [setting]
        if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
            for i, cond in enumerate(setting):
                extra = set(cond) - {"filter", "value"}
                if "value" not in cond or extra:
                    raise ConfigError(f"{self.source}: {where}[{i}]: a filtered value is "
                                      f"{{filter: NAME, value: VALUE}}, got {cond!r}")
                if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                    raise ConfigError(f"{self.source}: {where}[{i}].filter: expected a string, "
                                      f"got {cond['filter']!r}")
                self._setting(param, cond["value"], f"{where}[{i}].value")
            return
        values = setting if isinstance(setting, list) else [setting]
        if isinstance(setting, list) and not setting:
            raise ConfigError(f"{self.source}: {where}: empty list")
        for v in values:
            problem = param.problem(v)
            if problem:
                raise ConfigError(f"{self.source}: {where}: {problem}, got {v!r}")
        if isinstance(setting, list) and len(setting) > 1 and any(isinstance(v, bool) for v in setting) \
                and not isinstance(param.default, bool):
            raise ConfigError(f"{self.source}: {where}: a gradient is a list of numbers, got {setting!r}")
