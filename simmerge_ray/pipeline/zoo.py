"""The testbed stages: build the zoo of experts, then merge and evaluate its pairs and plans (the
labels). `simmerge zoo build` and `simmerge label` run these, and so does the pipeline."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import ConfigError
from simmerge_ray.io.out_checks import check_output
from simmerge_ray.ray_session import init_ray
from simmerge_ray.testbed.label_plans import LabelSettings

if TYPE_CHECKING:  # the labels module imports torch and Ray: not at `simmerge --help`
    from simmerge_ray.testbed.labels import LabelRunReport
    from simmerge_ray.testbed.zoo_config import ZooConfig


def build(config: Path, out: Path, *, overwrite: bool = False, address: str | None = None,
          echo: Callable[[str], None] = print) -> Path:
    """Pretrain the base and fine-tune the experts of a zoo YAML; returns the catalog's path."""
    from simmerge_ray.testbed.build import build_zoo
    from simmerge_ray.testbed.zoo_config import ZooConfig

    cfg = ZooConfig.load(config)
    check_output(out, overwrite=overwrite, inputs=[config])
    init_ray(address)
    catalog = build_zoo(cfg, Path(out), overwrite=overwrite, source=config)
    echo(f"zoo: {len(cfg.experts())} experts + base -> {catalog}")
    if (small := cfg.eval_warning()) is not None:  # allowed (the test zoos), but its labels are noise
        print(f"simmerge: warning: {config}: {small}", file=sys.stderr)  # after: an error stays one line
    return catalog


def check_eval_files(catalog: Catalog, tasks: set[str]) -> None:
    """Every eval file readable, each line a prompt and an answer (strings): checked before Ray
    starts, since in an actor a bad file surfaces as an actor's death long after."""
    from simmerge_ray.testbed.evaluate import load_examples

    for task in sorted(tasks):
        path = catalog.tasks[task].eval
        try:
            examples = load_examples(path)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file (the eval set of task {task!r}, the catalog's "
                              f"tasks.{task}.eval)") from None
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise ConfigError(f"{path}: cannot read the eval set of task {task!r} ({why})") from None
        for i, ex in enumerate(examples, start=1):
            if not (isinstance(ex.prompt, str) and isinstance(ex.answer, str) and ex.prompt and ex.answer):
                raise ConfigError(f"{path}: example {i}: 'prompt' and 'answer' must be non-empty strings")


def label(catalog: Path, out: Path, settings: LabelSettings, *, max_plans: int | None = None,
          address: str | None = None, echo: Callable[[str], None] = print) -> LabelRunReport:
    """Measure the catalog's 2-, 3- and 4-way merges (resuming from out/cache)."""
    from simmerge_ray.testbed.labels import check_label_catalog, check_label_models, check_label_output, run_labels

    cat = Catalog.load(catalog)
    experts = check_label_catalog(cat)
    check_eval_files(cat, set(experts.values()))
    taskless = [m.name for m in cat.models if m.task is None]
    idle = [t for t in cat.tasks if t not in experts.values()]
    if taskless or idle:  # said, so that a model or task missing from the labels is never a surprise
        echo("label: left out, as a merge is judged on both models' tasks: "
             + "; ".join(([f"models without a task ({', '.join(taskless)})"] if taskless else [])
                         + ([f"tasks without an expert ({', '.join(idle)})"] if idle else [])))
    check_label_output(Path(out), [*cat.paths, Path(catalog)])
    evals = check_label_models(cat, experts)
    init_ray(address)
    rep = run_labels(Path(catalog), Path(out), settings, max_plans=max_plans, evals=evals)
    state = "complete: tables written" if rep.complete else "incomplete: rerun to resume"
    # rep.total counts distinct merges (the run's first line: "N plans (M distinct merges)"), not plans
    echo(f"label: {rep.computed} measured, {rep.cached} cached of {rep.total} distinct merges in {rep.seconds:.0f}s "
         f"({state}) -> {rep.out}")
    if rep.complete:
        info = json.loads((rep.out / "label_summary.json").read_text())
        dropped = info["dropped_2way_small_gap"]
        both = info.get("pairs_utility")  # absent from a summary an older version wrote
        echo(f"labels: {info['pairs_2way']} labelled pairs"
             + (f", {both} of them with both sides' gaps (the two-sided utility fit learns from)"
                if both is not None and both != info["pairs_2way"] else "")
             + f"; {info['labels_2way']} rows, one per arm"
             + (f" ({dropped} rows dropped: the expert's and the auxiliary's scores differ by less than "
                f"{info['gap_epsilon']:g}, so GapClosed is undefined)" if dropped else "")
             + f"; {info['labels_3way']} 3-way and {info['labels_4way']} 4-way plans")
    return rep
