"""Does the operator choice matter on a skill base (issue 17's headroom line)?

The skill-base recipe of benchmarks/skill_base.py: a finished run's base pretrained further for
3,000 steps on every domain's rewritten training items alone, then one expert per domain at each
of the study's two regimes (10 experts). For every ordered pair of experts of different tasks whose
gaps are at least 0.05 (the label run's rule), every arm of merge/arms.py is merged and scored, and
the two-sided utility U = (GapClosed on the expert's task + GapClosed on the auxiliary's) / 2 is
reported per arm with the per-pair oracle and each arm's share of wins. About 20 minutes on the
idle 2-core machine. Results: docs/testbed.md.

    python -m benchmarks.skill_base_arms --run runs/demo --out runs/skill-base-arms
"""

from __future__ import annotations

import itertools
import json
import time

import torch

from benchmarks.skill_base import DOMAINS, REGIMES, _state, accuracies, load_run, pretrain_skills, study_args, train_expert
from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.merge.arms import ARMS
from simmerge_ray.testbed.evaluate import EVAL_MAX_LEN, encode
from simmerge_ray.testbed.label_plans import LabelSettings
from simmerge_ray.testbed.merging import merge_arm

GAP = LabelSettings().epsilon  # the label run's gap rule in accuracy (0.05)


def main() -> None:
    args = study_args(__doc__, "runs/skill-base-arms").parse_args()
    torch.set_num_threads(args.threads)
    tok, examples, model = load_run(args.run)
    evals = {d: encode(ex, tok, EVAL_MAX_LEN) for d, ex in examples.items()}
    pretrain_skills(model, tok, args.steps, share=1.0)
    base = _state(model)
    experts: dict[str, dict[str, torch.Tensor]] = {}
    task: dict[str, str] = {}
    for lr, steps in REGIMES:
        for d in DOMAINS:
            name = f"{d}@{lr:g}x{steps}"
            experts[name], task[name] = train_expert(model, base, tok, d, lr, steps), d

    def scores(state: dict[str, torch.Tensor], tasks: tuple[str, ...]) -> dict[str, float]:
        model.load_state_dict(state)
        return accuracies(model, {t: evals[t] for t in tasks})

    single = {n: scores(sd, DOMAINS) for n, sd in experts.items()}
    rows = []
    t0 = time.perf_counter()
    for a, b in itertools.permutations(experts, 2):
        ta, tb = task[a], task[b]
        gap_e, gap_x = single[a][ta] - single[b][ta], single[b][tb] - single[a][tb]
        if ta == tb or gap_e < GAP or gap_x < GAP:
            continue
        u = {}
        for arm in ARMS:
            s = scores(merge_arm(arm, experts[a], experts[b], base), (ta, tb))
            u[arm.name] = ((s[ta] - single[b][ta]) / gap_e + (s[tb] - single[a][tb]) / gap_x) / 2
        rows.append({"expert": a, "aux": b, "utility": u})
    names = [a.name for a in ARMS]
    mean = {n: sum(r["utility"][n] for r in rows) / len(rows) for n in names}
    oracle = sum(max(r["utility"].values()) for r in rows) / len(rows)
    wins = {n: sum(max(r["utility"], key=r["utility"].get) == n for r in rows) / len(rows) for n in names}
    best = max(mean, key=mean.get)
    print(f"{len(rows)} pairs, {time.perf_counter() - t0:.0f} s of merges")
    print("| arm | mean two-sided utility % | best on % of pairs |\n|---|---:|---:|")
    for n in sorted(names, key=lambda n: -mean[n]):
        print(f"| {n} | {100 * mean[n]:.1f} | {100 * wins[n]:.0f} |")
    print(f"oracle {100 * oracle:.1f}%, best fixed {best} {100 * mean[best]:.1f}%, "
          f"headroom {100 * (oracle - mean[best]):.1f} points")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "skill_base_arms.json", json.dumps(
        {"experts": {n: single[n][task[n]] for n in experts}, "mean": mean, "oracle": oracle, "wins": wins,
         "pairs": rows}, indent=2))


if __name__ == "__main__":
    main()
