"""Plan search finds the known best plan of a synthetic utility model; plans round-trip as JSON/YAML."""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.planner.plan import Plan
from simmerge_ray.planner.objective import RETENTION_CLIP, Objective
from simmerge_ray.planner.search import SearchSpace, search

from simmerge_ray.merge.arms import ARM_NAMES, STEP_ARMS, WEIGHTING_NAMES, step_arm
from simmerge_ray.planner.objective import StepPrediction
from simmerge_ray.planner.search import expert_of
from simmerge_ray.planner.shares import at_share

# The arms the table predicts: the step arms plus linear at 1/4 and 3/4, so a step's share moves
# its value (planner/shares.py interpolates the linear family and shifts SLERP and TIES by it).
TABLE_OPS = [a for a in ARM_NAMES if a in (*STEP_ARMS, "linear_expert", "linear_aux")]
TASKS = ["code", "math", "rag"]


def test_at_share_interpolates_the_linear_family_and_shifts_the_others_by_it() -> None:
    """Hand-computed values (the search tests' reference calls at_share itself): the linear arms
    are labelled at shares 1/4, 1/2, 3/4 (predictions 0, 1, 2 here), SLERP and TIES at 1/2."""
    ops = ("linear", "slerp", "ties", "linear_expert", "linear_aux")
    pred = np.array([[1.0, 3.0, 5.0, 0.0, 2.0], [10.0, 30.0, 50.0, 0.0, 20.0]])
    cases = [("linear", 1 / 3, [1 / 3, 10 / 3]),  # a third of the way from 1/4 (0) to 1/2 (1, 10)
             ("linear_aux", 1 / 3, [1 / 3, 10 / 3]),  # one family: the same curve from any member
             ("linear", 0.6, [1.4, 14.0]),
             ("linear", 0.1, [0.0, 0.0]), ("linear", 0.9, [2.0, 20.0]),  # flat beyond the ends
             ("ties", 1 / 3, [5 + 1 / 3 - 1, 50 + 10 / 3 - 10]),  # its own value, shifted as linear moves
             ("slerp", 0.75, [3 + 2 - 1, 30 + 20 - 10]),
             ("ties", None, [5.0, 50.0]), ("ties", 0.5, [5.0, 50.0]), ("linear_expert", 0.25, [0.0, 0.0])]
    for op, share, want in cases:
        assert at_share(pred, ops, op, share) == pytest.approx(want), (op, share)
    # Without a family of several shares there is no shape to borrow: the arm's own value.
    assert at_share(pred[:, 1:3], ("slerp", "ties"), "ties", 1 / 3) == pytest.approx([5.0, 50.0])


