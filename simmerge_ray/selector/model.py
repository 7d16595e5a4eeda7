"""f_plan: an MLP from standardised pair features (+ optional task one-hot) to one utility per
operator, saved as a self-describing folder.

The folder holds the weights (safetensors), the feature schema, the standardisation
statistics, the operator list and the training config, so a selector applies to any feature
table with the same schema, and refuses one without it. Selectors fitted by `simmerge fit` also
hold their interval calibration and training domain (calibration.py, domain.py); a folder
without them (an older fit) still loads, with both None.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from simmerge_ray.errors import ConfigError, first_line
from simmerge_ray.io.atomic import atomic_output_dir
from simmerge_ray.selector.calibration import Calibration
from simmerge_ray.selector.domain import TrainingDomain

WEIGHTS = "selector.safetensors"
SCHEMA = "selector.json"


@dataclass(frozen=True)
class SelectorConfig:
    """Hyperparameters (what Ray Tune searches) and training settings."""

    hidden: int = 64
    depth: int = 2
    dropout: float = 0.1
    lr: float = 3e-3
    weight_decay: float = 1e-4
    epochs: int = 300
    task_encoding: bool = True
    seed: int = 0
    members: int = 1  # networks averaged, drawn one after another from `seed`; 1: one network

    def __post_init__(self) -> None:
        if not (isinstance(self.members, int) and self.members >= 1):
            raise ConfigError(f"selector config: members must be an integer >= 1, got {self.members!r}")
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise ConfigError(f"selector config: epochs must be an integer >= 1, got {self.epochs!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SelectorConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"selector config: unknown keys {sorted(unknown)}")
        return cls(**d)


class SelectorMLP(nn.Module):
    """Hidden layers (the bandit's encoder g) followed by a linear utility head."""

    def __init__(self, d_in: int, n_out: int, hidden: int, depth: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout)]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SelectorEnsemble(nn.Module):
    """Networks of one configuration, initial weights drawn one after another, trained side by side, whose
    predictions are averaged: a single network's pick changes with its seed on a quarter of the
    demo's pairs (benchmarks/selector_seeds.py), the average's much less.

    Training mode returns every member's output ([members, n, arms]), so that each member fits the
    labels on its own (train_epochs) and data-parallel training still goes through forward; eval
    mode returns their mean. The bandit's frozen encoder is the members' predictions side by side
    (`encode`, members x arms wide) and its prior head the average over members per arm (`head`):
    the warm start begins at the ensemble's own prediction, and the bandit may learn to trust
    some members more on an arm. (Their last hidden layers side by side would be as exact, but
    members x hidden wide: 1,024 features for 8 members of 128, which made the bandit's replay
    take tens of minutes instead of seconds.)"""

    def __init__(self, members: list[SelectorMLP]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.stack([m(x) for m in self.members])
        return out if self.training else out.mean(0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.members], dim=1)

    @property
    def head(self) -> nn.Linear:
        """arm a's output = the mean of every member's output for arm a."""
        arms = self.members[0].head.out_features
        mean = nn.Linear(arms * len(self.members), arms)
        with torch.no_grad():
            mean.weight.copy_(torch.eye(arms).repeat(1, len(self.members)) / len(self.members))
            mean.bias.zero_()
        return mean


def build_net(d_in: int, n_out: int, cfg: SelectorConfig) -> SelectorMLP | SelectorEnsemble:
    """cfg.members networks drawn one after the other from torch's current seed (a single one is
    the network itself, so one-member selectors keep their weights' names)."""
    nets = [SelectorMLP(d_in, n_out, cfg.hidden, cfg.depth, cfg.dropout) for _ in range(cfg.members)]
    return nets[0] if cfg.members == 1 else SelectorEnsemble(nets)


