"""One planning request, from its fields to the written plan: shared by `simmerge plan` and the
batch planner, so a plan made in a batch is the plan a single call makes, by construction.

A request names a target task, the candidate models (a list, a glob over catalog names, or the
whole catalog), the plan size range, the objective's weights and optionally the expert every
plan must hold. Checks that need the catalog (unknown model or task, a required expert
outside the candidates) happen here; those that need features (a pair without features) happen
during the search. Both raise ConfigError naming the model, task or field at fault.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import ConfigError, first_line
from simmerge_ray.planner.calibrate import MultiwayCalibration
from simmerge_ray.planner.objective import Objective
from simmerge_ray.planner.search import SearchResult, SearchSpace, StepModel, search
from simmerge_ray.features.schema import check_finite_features, read_feature_table
from simmerge_ray.selector.data import features_file

if TYPE_CHECKING:
    from simmerge_ray.planner.step_model import SelectorStepModel
    from simmerge_ray.selector.model import Selector


class PlanRequest(BaseModel):
    """One row of a request table (the fields of `simmerge plan`'s multi-way mode)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    request_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    task: str = Field(min_length=1)
    models: list[str] | None = Field(default=None, min_length=1)  # candidate models
    model_glob: str | None = Field(default=None, min_length=1)  # or: catalog models whose name matches (fnmatch)
    min_way: int = 2
    max_way: int = 4
    required_expert: str | None = Field(default=None, min_length=1)
    retention_weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    aux_weight: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    beam_width: int = Field(default=64, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, raw: object) -> object:
        """pydantic reads `true` as 1 and "3" as 3: a request row's `beam_width: true` planned with
        a beam of 1, and `min_way: true` was reported as a size range the user never wrote."""
        if isinstance(raw, dict):
            for name in _NUMBERS:
                v = raw.get(name)
                if isinstance(v, (bool, str)):
                    raise ValueError(f"{name}: {json.dumps(v)} is not a number")
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> "PlanRequest":
        if self.models is not None and self.model_glob is not None:
            raise ValueError("give models or model_glob, not both")
        repeated = next((m for i, m in enumerate(self.models or []) if m in self.models[:i]), None)
        if repeated is not None:
            raise ValueError(f"models: {repeated!r} is listed twice")
        if self.min_way < 2 or self.max_way < self.min_way:
            raise ValueError(f"size range [min_way={self.min_way}, max_way={self.max_way}] is invalid "
                             f"(need 2 <= min_way <= max_way)")
        if self.retention_weight == 0 and self.aux_weight == 0:
            raise ValueError("retention_weight and aux_weight are both 0: nothing to maximise")
        return self

    @classmethod
    def parse(cls, raw: dict, where: str = "request") -> "PlanRequest":
        """Validate a raw row (None values mean 'use the default'); errors name the field."""
        try:
            return cls.model_validate({k: v for k, v in raw.items() if v is not None})
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            raise ConfigError(f"{where}: {field + ': ' if field else ''}{msg}") from None

    def content(self) -> dict:
        """The fields that decide the plan (everything but the id), for content keys."""
        return self.model_dump(exclude={"request_id"})

    @property
    def objective(self) -> Objective:
        return Objective(self.retention_weight, self.aux_weight)


_NUMBERS = ("min_way", "max_way", "retention_weight", "aux_weight", "beam_width")


def candidates(req: PlanRequest, catalog: Catalog) -> list[str]:
    """The request's candidate models, each checked against the catalog."""
    if req.models is not None:
        for m in req.models:
            catalog.model(m)
        return list(req.models)
    if req.model_glob is not None:
        names = [n for n in catalog.names if fnmatch.fnmatchcase(n, req.model_glob)]
        if not names:
            raise ConfigError(f"model_glob {req.model_glob!r} matches no model of the catalog "
                              f"({', '.join(catalog.names)})")
        return names
    return catalog.names


def search_space(req: PlanRequest, catalog: Catalog) -> SearchSpace:
    """Everything checkable before the (costly) step model is loaded."""
    if catalog.tasks:
        catalog.task(req.task)
    models = candidates(req, catalog)
    if req.required_expert:
        if req.required_expert not in models:
            raise ConfigError(f"required expert {req.required_expert!r} is not among the candidate models "
                              f"({', '.join(models)})")
        experts = [req.required_expert]
    else:
        experts = [m for m in models if catalog.model(m).task == req.task]
    tasks = {m: catalog.model(m).task for m in models}
    for e in experts:  # the expert's gap is judged on the target task, whatever the catalog gives it
        tasks[e] = req.task
    return SearchSpace(req.task, models, experts, req.min_way, req.max_way, req.beam_width, tasks=tasks)


def load_calibration(path: str | None, aux_selector: str | None, selector: str | None = None
                     ) -> MultiwayCalibration | None:
    """A --calibration file, checked (None without one): it must exist, parse, and come with an
    auxiliary selector, whose predictions of every model's retention it reads; it maps those
    selectors' predictions, so a file that records others (another run's) is refused."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--calibration {p}: no such file (a pipeline run writes multiway/calibration.json, "
                          f"`simmerge calibrate` one from your catalog's labels)")
    if not aux_selector:
        raise ConfigError("--calibration needs --aux-selector: it reads the predicted retention of every model")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:  # a binary or damaged file: one line, not a traceback
        raise ConfigError(f"--calibration {p}: unreadable ({type(e).__name__}: {first_line(e)})") from None
    cal = MultiwayCalibration.from_json(text, str(p))
    if cal.selectors is not None and selector is not None:
        from simmerge_ray.selector.encoder import selector_digest

        given = {"selector": selector, "aux_selector": aux_selector}
        for role, folder in given.items():
            if role in cal.selectors and selector_digest(folder) != cal.selectors[role]:
                flag = "--selector" if role == "selector" else "--aux-selector"
                raise ConfigError(f"--calibration {p}: fitted on the predictions of another {role.replace('_', ' ')} "
                                  f"than {flag} {folder}; give the selectors it was fitted with, or calibrate these "
                                  f"(`simmerge calibrate`)")
    return cal


def plan_request(req: PlanRequest, catalog: Catalog, step_model: StepModel, *, keep: int = 10,
                 calibration: MultiwayCalibration | None = None) -> SearchResult:
    """The ranked plans of one request (best first), each with its intervals, input flags and
    expert-alone comparison (planner/assess.py) when the step model is a selector.

    Torch runs on one thread here: the selector's small batches are fastest so, and its float32
    sums then round the same way in every process (a CLI call, a batch actor), so the same
    request gives bit-identical scores wherever it is planned."""
    from simmerge_ray.planner.assess import assess_plan
    from simmerge_ray.planner.step_model import SelectorStepModel
    from simmerge_ray.selector.train import one_thread

    if req.aux_weight > 0 and not getattr(step_model, "has_aux", True):
        raise ConfigError(f"aux_weight {req.aux_weight:g} needs the auxiliary selector (--aux-selector): without it the "
                          "other models' retention is not predicted, and the weight would change nothing")
    space = search_space(req, catalog)
    with one_thread():
        result = search(space, step_model, req.objective, keep=keep, calibration=calibration)
        if isinstance(step_model, SelectorStepModel):
            tasks = {**catalog.model_tasks, **space.tasks}
            for plan in result.plans:
                assess_plan(plan, step_model, tasks, req.objective, catalog.model_tasks)
    return result


def write_plans(result: SearchResult, catalog: Catalog, out: Path, step_root: Path | None = None,
                checkpoints: Mapping[str, dict[str, str]] | None = None,
                base_checkpoint: Mapping[str, str] | None = None) -> None:
    """plan.json and step-<j>.yaml of the best plan, alternatives.yaml with the runners-up
    (`step_root`: see Plan.write; `checkpoints` and `base_checkpoint`: features/provenance's
    measured_checkpoints, kept for the plan's models, and measured_base)."""
    out = Path(out)
    best = replace(result.best, checkpoints={m: dict(checkpoints[m]) for m in result.best.models
                                             if checkpoints and m in checkpoints},
                   base_checkpoint=dict(base_checkpoint or {}))
    best.write(out, {m.name: m.path for m in catalog.models}, catalog.base, step_root)
    (out / "alternatives.yaml").write_text(yaml.safe_dump(
        [{"models": p.models, "operators": p.operators, "weighting": p.weighting, "expert": p.expert,
          "score": p.score} for p in result.plans[1:]],
        sort_keys=False))


def build_step_model(selector_dir: str | Path, features_dir: str | Path,
                     aux_selector_dir: str | Path | None = None) -> SelectorStepModel:
    """The selector step model over a features folder: loads the selector(s), the feature table
    and the Gram matrices (the costly part of planning, done once per process or actor)."""
    from simmerge_ray.planner.propagate import GramTable
    from simmerge_ray.planner.step_model import SelectorStepModel
    from simmerge_ray.selector.model import Selector

    path = features_file(features_dir)
    feats = read_feature_table(path, columns=[])  # readable, one row per pair; values checked below
    grams = GramTable.load(Path(features_dir))
    sel = Selector.load(selector_dir)
    aux = Selector.load(aux_selector_dir) if aux_selector_dir else None
    check_selector_roles(sel, Path(selector_dir), aux, Path(aux_selector_dir) if aux_selector_dir else None)
    check_finite_features(feats, str(path), [*sel.feature_names, *(aux.feature_names if aux else ())])
    check_step_arms(sel.operators, Path(selector_dir))
    return SelectorStepModel(sel, grams, feats, aux)


def check_selector_roles(sel: Selector, selector_dir: Path, aux: Selector | None, aux_dir: Path | None) -> None:
    """The selector predicts the expert's side (or the two-sided utility) and the auxiliary
    selector the auxiliary's side, as each was fitted (selector.json's meta target): swapped
    roles, or one selector given for both, planned without a word on the wrong quantities."""
    target = sel.meta.get("target", "utility")
    if target == "aux_gap_closed":
        raise ConfigError(f"{selector_dir}: --selector was fitted with --target aux_gap_closed (the auxiliaries' side, "
                          f"what --aux-selector takes); give a selector fitted on utility or gap_closed")
    if aux is not None and (aux_target := aux.meta.get("target", "utility")) != "aux_gap_closed":
        raise ConfigError(f"{aux_dir}: --aux-selector was fitted with --target {aux_target}, not aux_gap_closed "
                          f"(fit it with `simmerge fit --target aux_gap_closed`)")


def check_known_arms(operators: list[str], selector_dir: Path) -> None:
    """Every arm a selector predicts is one this version declares: one renamed or dropped since
    the fit was listed among a plan's arms and failed only when chosen, deep in writing its config."""
    from simmerge_ray.merge.arms import ARM_NAMES

    unknown = [op for op in operators if op not in ARM_NAMES]
    if unknown:
        raise ConfigError(f"{selector_dir}: the selector predicts arms this version does not know: "
                          f"{', '.join(unknown)} (known: {', '.join(ARM_NAMES)}); fit it again on this version's labels")


def check_step_arms(operators: list[str], selector_dir: Path) -> None:
    """A multi-way plan scores every step with each of STEP_ARMS and reads every arm's share from
    the arm registry: a selector fitted on labels without one of them (or with an arm this version
    does not know) failed deep in the search with a traceback."""
    from simmerge_ray.merge.arms import STEP_ARMS

    check_known_arms(operators, selector_dir)
    missing = [op for op in STEP_ARMS if op not in operators]
    if missing:
        raise ConfigError(f"{selector_dir}: the selector predicts the arms {', '.join(operators)}; multi-way plans "
                          f"need {', '.join(missing)} too (fit it on labels of every step arm: {', '.join(STEP_ARMS)})")
