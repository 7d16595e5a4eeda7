"""report.json and report.md of a pipeline run, from the stages' own JSON outputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from simmerge_ray.errors import OutputError
from simmerge_ray.io.atomic import atomic_write_text, owned_temp_dir
from simmerge_ray.io.json_text import json_text
from simmerge_ray.io.owner import clean_stale
from simmerge_ray.merge.arms import ARM_NAMES, PAPER_ARMS, STEP_ARMS
from simmerge_ray.pipeline.layout import RunLayout
from simmerge_ray.pipeline.selector import loto_evaluated
from simmerge_ray.report.charts import feature_utility_heatmap, grouped_bars

PAIR_METHODS = ("simmerge", *ARM_NAMES, "majority", "oracle")
ONE_SIDED_METHODS = ("simmerge", *PAPER_ARMS, "oracle")
MULTI_METHODS = ("simmerge", "random_order", "simmerge_calibrated", "calibrated_random_order", *STEP_ARMS,
                 "equal_share", "oracle", "oracle_random_order")
RETENTIONS = ("expert_retention", "mean_retention")
REPORT_FILES = ("report.json", "report.md", "utility.png", "regret.png", "multiway_retention.png",
                "multiway_by_task.png", "feature_utility_heatmap.png")
REPORT_TMP = ".report.tmp-"  # the folder in the run folder the report is written in, then moved out of
BANDIT_POLICIES = {"bandit": "bandit", "bandit_cold": "bandit_cold", "random": "uniform",
                   "greedy": "greedy_offline", "best_fixed": "best_fixed"}


def testbed_section(zoo: Path) -> dict:
    """Every model's accuracy and score per domain (the base included), its task vector, and,
    where the base has a skills stage, the base before it and how far that stage moved it."""
    import polars as pl

    rows = pl.read_parquet(zoo / "scores.parquet").to_dicts()
    scores: dict[str, dict] = {}
    for r in rows:
        entry = scores.setdefault(r["model"], {"expert_of": r["model_task"]})
        entry[r["task"]] = {"accuracy": r["accuracy"], "score": r["score"]}
    manifest = json.loads((zoo / "manifest.json").read_text())
    section = {"scores": scores, "task_vectors": manifest.get("task_vectors", {}),
               "eval_examples": manifest["config"]["data"]["eval_examples"]}
    if "pretrained" in manifest:
        section["pretrained"] = manifest["pretrained"]
    return section


def build_report(out: Path, timings: dict[str, float]) -> dict:
    run = RunLayout(out)
    sel = json.loads(run.selector_report.read_text())
    multi = json.loads((run.multiway / "multiway.json").read_text())
    regret = json.loads((run.bandit / "regret.json").read_text())
    held = sel["held_out_pairs"]
    labels = json.loads(run.label_summary.read_text())
    report: dict = {
        "metric": {"utilities_on": labels.get("metric", "score"), "gap_epsilon": labels.get("gap_epsilon")},
        "pairwise": {
            "split": held["split"],
            "pairs": held["n"],
            "selection_accuracy": held["selection_accuracy"],
            "utility": {m: held["utility"][m] for m in PAIR_METHODS if m in held["utility"]},
            "gap_closed": {m: held["gap_closed"][m] for m in ONE_SIDED_METHODS if m in held.get("gap_closed", {})},
            "best_fixed_arm": held["best_fixed_operator"],
            "simmerge_vs_best_fixed": held["simmerge_vs_best_fixed"],
            "simmerge_share_of_oracle": held["simmerge_share_of_oracle"],
            "headroom_share": held["headroom_share"],
            "oracle_arm_share": held["oracle_operator_share"],
            "regret": held["regret"],
            "leave_one_task_out": ({"selection_accuracy": sel["leave_one_task_out"]["selection_accuracy"],
                                    "utility": sel["leave_one_task_out"]["utility"]}
                                   if loto_evaluated(sel["leave_one_task_out"]) else sel["leave_one_task_out"]),
            "ablation": sel["ablation"],
        },
        "testbed": testbed_section(run.zoo),
        "multiway": {key: {m: {r: v[m][r] for r in RETENTIONS} for m in MULTI_METHODS if m in v}
                     | {"subsets": v["subsets"], "targets": v["targets"],
                        "by_task": v["by_task"], "learned_minus_random_order": v["learned_minus_random_order"],
                        "order_gain": v["order_gain"], "calibrated_intervals": v.get("calibrated_intervals")}
                     for key, v in multi.items() if key.endswith("way")},
        "bandit": {"regret": {}},
        "timings": {**timings, "total": sum(timings.values())},
    }
    report["multiway"]["objective"] = multi.get("objective", {})
    main = regret["main"]
    for name, key in BANDIT_POLICIES.items():
        at = main["policies"][key]["at"]
        report["bandit"]["regret"][name] = {r: at[r]["mean"] for r in at}
    return report


def _report_record(out: Path) -> Path:
    return RunLayout(out).marker("report")


def check_report_files(out: Path) -> None:
    """The report's files lie at the top of the run folder, which may be any folder of the user's:
    one there that no report of this run folder wrote is refused before any work (it was replaced
    once every stage was done). The report's record lists what it wrote; in a run folder from before
    the record (one holding a stage's record, with a stage invalidated since or not), they count as
    the report's."""
    record = _report_record(out)
    try:
        listed = set(json.loads(record.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        older = not record.exists() and any(Path(out).glob(RunLayout(out).marker("*").name))
        listed = set(REPORT_FILES) if older else set()
    for name in REPORT_FILES:
        path = Path(out) / name
        if (path.exists() or path.is_symlink()) and (name not in listed or path.is_symlink() or not path.is_file()):
            raise OutputError(f"{path}: not written by a simmerge report of this run folder, and the report would "
                              f"replace it: move it away or choose another --out")


def write_report(out: Path, timings: dict[str, float]) -> dict:
    """Write the report's files into a temporary folder in the run folder, then move them into
    place one by one (each an atomic rename): the old report.md goes first and the new one comes
    last, so a report.md lies only beside the report.json and charts it was written with (an
    interruption leaves the old set, or the new files without report.md, never a mixed pair)."""
    run = RunLayout(out)
    check_report_files(out)
    report = build_report(out, timings)
    clean_stale(out, (REPORT_TMP,))
    tmp = owned_temp_dir(out, REPORT_TMP)
    try:
        _write_report_files(run, report, tmp)
        check_report_files(out)  # a file of the user's may have appeared meanwhile
        atomic_write_text(_report_record(out), json.dumps({"files": list(REPORT_FILES)}))  # the claim, before the files
        (out / "report.md").unlink(missing_ok=True)  # the report's own (checked above)
        for name in sorted(REPORT_FILES, key=lambda n: n == "report.md"):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _write_report_files(run: RunLayout, report: dict, tmp: Path) -> None:
    from simmerge_ray.selector.data import load_pair_data

    (tmp / "report.json").write_text(json_text(report))  # NaN (an empty group) as null: valid JSON
    shutil.copy(run.selector_eval / "utility.png", tmp / "utility.png")
    shutil.copy(run.bandit / "regret.png", tmp / "regret.png")
    ways = [k for k in report["multiway"] if k.endswith("way")]
    grouped_bars({f"{k} {r.split('_')[0]}": {m: report["multiway"][k][m][r] for m in MULTI_METHODS
                                             if m in report["multiway"][k]} for k in ways for r in RETENTIONS},
                 tmp / "multiway_retention.png", "retention (%)",
                 "multi-way merges: retention of the expert, and mean over the plan's models")
    grouped_bars({t: {m: d[m]["mean_retention"] for m in ("simmerge", "random_order", "simmerge_calibrated",
                                                            "equal_share", "oracle", "oracle_random_order") if m in d}
                  for k in ways for t, d in ((f"{k} {t}", d) for t, d in report["multiway"][k]["by_task"].items())},
                 tmp / "multiway_by_task.png", "mean retention (%)",
                 "multi-way merges per target task: the planner (and calibrated) against random order, the soup and the oracle")
    data = load_pair_data(str(run.features), str(run.pair_labels))
    feature_utility_heatmap(data.x, data.y, data.feature_names, data.operators, tmp / "feature_utility_heatmap.png")
    (tmp / "report.md").write_text(render_markdown(report))


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """A markdown table: its first `text_columns` columns (names, words) left-aligned, the
    numbers after them right-aligned."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns),
            *("| " + " | ".join(r) + " |" for r in rows)]


def render_markdown(report: dict) -> str:
    from simmerge_ray.planner.evaluate import MIN_COVERAGE_SUBSETS

    p = report["pairwise"]
    tasks = [t for t in p["utility"]["simmerge"] if t != "mean"] + ["mean"]
    tb = report["testbed"]
    domains = sorted({t for m in tb["scores"].values() for t in m if t != "expert_of"})
    lines = ["# SimMerge demo report", "",
             f"Utilities (GapClosed, retention) are computed on **{report['metric']['utilities_on']}**.", "",
             *_cautions(report), "## Testbed: answer accuracy per model and domain", ""]
    lines += _table(["model", "expert of", *domains],
                    [[m, v["expert_of"] or "-", *(f"{v[d]['accuracy']:.3f}" for d in domains)]
                     for m, v in tb["scores"].items()], text_columns=2)
    lines += ["", f"## Pairwise arm selection ({p['split']}, {p['pairs']} expert-auxiliary pairs)", "",
              f"Selection accuracy (arm with the best measured utility): **{p['selection_accuracy']:.1%}**; "
              f"leave one task out: {_loto_accuracy(p['leave_one_task_out'])}. SimMerge minus the best "
              f"fixed arm ({p['best_fixed_arm']}): **{100 * p['simmerge_vs_best_fixed']:+.1f} points**; "
              f"share of the oracle: {100 * (p['simmerge_share_of_oracle'] or 0):.0f}%.", "",
              "Two-sided utility (%, mean of the gap closed on the expert's and on the auxiliary's task):", ""]
    lines += _table(["method", *tasks], [[m, *(f"{100 * g[t]:.1f}" for t in tasks)] for m, g in p["utility"].items()])
    if missing := [d for d in domains if d not in tasks]:  # said, not left for the reader to notice
        lines += ["", f"No column for {', '.join(missing)}: no held-out pair with that expert has a defined "
                      f"two-sided utility (GapClosed is undefined where the expert and the auxiliary score within "
                      f"{report['metric'].get('gap_epsilon') or 'the labels gap_epsilon'} of each other on a task)."]
    if p["gap_closed"]:
        lines += ["", "The paper's one-sided GapClosed (%, expert's task only) of its three operators, their "
                  "oracle, and the arm SimMerge picked:", ""]
        lines += _table(["method", *tasks], [[m, *(f"{100 * g[t]:.1f}" for t in tasks)]
                                             for m, g in p["gap_closed"].items()])
    lines += ["", "![utility](utility.png)", "", "Ablation (same folds):", ""]
    lines += _table(["features", "selection accuracy", "mean utility", "regret"],
                    [[n, f"{a['selection_accuracy']:.1%}", f"{100 * a['utility_mean']:.1f}", f"{a['regret']:.3f}"]
                     for n, a in p["ablation"].items()])
    mw = {k: v for k, v in report["multiway"].items() if k.endswith("way")}
    lines += ["", "## Multi-way plans (measured retention, %: expert / mean over the plan's models)", ""]
    lines += _table(["k", "subsets x targets", *MULTI_METHODS],
                    [[k, f"{v['subsets']} x {v['targets'] // max(v['subsets'], 1)}",
                      *(f"{100 * v[m]['expert_retention']:.1f} / {100 * v[m]['mean_retention']:.1f}" if m in v else "-"
                        for m in MULTI_METHODS)] for k, v in mw.items()])
    lines += ["", MULTI_LEGEND]
    lines += ["", "Planner minus random order, per target task (points of expert / mean retention):", ""]
    tasks_mw = sorted({t for v in mw.values() for t in v["learned_minus_random_order"]})
    lines += _table(["k", *tasks_mw], [[k, *(f"{100 * d['expert_retention']:+.1f} / {100 * d['mean_retention']:+.1f}"
                                             if (d := v["learned_minus_random_order"].get(t)) else "-" for t in tasks_mw)]
                                       for k, v in mw.items()])
    lines += ["", "What order alone buys (points of mean retention over the same rule in a random order: the "
              "pick's, and its rule's best labelled order's, the ceiling of any planner keeping that rule):", ""]
    gains = [m for m in ("simmerge", "simmerge_calibrated", "oracle") if any(m in v["order_gain"] for v in mw.values())]
    lines += _table(["k", *gains], [[k, *(" / ".join(f"{100 * x:+.1f}" for x in v["order_gain"][m].values())
                                          if m in v["order_gain"] else "-" for m in gains)] for k, v in mw.items()])
    covered = {k: v["calibrated_intervals"] for k, v in mw.items() if v.get("calibrated_intervals")}
    if covered:
        lines += ["", "Calibrated intervals on held-out subsets (coverage of the expert's / the others' mean "
                  "retention, every plan, the calibrated pick with every plan's widths and with the top plan's "
                  "correction and widths; mean width in points):", ""]
        lines += _table(["k", "level", "every plan", "picked plan", "as the top plan", "mean width",
                         "top plan's width", "widths from"],
                        [[k, f"{lv}%", f"{c['expert']:.1%} / {c['others']:.1%}",
                          f"{c['picked_expert']:.1%} / {c['picked_others']:.1%}",
                          f"{c['top_plan_expert']:.1%} / {c['top_plan_others']:.1%}",
                          " / ".join(f"{100 * w:.1f}" for w in c["mean_width"]),
                          " / ".join(f"{100 * w:.1f}" for w in c["top_plan_mean_width"]),
                          "every size" if c.get("widths_borrow_other_sizes") else "this size"]
                         for k, cov in covered.items() for lv, c in cov.items()])
    if uncovered := [k for k, v in mw.items() if "calibrated_intervals" in v and k not in covered]:
        lines += ["", f"No interval coverage measured at {', '.join(uncovered)}: fewer than {MIN_COVERAGE_SUBSETS} "
                      "labelled subsets of that size (each subset's widths come from the others')."]
    lines += ["", "![multi-way by task](multiway_by_task.png)"]
    rounds = list(report["bandit"]["regret"]["bandit"])
    lines += ["", "![multi-way](multiway_retention.png)", "",
              "## Online bandit (cumulative regret in utility, held-out pairs)", "",
              "Regret: the utility of the best arm for each round's pair (the oracle's pick) minus that of "
              "the policy's pick, summed over rounds.", ""]
    lines += _table(["policy", *(f"round {r}" for r in rounds)],
                    [[n, *(f"{v:.2f}" for v in at.values())] for n, at in report["bandit"]["regret"].items()])
    lines += ["", "![regret](regret.png)", "", "![feature-utility correlations](feature_utility_heatmap.png)", "",
              "## Timings (s)", ""]
    lines += _table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in report["timings"].items()])
    return "\n".join(lines) + "\n"


MULTI_LEGEND = ("simmerge: the planner's top plan; random_order: its weighting and step arms in a random order; "
                "simmerge_calibrated: the top plan once the planner is calibrated on the other subsets' measured "
                "merges, and calibrated_random_order its rule in a random order; linear, slerp, ties: that arm at "
                "every step (random order and weighting); equal_share: the model soup (equal-weight linear fold); oracle: the best measured plan, "
                "and oracle_random_order its rule in a random order.")


def _cautions(report: dict) -> list[str]:
    """What the console warned about the run's size, kept with its numbers: a report read alone
    should say when they are a smoke test rather than a result."""
    from simmerge_ray.selector.data import MIN_LABELLED_PAIRS, few_pairs_text
    from simmerge_ray.testbed.zoo_config import MIN_EVAL_EXAMPLES, worst_accuracy_error

    lines = []
    n = report["testbed"].get("eval_examples")
    if n is not None and n < MIN_EVAL_EXAMPLES:
        lines.append(f"**Caution:** {n} eval examples per domain give each accuracy a standard error of up to "
                     f"{worst_accuracy_error(n):.3f}, above the labels' noise floor of 0.03: the differences between arms "
                     f"below are mostly noise (a smoke test; use {MIN_EVAL_EXAMPLES} or more for results).")
    pairs = report["pairwise"]["pairs"]
    if pairs < MIN_LABELLED_PAIRS:
        lines.append(f"**Caution:** {few_pairs_text(pairs)}.")
    return [line for c in lines for line in (c, "")]


def _loto_accuracy(loto: dict) -> str:
    return f"{loto['selection_accuracy']:.1%}" if loto_evaluated(loto) else loto["reason"]