class TableModel:
    """u(prefix, next, arm, task) depends on the last model of the prefix, the next model, the
    arm and the task, so order matters; v(next, arm) on the joining model and the arm. States
    are tuples of models."""

    operators = TABLE_OPS
    has_aux = True

    def __init__(self, models: list[str], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.u = {(a, b, op, t): rng.uniform(0.3, 1.2) for a in models for b in models for op in TABLE_OPS for t in TASKS}
        self.v = {(b, op): rng.uniform(0, 1) for b in models for op in TABLE_OPS}
        self.calls = 0

    def start(self, model: str):
        return (model,)

    def extend(self, state, model: str, arm):
        return state + (model,)

    def step_utilities(self, states, nexts, task, joining_tasks=None):
        self.calls += 1
        u = np.array([[self.u[(s[-1], m, op, task)] for op in TABLE_OPS] for s, m in zip(states, nexts)])
        v = np.array([[self.v[(m, op)] for op in TABLE_OPS] for m in nexts])
        return u, v


def tasks_of(models: list[str]) -> dict[str, str]:
    return {m: TASKS[i % len(TASKS)] for i, m in enumerate(models)}


def brute_force(model: TableModel, experts, candidates, kmin, kmax, obj: Objective, tasks,
                weightings=WEIGHTING_NAMES) -> tuple[float, list, list, str]:
    """Every ordered subset holding an expert (anywhere), every weighting, every step-arm sequence."""
    @functools.cache
    def value(key: tuple, op: str, share: float) -> float:
        table = [model.u[(*key[:2], o, key[2])] for o in TABLE_OPS] if len(key) == 3 else \
            [model.v[(key[0], o)] for o in TABLE_OPS]
        return float(at_share(np.array([table]), TABLE_OPS, op, share)[0])

    best = (-math.inf, None, None, None)
    for k in range(kmin, kmax + 1):
        for seq in itertools.permutations(candidates, k):
            expert = expert_of(seq, experts)
            if expert is None:
                continue
            for w in weightings:
                for ops in itertools.product(STEP_ARMS, repeat=k - 1):
                    steps = []
                    for j in range(1, k):
                        share = step_arm(ops[j - 1], w, j).share
                        kept = {t: value((seq[j - 1], seq[j], t), ops[j - 1], share)
                                for t in dict.fromkeys(tasks[m] for m in seq[:j] if tasks[m] is not None)}
                        steps.append(StepPrediction(seq[j], share, kept, value((seq[j],), ops[j - 1], share)))
                    s = obj.score(obj.retention(seq[0], steps, tasks), expert)
                    if s > best[0]:
                        best = (s, list(seq), list(ops), w)
    return best


@pytest.mark.parametrize("obj", [Objective(), Objective(retention_weight=0.5, aux_weight=0.5)])
def test_exhaustive_finds_known_best(obj: Objective) -> None:
    models = [f"m{i}" for i in range(5)]
    tasks = tasks_of(models)
    tm = TableModel(models, seed=1)
    space = SearchSpace(task="code", candidates=models, experts=["m0", "m3"], min_k=2, max_k=4, tasks=tasks)
    res = search(space, tm, obj)
    score, seq, ops, w = brute_force(tm, ["m0", "m3"], models, 2, 4, obj, tasks)
    assert res.exhaustive
    assert (res.best.models, res.best.operators, res.best.weighting) == (seq, ops, w)
    assert res.best.score == pytest.approx(score)
    assert res.best.expert == expert_of(seq, ["m0", "m3"])
    # every partial plan grown by every model and step arm: |W| x sum_k P(5, k) x 3^(k-1)
    expected = len(WEIGHTING_NAMES) * sum(math.perm(5, k) * 3 ** (k - 1) for k in (2, 3, 4))
    assert res.scored == expected
    assert res.plans[1].score <= res.best.score
    # each merge listed once: at 2-way `equal` and `half` give the same shares (the runner-up was the
    # pick itself under another name, with a margin of 0)
    pairs = search(SearchSpace(task="code", candidates=models, experts=["m0", "m3"], min_k=2, max_k=2, tasks=tasks),
                   tm, obj)
    merges = [(tuple(p.models), tuple(a.name for a in p.step_arms())) for p in pairs.plans]
    assert len(merges) == len(set(merges)) == len(pairs.plans) == 10
    # the expert is not always first: the space lets the search put it anywhere
    assert any(p.models[0] != p.expert for p in res.plans)
    # what leaving a model out costs, for every model not in the best plan
    assert {e["model"] for e in res.best.excluded} == set(models) - set(res.best.models)
    assert all(e["effect"] <= 1e-12 for e in res.best.excluded)


def test_a_model_without_a_task_never_counts_as_kept() -> None:
    """A model the catalog gives no task has no gap to keep: it leaves the others' mean wherever it
    stands. First in the fold it used to count as fully kept (R = 1), which pulled it to the front."""
    models = [f"m{i}" for i in range(4)] + ["x"]
    tasks = {**tasks_of(models[:4]), "x": None}
    obj = Objective(retention_weight=0.5, aux_weight=0.5)
    assert obj.retention("x", [], tasks) == {"x": None}
    space = SearchSpace(task="code", candidates=models, experts=["m0", "m3"], min_k=2, max_k=3, tasks=tasks)
    res = search(space, TableModel(models, seed=4), obj)
    score, seq, ops, w = brute_force(TableModel(models, seed=4), ["m0", "m3"], models, 2, 3, obj, tasks)
    assert (res.best.models, res.best.operators, res.best.weighting) == (seq, ops, w)
    assert res.best.score == pytest.approx(score)
    firsts = [p for p in res.plans if p.models[0] == "x"]
    assert all(p.retention.get("x") is None for p in firsts)


def test_predicted_retention_gains_do_not_compound_with_plan_size() -> None:
    """Steps each predicted to raise the expert's task (GapClosed 1.4, as out-of-distribution pairs
    of a tiny zoo are) used to multiply: ten models kept 1.4^9 = 20.7 of the expert's gap, and
    larger plans always won. A model's retention is clipped after every step as each factor is."""
    models = [f"m{i}" for i in range(10)]
    tasks = tasks_of(models)
    steps = [StepPrediction(m, 0.5, {tasks[prev]: 1.4 for prev in models[:j + 1]}, joining=1.2)
             for j, m in enumerate(models[1:])]
    r = Objective().retention("m0", steps, tasks)
    assert r["m0"] == RETENTION_CLIP[1] == 1.5 and r["m1"] == 1.5 and r["m9"] == 1.2
    assert Objective().retention("m0", steps[:1], tasks) == {"m0": 1.4, "m1": 1.2}


def test_beam_search_is_deterministic_and_names_every_left_out_candidate() -> None:
    """Partial plans without the expert all score the same (R_expert = 1), so the beam kept them in
    the order the candidates came; the pick depended on that order. And `excluded` listed only the
    candidates some scored plan held."""
    models = [f"m{i}" for i in range(7)]
    tasks = tasks_of(models)
    tm = TableModel(models, seed=5)
    tm.u = {k: 0.5 * v for k, v in tm.u.items()}  # every step keeps less than all: partials without the expert lead
    picks, excluded = set(), []
    for seed in range(6):
        order = [str(m) for m in np.random.default_rng(seed).permutation(models)]
        space = SearchSpace(task="code", candidates=order, experts=["m0"], min_k=4, max_k=4, beam_width=8,
                            exhaustive_max_plans=0, tasks=tasks)
        best = search(space, tm, Objective()).best
        picks.add((tuple(best.models), tuple(best.operators), best.weighting))
        excluded.append(sorted((e["model"], e["effect"]) for e in best.excluded))
        assert {e["model"] for e in best.excluded} == set(models) - set(best.models)
        assert all(e["effect"] is not None or "beam search dropped" in e["reason"] for e in best.excluded)
    assert len(picks) == 1 and all(e == excluded[0] for e in excluded)


def test_beam_search_when_the_space_is_large() -> None:
    models = [f"m{i}" for i in range(6)]
    tasks = tasks_of(models)
    tm = TableModel(models, seed=2)

    def space(beam: int) -> SearchSpace:
        return SearchSpace(task="code", candidates=models, experts=["m0"], min_k=4, max_k=4, beam_width=beam,
                           exhaustive_max_plans=0, tasks=tasks, weightings=("equal",))

    res = search(space(400), tm, Objective())
    assert not res.exhaustive and res.best.k == 4 and "m0" in res.best.models
    score, *_ = brute_force(tm, ["m0"], models, 4, 4, Objective(), tasks, weightings=("equal",))
    assert res.best.score == pytest.approx(score, rel=0.05)  # a wide beam gets (nearly) the optimum
    narrow = search(space(4), tm, Objective())
    assert narrow.scored < res.scored


def test_a_modest_beam_finds_the_optimum_when_merges_lose() -> None:
    """Merging loses (every step keeps less than all), so partial plans without the expert
    (R_expert = 1) outscore every one with it. Ranked together, they filled the beam and the
    expert joined only late: 2 of these 6 spaces reached the optimum at width 32. Ranked within
    strata by where the expert stands, all 6 do."""
    models = [f"m{i}" for i in range(9)]
    tasks = tasks_of(models)
    for seed in range(6):
        tm = TableModel(models, seed=seed)
        tm.u = {k: 0.6 * v for k, v in tm.u.items()}
        space = SearchSpace(task="code", candidates=models, experts=["m0"], min_k=3, max_k=4, beam_width=32,
                            exhaustive_max_plans=0, tasks=tasks, weightings=("equal",))
        res = search(space, tm, Objective())
        score, *_ = brute_force(tm, ["m0"], models, 3, 4, Objective(), tasks, weightings=("equal",))
        assert not res.exhaustive
        assert res.best.score == pytest.approx(score), seed


def test_linear_folds_with_the_same_coefficients_are_listed_once() -> None:
    """[a, b, c] under `half` and [c, a, b] under `anchor` (c at 1/2, a and b at 1/4) build one
    checkpoint, as do [a, b, c] and [b, a, c] under either: per 3-model subset there are 4 linear
    merges (the running mean, and each model at 1/2). Each is listed once, under its best score."""
    models = [f"m{i}" for i in range(5)]
    tasks = tasks_of(models)
    space = SearchSpace(task="code", candidates=models, experts=["m0"], min_k=3, max_k=3, tasks=tasks)
    res = search(space, TableModel(models, seed=6), Objective(retention_weight=0.5, aux_weight=0.5), keep=10**6)
    linear = [p for p in res.plans if set(p.operators) == {"linear"}]
    assert len(linear) == 4 * math.comb(4, 2)
    ids = [p.fold.merge_identity() for p in res.plans]
    assert len(ids) == len(set(ids))
    assert [p.score for p in res.plans] == sorted((p.score for p in res.plans), reverse=True)


def test_folds_whose_first_step_is_one_merge_are_listed_once() -> None:
    """TIES or SLERP of (a, b) at equal shares is that of (b, a): the runner-up of a plan was often the
    same merge with its first two models swapped (plan-batch's margin 0.0 on every row). A
    2-way search lists each pair's merge by a mirrored arm once; a lopsided first step does not
    mirror and stays two merges."""
    from simmerge_ray.merge.fold import Fold

    assert Fold(("a", "b", "c"), ("ties", "slerp"), "equal").merge_identity() == \
        Fold(("b", "a", "c"), ("ties", "slerp"), "equal").merge_identity()
    assert Fold(("a", "b", "c"), ("linear_expert", "ties")).merge_identity() == \
        Fold(("b", "a", "c"), ("linear_aux", "ties")).merge_identity()
    assert Fold(("a", "b", "c"), ("ties", "ties"), "equal").merge_identity() != \
        Fold(("a", "c", "b"), ("ties", "ties"), "equal").merge_identity()
    assert Fold(("a", "b"), ("dare_ties",)).merge_identity() != Fold(("b", "a"), ("dare_ties",)).merge_identity()
    models = [f"m{i}" for i in range(4)]
    space = SearchSpace(task="code", candidates=models, experts=["m0", "m1"], min_k=2, max_k=2,
                        tasks=tasks_of(models), step_arms=("ties", "slerp"), weightings=("equal",))
    res = search(space, TableModel(models, seed=2), Objective(retention_weight=0.5, aux_weight=0.5), keep=10**6)
    pairs = [(frozenset(p.models), tuple(p.operators)) for p in res.plans]
    assert len(pairs) == len(set(pairs)) and len(pairs) > 6


def test_a_calibration_ranks_complete_plans_by_measured_shape() -> None:
    """A calibration that has learned "the expert keeps most when it joins last, under `anchor`"
    overrides the step model's ranking; it covers only the sizes it was fitted on."""
    from simmerge_ray.planner.calibrate import FEATURES, MultiwayCalibration, RetentionCalibrator

    models = [f"m{i}" for i in range(4)]
    tm = TableModel(models, seed=3)
    coef = np.zeros((len(FEATURES), 2))
    coef[FEATURES.index("expert_position"), 0] = 1.0
    coef[FEATURES.index("weighting_anchor"), 1] = 0.5
    coef[FEATURES.index("intercept")] = [-0.9, -0.6]
    pick = {"targets": 24, "bias": [-0.05, 0.02], "halfwidth": {"80": [0.2, 0.05], "90": [None, 0.07]}}
    cal = MultiwayCalibration({3: RetentionCalibrator(coef)}, {3: 8}, {3: {"80": [0.05, 0.1], "90": [0.08, None]}},
                              {3: pick}, {"retention_weight": 1.0, "aux_weight": 1.0})
    space = SearchSpace(task="code", candidates=models, experts=["m0"], min_k=3, max_k=3, tasks=tasks_of(models))
    obj = Objective(retention_weight=1.0, aux_weight=1.0)
    plain, res = search(space, tm, obj), search(space, tm, obj, calibration=cal)
    best = res.best
    assert best.models[-1] == "m0" and best.weighting == "anchor"
    assert best.calibrated == {"expert_retention": pytest.approx(0.1), "others_retention": pytest.approx(-0.1),
                               "score": pytest.approx(0.0), "subsets": 8, "intervals": {
                                   "80": {"expert_retention": pytest.approx([0.05, 0.15]),
                                          "others_retention": pytest.approx([-0.2, 0.0])},
                                   "90": {"expert_retention": pytest.approx([0.02, 0.18]),
                                          "others_retention": [None, None]}},
                               # the top plan, corrected by the picks' median error, with their widths
                               "top_plan": {"available": True, "expert_retention": pytest.approx(0.05),
                                            "others_retention": pytest.approx(-0.08), "bias": [-0.05, 0.02],
                                            "targets": 24, "intervals": {
                                                "80": {"expert_retention": pytest.approx([-0.15, 0.25]),
                                                       "others_retention": pytest.approx([-0.13, -0.03])},
                                                "90": {"expert_retention": [None, None],
                                                       "others_retention": pytest.approx([-0.15, -0.01])}}}}
    assert all("top_plan" not in p.calibrated for p in res.plans[1:])  # only the pick is picked
    other = search(space, tm, Objective(retention_weight=1.0, aux_weight=2.0), calibration=cal).best
    assert other.calibrated["top_plan"] == {
        "available": False, "reason": "its picks were measured for the objective {'retention_weight': 1.0, "
                                      "'aux_weight': 1.0}, not {'retention_weight': 1.0, 'aux_weight': 2.0}"}
    assert best.score == pytest.approx(obj.score(best.retention, "m0"))  # the step model's own score is kept
    assert plain.best.calibrated == {}
    assert all(e["effect"] <= 1e-12 for e in best.excluded)
    # the calibration round-trips, and a size it does not cover is refused
    back = MultiwayCalibration.from_json(cal.to_json())
    assert back.by_size[3].coef.tolist() == coef.tolist() and back.halfwidth == cal.halfwidth
    assert back.pick == cal.pick and back.objective == cal.objective
    older = MultiwayCalibration({3: RetentionCalibrator(coef)}, {3: 8})  # a file written before picks were kept
    assert older.intervals(3, 0.1, -0.1) == {}
    assert MultiwayCalibration.from_json(older.to_json()).top_plan(3, 0.1, -0.1, obj.as_dict()) == {
        "available": False, "reason": "the calibration holds no measured picks of 3-way plans"}
    # `simmerge plan` prints the calibrated retentions with the first level's interval
    from simmerge_ray.cli.plan import _calibrated_line, _top_plan_line

    assert _calibrated_line(best.calibrated) == ("calibrated: score 0.000, expert retention +10.0% (80%: [5.0%,15.0%]), "
                                                 "the others' mean -10.0% (80%: [-20.0%,0.0%])")
    assert _top_plan_line(best.calibrated["top_plan"]) == (
        "as the top plan (held-out picks of 24 targets measured -5.0 / +2.0 points off their calibrated values): "
        "expert retention +5.0% (80%: [-15.0%,25.0%]), the others' mean -8.0% (80%: [-13.0%,-3.0%])")
    with pytest.raises(ConfigError, match=r"covers plans of \[3\] models, not \[2\]"):
        search(SearchSpace(task="code", candidates=models, experts=["m0"], min_k=2, max_k=3, tasks=tasks_of(models)),
               tm, obj, calibration=cal)
    for field, value in (("halfwidth", {"80": [0.05]}), ("pick", pick | {"bias": [0.1]})):
        bad = json.loads(cal.to_json())
        bad["sizes"]["3"][field] = value
        with pytest.raises(ConfigError, match=r"calibration.json: not a multi-way calibration file \(a half-width or "
                                              r"bias is not an \[expert, others\] pair\)"):
            MultiwayCalibration.from_json(json.dumps(bad), "calibration.json")
    for coef, needle in (([[0.0, 0.0]], r"coef has shape \[1, 2\], not \[11, 2\]"),
                         ([[float("nan"), 0.0]] * 11, "coef holds a number that is not finite")):
        bad = json.loads(cal.to_json())
        bad["sizes"]["3"]["coef"] = coef
        with pytest.raises(ConfigError, match=rf"calibration.json: not a multi-way calibration file \(sizes.3: {needle}\)"):
            MultiwayCalibration.from_json(json.dumps(bad), "calibration.json")
    bad = json.loads(cal.to_json())
    bad["sizes"]["3"]["halfwidth"] = {"80": [float("inf"), 0.1]}
    with pytest.raises(ConfigError, match=r"\(a half-width is not a finite number >= 0 \(null: unbounded\)\)"):
        MultiwayCalibration.from_json(json.dumps(bad), "calibration.json")
    with pytest.raises(ConfigError, match="calibration.json: written for the features"):
        MultiwayCalibration.from_json('{"features": ["x"], "sizes": {}}', "calibration.json")


@pytest.mark.parametrize("field, value, needle", [
    ("beam_width", True, "beam_width: true is not a number"),  # planned with a beam of 1
    ("retention_weight", True, "retention_weight: true is not a number"),  # read as 1.0
    ("max_way", "3", 'max_way: "3" is not a number'),  # read as 3
    ("min_way", True, "min_way: true is not a number"),  # was "size range [min_way=1, ...] is invalid"
    ("required_expert", "", "required_expert: String should have at least 1 character"),  # ignored
    ("models", [], "models: List should have at least 1 item"),  # was "no expert of task 'code' among ..."
])
def test_a_request_field_of_the_wrong_type_is_named(field: str, value, needle: str) -> None:
    """Request rows (plan-batch's JSON lines) were coerced: a bool read as a number, a string of
    digits as one, an empty expert name as none."""
    from simmerge_ray.planner.request import PlanRequest

    with pytest.raises(ConfigError) as e:
        PlanRequest.parse({"request_id": "a", "task": "code", "models": ["code-0", "math-0"], field: value}, "row 3")
    assert str(e.value).startswith(f"row 3: {needle}"), str(e.value)
    assert PlanRequest.parse({"request_id": "a", "task": "code", "min_way": 2.0}).min_way == 2  # a float column's 2


def test_bad_search_spaces() -> None:
    with pytest.raises(ConfigError, match="invalid"):
        SearchSpace(task="t", candidates=["a", "b"], experts=["a"], min_k=3, max_k=2)
    with pytest.raises(ConfigError, match="no expert of task 'rag'"):
        SearchSpace(task="rag", candidates=["a", "b"], experts=[])
    with pytest.raises(ConfigError, match=re.escape("1 candidate model (a) cannot make a 2-way plan (min_way / --min-way 2:")):
        SearchSpace(task="t", candidates=["a"], experts=["a"])


def test_plan_json_and_yaml_round_trip(tmp_path: Path) -> None:
    plan = Plan("code", ["a", "b", "c"], ["slerp", "ties"], [0.9, 0.7], [], 0.63)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    for m in ("a", "b", "c", "base"):
        (tmp_path / m).mkdir()
    paths = {m: tmp_path / m for m in "abc"}
    files = plan.write(tmp_path / "plan", paths, tmp_path / "base")
    assert [f.name for f in files] == ["step-1.yaml", "step-2.yaml"]
    s1 = yaml.safe_load(files[0].read_text())
    assert s1["merge_method"] == "slerp" and s1["base_model"] == str(tmp_path / "a")
    s2 = yaml.safe_load(files[1].read_text())
    assert s2["models"][0] == {"model": "step-1", "parameters": {"weight": 1.0, "density": 0.5}}
    assert s2["base_model"] == str(tmp_path / "base")
    (tmp_path / "plan" / "step-1").mkdir()
    spec = MergeSpec.load(files[1])  # a valid mergekit config for our engine
    assert spec.method.name == "ties" and [m.ref for m in spec.inputs] == ["step-1", str(tmp_path / "c"), str(tmp_path / "base")]
    with pytest.raises(ConfigError, match="absent from the catalog: c"):
        plan.step_configs({"a": tmp_path / "a", "b": tmp_path / "b"}, None)
    with pytest.raises(ConfigError, match="a model appears twice"):
        Plan("code", ["a", "a"], ["linear"])
    with pytest.raises(ConfigError, match="at least two models"):
        Plan("code", ["a"], [])
    with pytest.raises(ConfigError, match="not a plan file"):
        Plan.from_json("{}", "p.json")
    # The command in each step file's header pastes into a shell whatever the folder's name.
    spaced = tmp_path / "my plans (ü)"
    first = plan.write(spaced, paths, tmp_path / "base", step_root=spaced)[0]
    command = first.read_text().splitlines()[1].removeprefix("#   ")
    assert shlex.split(command) == ["simmerge", "merge", str(spaced / "step-1.yaml"), "--out", str(spaced / "step-1")]
    weighted = Plan("code", ["a", "b", "c"], ["linear", "ties"], [1.0, 0.6], [0.3, 0.4], 0.8, weighting="anchor",
                    expert="c")
    assert Plan.from_json(weighted.to_json()) == weighted
    bad = json.loads(weighted.to_json()) | {"weighting": "thirds"}
    with pytest.raises(ConfigError, match=r"^p\.json: unknown weighting 'thirds'; known: half, equal, anchor$"):
        Plan.from_json(json.dumps(bad), "p.json")
    with pytest.raises(ConfigError, match=r"^p\.json: plan \['a', 'b', 'c'\]: expert 'z' is not one of its models$"):
        Plan.from_json(json.dumps(bad | {"weighting": None, "expert": "z"}), "p.json")