@dataclass
class Selector:
    """A trained selector: schema + statistics + network."""

    feature_names: list[str]
    operators: list[str]
    tasks: list[str]  # known tasks, for the one-hot; empty when task encoding is off
    mean: np.ndarray
    scale: np.ndarray
    config: SelectorConfig
    net: SelectorMLP | SelectorEnsemble
    meta: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None  # interval half-widths per arm (None: not calibrated)
    domain: TrainingDomain | None = None  # what the training rows covered (None: not recorded)

    # ---- inputs ----------------------------------------------------------------------------
    def standardise(self, x: np.ndarray) -> np.ndarray:
        """z-scores of the features with the training statistics (NaN stays NaN: undefined)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ConfigError(f"selector expects {len(self.feature_names)} features, got shape {x.shape}")
        if np.isinf(x).any():  # NaN is imputed; an infinity would make the row's predictions NaN
            i, j = np.argwhere(np.isinf(x))[0]
            raise ConfigError(f"selector input: feature {self.feature_names[j]!r} is {x[i, j]} in row {i}; "
                              f"features must be finite (NaN marks undefined)")
        return (x - self.mean) / self.scale

    def design(self, x: np.ndarray, tasks: list[str] | None) -> torch.Tensor:
        """Standardise features and append the task one-hot (zeros for an unknown task)."""
        z = self.standardise(x)
        if self.config.task_encoding and self.tasks:
            onehot = np.zeros((len(z), len(self.tasks)))
            for i, t in enumerate(tasks or [None] * len(z)):
                if t in self.tasks:
                    onehot[i, self.tasks.index(t)] = 1.0
            z = np.concatenate([z, onehot], axis=1)
        return torch.as_tensor(np.nan_to_num(z), dtype=torch.float32)

    # ---- outputs ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: np.ndarray, tasks: list[str] | None = None) -> np.ndarray:
        """Predicted utility per operator, [n, k]."""
        self.net.eval()
        return self.net(self.design(x, tasks)).double().numpy()

    def choose(self, x: np.ndarray, tasks: list[str] | None = None) -> list[str]:
        return [self.operators[i] for i in self.predict(x, tasks).argmax(axis=1)]

    @torch.no_grad()
    def encode(self, x: np.ndarray, tasks: list[str] | None = None) -> np.ndarray:
        """The last hidden layer: the frozen context encoder of the online bandit."""
        self.net.eval()
        return self.net.encode(self.design(x, tasks)).double().numpy()

    @property
    def width(self) -> int:
        if self.config.members > 1:  # the members' predictions (SelectorEnsemble.encode)
            return self.config.members * len(self.operators)
        return self.config.hidden if self.config.depth > 0 else len(self.feature_names) + len(self.tasks)

    # ---- persistence -----------------------------------------------------------------------
    def save(self, out: str | Path, *, overwrite: bool = True) -> Path:
        with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
            save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, tmp / WEIGHTS)
            (tmp / SCHEMA).write_text(json.dumps({
                "feature_names": self.feature_names, "operators": self.operators, "tasks": self.tasks,
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "config": asdict(self.config),
                "meta": self.meta,
                **({"calibration": self.calibration.to_dict()} if self.calibration else {}),
                **({"domain": self.domain.to_dict()} if self.domain else {}),
            }, indent=1))
        return Path(out)

    @classmethod
    def load(cls, path: str | Path) -> "Selector":
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path}: not a selector folder (a `simmerge fit` output)")
        try:
            raw = json.loads((path / SCHEMA).read_text())
            state = load_file(path / WEIGHTS)
        except FileNotFoundError as e:  # safetensors' reader raises it without a file name
            raise ConfigError(f"{path}: not a selector folder ({e.filename or path / WEIGHTS} missing)") from None
        except (OSError, ValueError, SafetensorError) as e:  # truncated or corrupt files
            raise ConfigError(f"{path}: unreadable selector ({type(e).__name__}: {e})") from None
        try:
            _check_schema_fields(raw)
            cfg = SelectorConfig.from_dict(raw["config"])
            tasks = list(raw["tasks"])
            d_in = len(raw["feature_names"]) + (len(tasks) if cfg.task_encoding else 0)
            net = build_net(d_in, len(raw["operators"]), cfg)
            net.load_state_dict(state)
            mean, scale = np.asarray(raw["mean"], dtype=float), np.asarray(raw["scale"], dtype=float)
        except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as e:  # RuntimeError: weights of another shape
            raise ConfigError(f"{path / SCHEMA}: not a selector's schema or weights "
                              f"({type(e).__name__}: {first_line(e, fallback='')})") from None
        where = str(path / SCHEMA)
        _check_statistics_shape(mean, scale, len(raw["feature_names"]), path)
        _check_finite(state, mean, scale, path)
        calib = Calibration.from_dict(raw["calibration"], raw["operators"], where) if "calibration" in raw else None
        domain = TrainingDomain.from_dict(raw["domain"], raw["feature_names"], where) if "domain" in raw else None
        return cls(raw["feature_names"], raw["operators"], tasks, mean, scale, cfg, net, raw.get("meta", {}),
                   calib, domain)

    def check_schema(self, available: list[str], where: str) -> None:
        """Refuse a feature table that lacks this selector's features (name the first few)."""
        missing = [n for n in self.feature_names if n not in available]
        if missing:
            raise ConfigError(
                f"{where}: lacks {len(missing)} of the selector's {len(self.feature_names)} features "
                f"(e.g. {', '.join(missing[:3])}); it was trained on another feature schema"
            )


