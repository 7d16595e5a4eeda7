"""report.json and report.md of a pipeline run, from the stages' own JSON outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.report.charts import feature_utility_heatmap, grouped_bars

PAIR_METHODS = ("simmerge", "linear", "slerp", "ties", "majority", "oracle")
MULTI_METHODS = ("simmerge", "random_order", "linear", "slerp", "ties", "oracle")
BANDIT_POLICIES = {"bandit": "bandit", "bandit_cold": "bandit_cold", "random": "uniform",
                   "greedy": "greedy_offline", "best_fixed": "best_fixed"}


def build_report(out: Path, timings: dict[str, float]) -> dict:
    sel = json.loads((out / "selector_eval" / "selector_report.json").read_text())
    multi = json.loads((out / "multiway" / "multiway.json").read_text())
    regret = json.loads((out / "bandit" / "regret.json").read_text())
    held = sel["held_out_pairs"]
    report: dict = {
        "pairwise": {
            "split": held["split"],
            "pairs": held["n"],
            "selection_accuracy": held["selection_accuracy"],
            "gap_closed": {m: held["gap_closed"][m] for m in PAIR_METHODS if m in held["gap_closed"]},
            "regret": held["regret"],
            "leave_one_task_out": {"selection_accuracy": sel["leave_one_task_out"]["selection_accuracy"],
                                   "gap_closed": sel["leave_one_task_out"]["gap_closed"]},
            "ablation": sel["ablation"],
        },
        "multiway": {key: {m: {"expert_retention": v["expert_retention"][m]} for m in MULTI_METHODS
                           if m in v["expert_retention"]} | {"subsets": v["subsets"]}
                     for key, v in multi.items() if key.endswith("way")},
        "bandit": {"regret": {}},
        "timings": {**timings, "total": sum(timings.values())},
    }
    report["multiway"]["learned_minus_random_order"] = multi.get("learned_minus_random_order", {})
    main = regret["main"]
    for name, key in BANDIT_POLICIES.items():
        at = main["policies"][key]["at"]
        report["bandit"]["regret"][name] = {r: at[r]["mean"] for r in at}
    return report


def write_report(out: Path, timings: dict[str, float]) -> dict:
    from simmerge_ray.selector.data import load_pair_data

    report = build_report(out, timings)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    shutil.copy(out / "selector_eval" / "gap_closed.png", out / "gap_closed.png")
    shutil.copy(out / "bandit" / "regret.png", out / "regret.png")
    grouped_bars({k: {m: report["multiway"][k][m]["expert_retention"] for m in MULTI_METHODS
                      if m in report["multiway"][k]} for k in report["multiway"] if k.endswith("way")},
                 out / "multiway_retention.png", "expert retention (%)",
                 "multi-way merges: change of the expert's score on its task")
    data = load_pair_data(str(out / "features"), str(out / "labels" / "labels.parquet"))
    feature_utility_heatmap(data.x, data.y, data.feature_names, data.operators, out / "feature_utility_heatmap.png")
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    p = report["pairwise"]
    tasks = [t for t in p["gap_closed"]["simmerge"] if t != "mean"] + ["mean"]
    lines = ["# SimMerge demo report", "",
             f"## Pairwise operator selection ({p['split']}, {p['pairs']} expert-auxiliary pairs)", "",
             f"Selection accuracy (operator with the best measured GapClosed): **{p['selection_accuracy']:.1%}**; "
             f"leave one task out: {p['leave_one_task_out']['selection_accuracy']:.1%}.", "",
             "GapClosed (% of the expert-auxiliary gap kept on the expert's task):", "",
             "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for m, g in p["gap_closed"].items():
        lines.append(f"| {m} | " + " | ".join(f"{100 * g[t]:.1f}" for t in tasks) + " |")
    lines += ["", "![GapClosed](gap_closed.png)", "", "Ablation (same folds):", "",
              "| features | selection accuracy | mean GapClosed | regret |", "|---|---:|---:|---:|"]
    for name, a in p["ablation"].items():
        lines.append(f"| {name} | {a['selection_accuracy']:.1%} | {100 * a['gap_closed_mean']:.1f} | "
                     f"{a['regret']:.3f} |")
    lines += ["", "## Multi-way plans (measured expert retention, %)", "",
              "| k | subsets | " + " | ".join(MULTI_METHODS) + " |", "|---|---:|" + "---:|" * len(MULTI_METHODS)]
    for k, v in report["multiway"].items():
        if not k.endswith("way"):
            continue
        lines.append(f"| {k} | {v['subsets']} | " + " | ".join(
            f"{100 * v[m]['expert_retention']:.1f}" if m in v else "-" for m in MULTI_METHODS) + " |")
    lines += ["", "![multi-way](multiway_retention.png)", "",
              "## Online bandit (cumulative regret in GapClosed, held-out pairs)", "",
              "| policy | " + " | ".join(f"round {r}" for r in report["bandit"]["regret"]["bandit"]) + " |",
              "|---|" + "---:|" * len(report["bandit"]["regret"]["bandit"])]
    for name, at in report["bandit"]["regret"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in at.values()) + " |")
    lines += ["", "![regret](regret.png)", "", "![feature-utility correlations](feature_utility_heatmap.png)", "",
              "## Timings (s)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in report["timings"].items()]
    return "\n".join(lines) + "\n"
