"""Plan search finds the known best plan of a synthetic utility model; plans round-trip as JSON/YAML."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.planner.plan import Plan
from simmerge_ray.planner.search import Objective, SearchSpace, search

OPS = ["linear", "slerp", "ties"]


class TableModel:
    """u(prefix, next, op) depends on the last model of the prefix, the next model and the op,
    so order matters; v is a per-model constant. States are tuples of (model, op) pairs."""

    operators = OPS

    def __init__(self, models: list[str], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.u = {(a, b, op): rng.uniform(0.3, 1.2) for a in models for b in models for op in OPS}
        self.v = {b: rng.uniform(0, 1) for b in models}
        self.calls = 0

    def start(self, expert: str):
        return (expert,)

    def extend(self, state, model: str, op: str):
        return state + (model,)

    def step_utilities(self, states, nexts, task):
        self.calls += 1
        u = np.array([[self.u[(s[-1], m, op)] for op in OPS] for s, m in zip(states, nexts)])
        v = np.array([[self.v[m]] * len(OPS) for m in nexts])
        return u, v


def brute_force(model: TableModel, experts, candidates, kmin, kmax, obj: Objective) -> tuple[float, list, list]:
    best = (-math.inf, None, None)
    for e in experts:
        others = [m for m in candidates if m != e]
        for k in range(kmin, kmax + 1):
            for order in itertools.permutations(others, k - 1):
                for ops in itertools.product(OPS, repeat=k - 1):
                    seq = [e, *order]
                    u = [model.u[(seq[i], seq[i + 1], ops[i])] for i in range(k - 1)]
                    v = [model.v[m] for m in order]
                    s = obj.score(u, v)
                    if s > best[0]:
                        best = (s, seq, list(ops))
    return best


@pytest.mark.parametrize("obj", [Objective(), Objective(retention_weight=0.5, aux_weight=0.5)])
def test_exhaustive_finds_known_best(obj: Objective) -> None:
    models = [f"m{i}" for i in range(7)]
    tm = TableModel(models, seed=1)
    space = SearchSpace(task="code", candidates=models, experts=["m0", "m1"], min_k=2, max_k=4)
    res = search(space, tm, obj)
    score, seq, ops = brute_force(tm, ["m0", "m1"], models, 2, 4, obj)
    assert res.exhaustive
    assert res.best.models == seq and res.best.operators == ops
    assert res.best.score == pytest.approx(score)
    # every ordered plan of 2..4 models from 2 experts, each with 3^(k-1) operator sequences
    expected = sum(2 * math.perm(6, k - 1) * 3 ** (k - 1) for k in (2, 3, 4))
    assert res.scored == expected
    assert res.plans[1].score <= res.best.score


def test_beam_search_beyond_four_models() -> None:
    models = [f"m{i}" for i in range(8)]
    tm = TableModel(models, seed=2)
    space = SearchSpace(task="code", candidates=models, experts=["m0"], min_k=5, max_k=5, beam_width=200)
    res = search(space, tm, Objective())
    assert not res.exhaustive and res.best.k == 5
    score, seq, ops = brute_force(tm, ["m0"], models, 5, 5, Objective())
    assert res.best.score == pytest.approx(score, rel=0.05)  # a wide beam gets (nearly) the optimum
    narrow = search(SearchSpace(task="code", candidates=models, experts=["m0"], min_k=5, max_k=5, beam_width=4),
                    tm, Objective())
    assert narrow.scored < res.scored


def test_bad_search_spaces() -> None:
    with pytest.raises(ConfigError, match="invalid"):
        SearchSpace(task="t", candidates=["a", "b"], experts=["a"], min_k=3, max_k=2)
    with pytest.raises(ConfigError, match="no expert of task 'rag'"):
        SearchSpace(task="rag", candidates=["a", "b"], experts=[])
    with pytest.raises(ConfigError, match="1 models cannot make a 2-way plan"):
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
