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
    change, because the two spellings build the same checkpoint to the bit. Not so where the
    first two models are stored in different dtypes (a merge takes its first model's)."""
    import itertools

    root = make_family(tmp_path, SPEC, n=4)
    sd = {n: load_file(str(root / n / "model.safetensors")) for n in ("base", "m1", "m2", "m3", "m4")}

    def fold(plan: LabelPlan) -> dict[str, torch.Tensor]:
        cur = sd[plan.models[0]]
        for arm, model in zip(plan.step_arms(), plan.models[1:]):
            cur = merge_arm(arm, cur, sd[model], sd["base"])
        return cur

    fingerprints, digests = {m: f"fp-{m}" for m in sd}, {t: f"eval-{t}" for t in "abc"}
    for weighting in WEIGHTING_NAMES:
        for op in STEP_ARMS:
            plans = [LabelPlan(o, (op, op), weighting, tasks=("a", "b", "c"))
                     for o in itertools.permutations(("m1", "m2", "m3"))]
            keys = {p.key(fingerprints, digests) for p in plans}
            # (a, b, c) = (b, a, c), except under 'anchor', which gives the first step unequal
            # shares; linear folds are keyed by their coefficients (the running mean: one merge)
            want = {"linear": {"half": 3, "equal": 1, "anchor": 3}}.get(op, {"half": 3, "equal": 3, "anchor": 6})
            assert len(keys) == want[weighting], (op, weighting)
            for plan in plans:
                canon = plan.canonical()
                if canon is not plan:
                    assert canon.models == (plan.models[1], plan.models[0], plan.models[2])
                    built, want = fold(canon), fold(plan)
                    assert all(torch.equal(built[k], want[k]) for k in want), (weighting, op, plan.models)
    dare = LabelPlan(("m2", "m1", "m3"), ("dare_ties", "ties"), "half", tasks=("a", "b", "c"))
    assert dare.canonical() is dare  # seeded masks follow the input order
    # One model stored in bfloat16: swapped, the fold would take the other's dtype.
    sd["m2"] = {k: v.to(torch.bfloat16) for k, v in sd["m2"].items()}
    dtypes = {"base": "f32", "m1": "f32", "m2": "bf16", "m3": "f32"}
    ties = [LabelPlan(o, ("ties", "ties"), "half", tasks=("a", "b", "c")) for o in (("m2", "m1", "m3"), ("m1", "m2", "m3"))]
    assert not torch.equal(fold(ties[0])["lm_head.weight"], fold(ties[1])["lm_head.weight"])
    assert ties[0].canonical(dtypes) is ties[0]
    assert ties[0].key(fingerprints, digests, dtypes) != ties[1].key(fingerprints, digests, dtypes)
    soups = [LabelPlan(o, ("linear", "linear"), "equal", tasks=("a", "b", "c"))
             for o in (("m2", "m1", "m3"), ("m1", "m2", "m3"), ("m3", "m2", "m1"))]
    assert len({p.key(fingerprints, digests, dtypes) for p in soups}) == 2  # by the first model's dtype


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