def _names(raw: dict[str, Any], key: str) -> list[str]:
    """raw[key] as a list of distinct non-empty names: the columns, arms and tasks the selector
    looks up by name (a string would be read as its letters, a number or a repeat breaks lookups)."""
    v = raw[key]
    if not isinstance(v, list):
        raise ConfigError(f"{key} is {type(v).__name__}, not a list of names")
    for i, n in enumerate(v):
        if not (isinstance(n, str) and n):
            raise ConfigError(f"{key}[{i}] is {n!r}, not a name")
        if n in v[:i]:
            raise ConfigError(f"{key}: {n!r} is listed twice")
    return v


def _check_schema_fields(raw: dict[str, Any]) -> None:
    """The names, meta and config of selector.json hold the types `save` writes: a hand-edited
    field of another type was read as something else (a task list "code" as four one-letter
    tasks, task_encoding "no" as true) or failed deep inside a plan with a traceback."""
    for key in ("feature_names", "operators", "tasks"):
        _names(raw, key)
    for key in ("mean", "scale"):  # numpy reads `true` as 1.0 and "0.5" as 0.5
        v = raw[key]
        if not isinstance(v, list):
            raise ConfigError(f"{key} is {type(v).__name__}, not a list of numbers")
        for i, x in enumerate(v):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise ConfigError(f"{key}[{i}] is {x!r}, not a number")
    if not raw["operators"]:
        raise ConfigError("operators is empty")
    meta = raw.get("meta", {})
    if not isinstance(meta, dict) or not isinstance(meta.get("target", ""), str):
        raise ConfigError(f"meta is {meta!r}, not an object whose target is a name")
    cfg = raw["config"]
    if not isinstance(cfg, dict):
        raise ConfigError(f"config is {type(cfg).__name__}, not an object")
    for name, f in SelectorConfig.__dataclass_fields__.items():
        v, want = cfg.get(name, f.default), type(f.default)
        ok = isinstance(v, bool) if want is bool else (
            not isinstance(v, bool) and isinstance(v, (int, float) if want is float else want))
        if not ok:
            raise ConfigError(f"selector config: {name} is {v!r}, not {'a number' if want is float else want.__name__}")


def _check_statistics_shape(mean: np.ndarray, scale: np.ndarray, features: int, path: Path) -> None:
    """One mean and one scale per feature: numpy would broadcast a single entry (or fail on
    another count) when standardising, so a schema edited or from another fit is refused here."""
    for field, v in (("mean", mean), ("scale", scale)):
        if v.shape != (features,):
            raise ConfigError(f"{path / SCHEMA}: {field} holds shape {list(v.shape)}, not one entry for each "
                              f"of the {features} features")


def _check_finite(state: dict[str, torch.Tensor], mean: np.ndarray, scale: np.ndarray, path: Path) -> None:
    """A NaN weight or a standardisation that divides by zero would make every prediction NaN,
    and every plan's score with it: refused where the selector is read, naming what is wrong."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ConfigError(f"{path / WEIGHTS}: tensor {name!r} holds NaN or Inf values")
    for field, v, ok, need in (("mean", mean, np.isfinite(mean), "a finite number"),
                               ("scale", scale, np.isfinite(scale) & (scale > 0), "a finite number > 0")):
        bad = np.flatnonzero(~ok)
        if bad.size:
            raise ConfigError(f"{path / SCHEMA}: {field}[{bad[0]}] is {float(v[bad[0]])}, not {need}")
