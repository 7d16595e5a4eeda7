"""A multi-way merge plan: an ordered subset of the catalog and one operator per step.

Merged as a left fold, M_1 = m_1, M_j = op_{j-1}(M_{j-1}, m_j), each step with the testbed's
default parameters (the ones its labels were measured with), so a plan's predicted utility and
its measured outcome refer to the same merge. A plan serialises to JSON and to one
mergekit-compatible YAML per step.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from simmerge_ray.errors import ConfigError

# Step parameters: the first input is the merge so far, the second the joining model.
STEP_PARAMS: dict[str, dict[str, Any]] = {
    "linear": {"weight": [0.5, 0.5], "normalize": True},
    "slerp": {"t": 0.5},
    "ties": {"weight": [1.0, 1.0], "density": [0.5, 0.5], "normalize": True},
}


@dataclass
class Plan:
    task: str
    models: list[str]  # merge order; models[0] is the expert of `task`
    operators: list[str]  # one per step, len(models) - 1
    step_utility: list[float] = field(default_factory=list)  # predicted GapClosed per step
    step_aux_utility: list[float] = field(default_factory=list)  # predicted aux gain per step
    score: float = float("nan")  # the objective's value
    objective: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise ConfigError(f"a plan merges at least two models, got {self.models}")
        if len(self.operators) != len(self.models) - 1:
            raise ConfigError(f"plan {self.models}: {len(self.operators)} operators for {len(self.models) - 1} steps")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"plan {self.models}: a model appears twice")
        for op in self.operators:
            if op not in STEP_PARAMS:
                raise ConfigError(f"plan {self.models}: unknown step operator {op!r} (known: {', '.join(STEP_PARAMS)})")

    @property
    def k(self) -> int:
        return len(self.models)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> "Plan":
        try:
            raw = json.loads(text)
            return cls(**raw)
        except (json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"{where}: not a plan file ({e})") from None

    def step_configs(self, paths: dict[str, Path], base: Path | None, step_dir: str = "step-{j}") -> list[dict]:
        """mergekit configs, one per step; step j reads the output of step j-1 from `step_dir`."""
        missing = [m for m in self.models if m not in paths]
        if missing:
            raise ConfigError(f"plan names models absent from the catalog: {', '.join(missing)}")
        configs = []
        prev = str(paths[self.models[0]])
        for j, (op, model) in enumerate(zip(self.operators, self.models[1:]), start=1):
            p = STEP_PARAMS[op]
            cur = str(paths[model])
            if op == "slerp":
                cfg = {"merge_method": "slerp", "base_model": prev, "parameters": {"t": p["t"]},
                       "models": [{"model": prev}, {"model": cur}]}
            else:
                per = [{k: v[i] for k, v in p.items() if isinstance(v, list)} for i in range(2)]
                cfg = {"merge_method": op, "models": [{"model": prev, "parameters": per[0]},
                                                      {"model": cur, "parameters": per[1]}],
                       "parameters": {k: v for k, v in p.items() if not isinstance(v, list)}}
                if op == "ties":
                    if base is None:
                        raise ConfigError("a TIES step needs the catalog's base model")
                    cfg["base_model"] = str(base)
            configs.append(cfg)
            prev = step_dir.format(j=j)
        return configs

    def write(self, out_dir: Path, paths: dict[str, Path], base: Path | None) -> list[Path]:
        """plan.json plus step-<j>.yaml files (step j's output folder is `step-<j>`)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "plan.json").write_text(self.to_json())
        files = []
        for j, cfg in enumerate(self.step_configs(paths, base), start=1):
            f = out_dir / f"step-{j}.yaml"
            f.write_text(f"# step {j}/{self.k - 1} of plan {' -> '.join(self.models)}; run from this folder\n"
                         + yaml.safe_dump(cfg, sort_keys=False))
            files.append(f)
        return files
