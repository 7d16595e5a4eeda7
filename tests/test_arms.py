"""The arms are declared once (merge/arms.py): every consumer takes its list from there, and each
arm's three forms agree: the in-memory merge the labels measure, the mergekit YAML a plan writes
(run by the streaming executor) and the linear form the planner propagates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simmerge_ray.errors import ConfigError
from simmerge_ray.io.synthetic import SyntheticSpec, make_family
from simmerge_ray.merge.arms import ARM_NAMES, ARMS, PAPER_ARMS, STEP_ARMS, WEIGHTING_NAMES, get_arm
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, run_merge
from simmerge_ray.testbed.label_plans import LabelPlan, LabelSettings
from simmerge_ray.testbed.merging import merge_arm

SPEC = SyntheticSpec(architecture="llama", hidden_size=16, num_layers=2, num_heads=2, vocab_size=64, dtype="float32")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = make_family(tmp_path_factory.mktemp("arms"), SPEC)
    return {n: root / n for n in ("base", "m1", "m2")}


def test_consumers_take_the_arms_from_the_declaration() -> None:
    from simmerge_ray.pipeline.report import MULTI_METHODS, PAIR_METHODS

    assert len(ARMS) >= 6 and len(set(ARM_NAMES)) == len(ARM_NAMES)
    assert PAPER_ARMS == ("linear", "slerp", "ties")
    assert LabelSettings().operators == ARM_NAMES and LabelSettings().step_operators == STEP_ARMS
    assert [m for m in PAIR_METHODS if m in ARM_NAMES] == list(ARM_NAMES)
    assert [m for m in MULTI_METHODS if m in ARM_NAMES] == list(STEP_ARMS)
    with pytest.raises(ConfigError, match="unknown arm 'linera'; known: linear, slerp, ties"):
        get_arm("linera")


def test_mirrors_are_the_same_merge(models) -> None:
    sd = {n: load_file(str(p / "model.safetensors")) for n, p in models.items()}
    for arm in ARMS:
        mirror = arm.mirror()
        if mirror is None:
            continue
        ab = merge_arm(arm.name, sd["m1"], sd["m2"], sd["base"])
        ba = merge_arm(mirror, sd["m2"], sd["m1"], sd["base"])
        for k in ab:
            torch.testing.assert_close(ab[k], ba[k], rtol=0, atol=1e-6, msg=f"{arm.name} vs {mirror}: {k}")
    assert get_arm("linear_expert").mirror() == "linear_aux" and get_arm("ties").mirror() == "ties"


def test_folds_of_one_merge_are_measured_once_and_build_the_same_bytes(tmp_path: Path) -> None:
    """A 3-/4-way fold whose first step is a mirrored arm at equal shares (TIES, SLERP or linear
    of (a, b) is that of (b, a)) is measured once under its canonical spelling: the label run
    saves about an eighth of its task evaluations on the default zoo, and the labels do not
    change, because the two spellings build the same checkpoint to the bit."""
    root = make_family(tmp_path, SPEC, n=4)
    sd = {n: load_file(str(root / n / "model.safetensors")) for n in ("base", "m1", "m2", "m3", "m4")}

    def fold(plan: LabelPlan) -> dict[str, torch.Tensor]:
        cur = sd[plan.models[0]]
        for arm, model in zip(plan.step_arms(), plan.models[1:]):
            cur = merge_arm(arm, cur, sd[model], sd["base"])
        return cur

    fingerprints, digests = {m: f"fp-{m}" for m in sd}, {t: f"eval-{t}" for t in "abcd"}
    swapped = []
    for weighting in WEIGHTING_NAMES:
        for op in STEP_ARMS:
            for models in (("m2", "m1", "m3"), ("m2", "m1", "m4", "m3")):
                plan = LabelPlan(models, (op,) * (len(models) - 1), weighting, tasks=("a", "b", "c", "d")[:len(models)])
                canon = plan.canonical()
                assert canon.key(fingerprints, digests) == plan.key(fingerprints, digests)
                if canon is plan:
                    continue
                swapped.append((weighting, op, len(models)))
                assert canon.models == ("m1", "m2", *models[2:]) and canon.canonical() is canon
                built, want = fold(canon), fold(plan)
                assert all(torch.equal(built[k], want[k]) for k in want), (weighting, op, models)
    # 'anchor' gives the first step unequal shares: no mirror, each spelling is its own merge.
    assert sorted(swapped) == sorted((w, op, k) for w in WEIGHTING_NAMES if w != "anchor" for op in STEP_ARMS
                                     for k in (3, 4))
    dare = LabelPlan(("m2", "m1", "m3"), ("dare_ties", "ties"), "half", tasks=("a", "b", "c"))
    assert dare.canonical() is dare  # seeded masks follow the input order


@pytest.mark.parametrize("arm", ARM_NAMES)
def test_arm_yaml_runs_the_same_merge_as_the_labels(arm: str, models, tmp_path: Path) -> None:
    """The mergekit YAML of an arm, run by the streaming executor, equals the in-memory merge;
    where the arm has an exact linear form, that form equals it too."""
    a = get_arm(arm)
    cfg = a.mergekit_config(str(models["m1"]), str(models["m2"]), str(models["base"]))
    spec = MergeSpec.from_dict({**cfg, "dtype": "float32"}, source=f"arm {arm}")
    run_merge(spec, tmp_path / "out", ExecOptions())
    streamed = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        streamed |= load_file(str(f))
    sd = {n: load_file(str(p / "model.safetensors")) for n, p in models.items()}
    want = merge_arm(arm, sd["m1"], sd["m2"], sd["base"])
    assert sorted(streamed) == sorted(want)
    for k in want:
        torch.testing.assert_close(streamed[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{arm}: {k}")
    form = a.linear_form()
    if a.method in ("linear", "task_arithmetic"):
        c1, c2, cb = form
        for k in want:
            torch.testing.assert_close(c1 * sd["m1"][k] + c2 * sd["m2"][k] + cb * sd["base"][k], want[k],
                                       rtol=1e-5, atol=1e-6)
    elif a.method == "slerp":
        assert form is None
