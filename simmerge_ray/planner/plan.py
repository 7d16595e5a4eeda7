"""A multi-way merge plan: an ordered subset of the catalog and one arm per step.

Merged as a left fold, M_1 = m_1, M_j = arm_{j-1}(M_{j-1}, m_j), each step an arm of
merge/arms.py (the parameters the labels were measured with), so a plan's predicted utility and
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
from simmerge_ray.merge.arms import get_arm

@dataclass
class Plan:
    task: str
    models: list[str]  # merge order; models[0] is the expert of `task`
    operators: list[str]  # one per step, len(models) - 1
    step_utility: list[float] = field(default_factory=list)  # predicted GapClosed per step
    step_aux_utility: list[float] = field(default_factory=list)  # predicted aux gain per step
    score: float = float("nan")  # the objective's value
    objective: dict[str, float] = field(default_factory=dict)
    # How far to trust the numbers above (planner/assess.py); empty in plans written before them.
    arms: list[dict[str, Any]] = field(default_factory=list)  # pairwise: every arm with its intervals
    intervals: dict[str, Any] = field(default_factory=dict)  # per level: steps and the score's bound
    flags: list[dict[str, Any]] = field(default_factory=list)  # inputs outside the training rows
    expert_alone: dict[str, Any] = field(default_factory=dict)  # is not merging predicted better?

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise ConfigError(f"a plan merges at least two models, got {self.models}")
        if len(self.operators) != len(self.models) - 1:
            raise ConfigError(f"plan {self.models}: {len(self.operators)} operators for {len(self.models) - 1} steps")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"plan {self.models}: a model appears twice")
        for op in self.operators:
            get_arm(op)  # an unknown arm is a ConfigError listing the known ones

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
            configs.append(get_arm(op).mergekit_config(prev, str(paths[model]), None if base is None else str(base)))
            prev = step_dir.format(j=j)
        return configs

    def write(self, out_dir: Path, paths: dict[str, Path], base: Path | None,
              step_root: Path | None = None) -> list[Path]:
        """plan.json plus step-<j>.yaml files; step j's output folder is `step_root/step-<j>`.

        With `step_root` (the plan folder's final, absolute place) each step file names the
        previous step's output by its absolute path, so it runs from any folder, with mergekit too;
        without, by `step-<j>`, which our engine finds beside the file when the current folder
        has no such folder."""
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "plan.json").write_text(self.to_json())
        root = Path(step_root).resolve() if step_root is not None else None
        step_dir = str(root / "step-{j}") if root is not None else "step-{j}"
        files = []
        for j, cfg in enumerate(self.step_configs(paths, base, step_dir=step_dir), start=1):
            f = out_dir / f"step-{j}.yaml"
            last = j == self.k - 1
            out = "MERGED" if last else step_dir.format(j=j)
            here = str(root / f.name) if root is not None else f.name
            f.write_text(f"# step {j}/{self.k - 1} of plan {' -> '.join(self.models)}; run (after the steps before it):\n"
                         f"#   simmerge merge {here} --out {out}\n" + yaml.safe_dump(cfg, sort_keys=False))
            files.append(f)
        return files
