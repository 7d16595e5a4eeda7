"""A merge plan: an ordered subset of the catalog, one arm per step and a weighting (a fold,
merge/fold.py), with the planner's predictions and how far to trust them.

The target task's expert may sit anywhere in the order. A plan serialises to JSON, to one
mergekit-compatible YAML per step, and (more than one step) to plan.mergekit.yaml, the steps as one
multi-document config as mergekit-multi runs it.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from simmerge_ray.errors import ConfigError
from simmerge_ray.io.shared_vocab import output_tokenizer
from simmerge_ray.merge.arms import Arm
from simmerge_ray.merge.fold import Fold, check_fold
from simmerge_ray.yaml_io import read_text


MULTI_FILE = "plan.mergekit.yaml"
MULTI_STEP = "step-{j}"  # an intermediate's name in MULTI_FILE


@dataclass
class Plan:
    task: str
    models: list[str]  # merge order
    operators: list[str]  # one arm per step, len(models) - 1
    # Pairwise plans: the predicted GapClosed and auxiliary gain of the step. Multi-way plans:
    # per step, the predicted share of the expert's gap it keeps (1 before the expert joins; at
    # its own step, the share it keeps when joining) and of the joining model's own gap.
    step_utility: list[float] = field(default_factory=list)
    step_aux_utility: list[float] = field(default_factory=list)
    score: float = float("nan")  # the objective's value
    objective: dict[str, float] = field(default_factory=dict)
    # How far to trust the numbers above (planner/assess.py); empty in plans written before them.
    arms: list[dict[str, Any]] = field(default_factory=list)  # pairwise: every arm with its intervals
    intervals: dict[str, Any] = field(default_factory=dict)  # per level: steps and the score's bound
    flags: list[dict[str, Any]] = field(default_factory=list)  # inputs outside the training rows
    expert_alone: dict[str, Any] = field(default_factory=dict)  # is not merging predicted better?
    weighting: str | None = None  # fold weighting (merge/arms.py WEIGHTINGS); None: arms as declared
    expert: str = ""  # the target task's expert among `models` (default: the first model)
    retention: dict[str, float | None] = field(default_factory=dict)  # predicted R per model (objective.py)
    excluded: list[dict[str, Any]] = field(default_factory=list)  # candidates left out, with the predicted effect
    # Ranked on measured multi-way merges (planner/calibrate.py): the calibrated expert and others'
    # mean retention (s_merge / s_model - 1), the objective on them, and the subsets fitted on;
    # the top plan's also `top_plan`: those corrected for its being picked (calibrate.py).
    calibrated: dict[str, Any] = field(default_factory=dict)
    # The checkpoints the features were measured from, per model of the plan ({"fingerprint",
    # "signature"}, features/provenance.py): `merge --plan` refuses a model changed since. Empty in
    # plans written before it, or from features without records: then nothing is checked.
    checkpoints: dict[str, dict[str, str]] = field(default_factory=dict)
    # The base the structural features measured task vectors against, as `checkpoints` records a model.
    base_checkpoint: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("models", "operators"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}: expected a list of names, got {value!r}")
        if not isinstance(self.task, str):
            raise ConfigError(f"task: expected a name, got {self.task!r}")
        if not (isinstance(self.checkpoints, dict) and all(
                isinstance(v, dict) and all(isinstance(x, str) for x in v.values()) for v in self.checkpoints.values())):
            raise ConfigError(f"checkpoints: expected {{model: {{fingerprint, signature}}}}, got {self.checkpoints!r}")
        if not (isinstance(self.base_checkpoint, dict) and all(isinstance(x, str) for x in self.base_checkpoint.values())):
            raise ConfigError(f"base_checkpoint: expected {{fingerprint, signature}}, got {self.base_checkpoint!r}")
        if len(self.models) < 2:
            raise ConfigError(f"a plan merges at least two models, got {self.models}")
        check_fold(self.models, self.operators, self.weighting)
        self.expert = self.expert or self.models[0]
        if self.expert not in self.models:
            raise ConfigError(f"plan {self.models}: expert {self.expert!r} is not one of its models")

    @property
    def fold(self) -> Fold:
        return Fold(tuple(self.models), tuple(self.operators), self.weighting)

    def step_arms(self) -> list[Arm]:
        """The arm each step runs, at its share."""
        return self.fold.step_arms()

    @property
    def k(self) -> int:
        return len(self.models)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def load(cls, path: Path) -> "Plan":
        """The plan in file `path` (a plan.json); any problem is one ConfigError naming it."""
        return cls.from_json(read_text(path, "plan"), str(path))

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> "Plan":
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
            _check_fields(raw)
            return cls(**raw)
        except (json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"{where}: not a plan file ({e})") from None
        except ConfigError as e:  # a field the plan checks (an unknown arm or weighting): name the file
            raise ConfigError(f"{where}: {e}") from None

    def step_configs(self, paths: dict[str, Path], base: Path | None, step_dir: str = "step-{j}") -> list[dict]:
        """mergekit configs, one per step; step j reads the output of step j-1 from `step_dir`."""
        missing = [m for m in self.models if m not in paths]
        if missing:
            raise ConfigError(f"plan names models absent from the catalog: {', '.join(missing)}")
        configs = []
        prev = str(paths[self.models[0]])
        vocab = output_tokenizer([paths[m] for m in self.models] + ([base] if base is not None else []))
        for j, (arm, model) in enumerate(zip(self.step_arms(), self.models[1:]), start=1):
            configs.append(arm.mergekit_config(prev, str(paths[model]), None if base is None else str(base)) | vocab)
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
            when = "run:" if j == 1 else f"run after step{'s 1-' if j > 2 else ' '}{j - 1}:"
            f.write_text(f"# step {j}/{self.k - 1} of plan {' -> '.join(self.models)}; {when}\n"
                         f"#   simmerge merge {shlex.quote(here)} --out {shlex.quote(out)}\n"
                         + yaml.safe_dump(cfg, sort_keys=False))
            files.append(f)
        if self.k > 2:
            self._write_multi(out_dir, paths, base, root)
        return files

    def _write_multi(self, out_dir: Path, paths: dict[str, Path], base: Path | None, root: Path | None) -> Path:
        """plan.mergekit.yaml: every step in one multi-document mergekit config (mergekit-multi's
        format), steps 1..k-2 named `step-<j>` and read by the next step by that name, the last
        unnamed (the final); runs with `simmerge merge` (resumable) and `mergekit-multi` alike."""
        steps = self.step_configs(paths, base, step_dir=MULTI_STEP)
        docs = [({"name": MULTI_STEP.format(j=j)} if j < len(steps) else {}) | cfg
                for j, cfg in enumerate(steps, start=1)]
        f = out_dir / MULTI_FILE
        here = shlex.quote(str(root / MULTI_FILE) if root is not None else MULTI_FILE)
        f.write_text(f"# plan {' -> '.join(self.models)}: its {len(steps)} steps as one multi-document mergekit "
                     f"config (step-<j> read by the next step by name; the last document, unnamed, is the final); run:\n"
                     f"#   simmerge merge {here} --out MERGED\n"
                     f"#   mergekit-multi {here} --out-path MERGED -I INTERMEDIATES\n"
                     + yaml.safe_dump_all(docs, sort_keys=False))
        return f


def _check_fields(raw: dict[str, Any]) -> None:
    """A ConfigError naming the field a plan lacks or that this version does not know (a plan
    from another simmerge version, or a typo), not Python's message about `Plan.__init__()`."""
    known = {f.name: f for f in fields(Plan)}
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise ConfigError(f"unknown field {unknown[0]!r} (a plan written by another simmerge version?); "
                          f"known: {', '.join(known)}")
    missing = [n for n, f in known.items()
               if n not in raw and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"not a plan file (missing field {missing[0]!r})")
