"""The whole SimMerge pipeline on a testbed: zoo -> features -> labels -> selector -> plans -> bandit.

Each stage calls the same library function as the `simmerge` command a user would run, writing
into its own folder of the run (layout.py). A stage that finished with the same inputs is
skipped (a marker file holds the digest of its inputs and the size and mtime of every file the
stage wrote: a finished stage whose outputs were since removed, truncated or rewritten runs
again), and the stages' own caches make an interrupted run resume.
"""

from __future__ import annotations

import hashlib
import json
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from simmerge_ray.errors import OutputError, SimMergeError
from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.io.out_checks import check_creatable
from simmerge_ray.pipeline.layout import RunLayout
from simmerge_ray.testbed.label_plans import LabelSettings


@dataclass
class PipelineSettings:
    zoo_config: Path
    out: Path
    tune_samples: int = 6
    folds: int = 5
    sim_rounds: int = 200
    sim_repeats: int = 20
    seed: int = 0
    members: int = 1  # networks averaged into each selector (`fit --members`)
    labels: LabelSettings = field(default_factory=LabelSettings)  # the fields set are the label stage's inputs


@dataclass
class Stage:
    name: str
    title: str
    run: Callable[[], None]
    inputs: list[str]  # what the stage's result depends on (digested into its marker)
    outputs: tuple[Path, ...] = ()  # the folders it replaces (with overwrite: they are the run's own)


def _digest(parts: list[str]) -> str:
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=12).hexdigest()


def _label_inputs(settings: LabelSettings) -> list[str]:
    """Every label setting, defaults included: a new default (a change of the sampled plan space)
    makes the label stage run again, which its per-plan cache keeps to the new plans."""
    return [json.dumps(settings.model_dump(mode="json"), sort_keys=True)]


def stages(s: PipelineSettings, echo: Callable[[str], None] = print) -> list[Stage]:
    """The pipeline's stages, each printing its lines through `echo`."""
    from simmerge_ray.features.structural import StructuralOptions
    from simmerge_ray.pipeline import features, selector, zoo
    from simmerge_ray.pipeline.bandit import replay_bandit
    from simmerge_ray.pipeline.multiway import judge_multiway
    from simmerge_ray.testbed.zoo_config import ZooConfig

    # Missing or invalid: one line, before the run folder exists. Probes are cut to the zoo's
    # positions (the pipeline has no --max-length to pass instead).
    positions = ZooConfig.load(s.zoo_config).architecture.max_position_embeddings
    run = RunLayout(s.out)
    zoo_digest = hashlib.blake2b(Path(s.zoo_config).read_bytes(), digest_size=12).hexdigest()
    probing = features.ProbeSettings(max_length=min(features.ProbeSettings().max_length, positions))
    search = ["--tune-samples", str(s.tune_samples), "--seed", str(s.seed),
              *(["--members", str(s.members)] if s.members != 1 else [])]  # one network: the markers as before

    def selectors(out: Path, target: selector.Target = "utility") -> selector.SelectorSettings:
        return selector.SelectorSettings(run.features, run.pair_labels, out, target=target,
                                         tune_samples=s.tune_samples, seed=s.seed, members=s.members,
                                         overwrite=True)  # the run's own folder: a rerun replaces it

    def fit_both() -> None:
        selector.fit_many([selectors(run.selector), selectors(run.aux_selector, "aux_gap_closed")], echo=echo)

    return [
        Stage("zoo", "build the testbed (pretrain a base, fine-tune experts)",
              lambda: zoo.build(s.zoo_config, run.zoo, overwrite=True, echo=echo), [zoo_digest], (run.zoo,)),
        Stage("structural", "structural features (one streaming Gram pass)",
              lambda: features.structural(run.catalog, run.features, StructuralOptions(overwrite=True), echo=echo),
              [], (run.features,)),
        Stage("functional", "probe inference on Ray Data and functional features",
              lambda: features.functional(features.ProbeRequest(run.catalog, run.features, features.run_options(),
                                                                probing), echo=echo),
              ["b-task-columns"]),
        Stage("labels", "merge and evaluate 2-, 3- and 4-way merges (ground truth)",
              lambda: zoo.label(run.catalog, run.labels, s.labels, echo=echo), _label_inputs(s.labels), (run.labels,)),
        Stage("selector_eval", "selector on held-out pairs (Ray Tune nested), leave-one-task-out, ablation",
              lambda: selector.evaluate(selectors(run.selector_eval), folds=s.folds, echo=echo),
              [str(s.folds), *search, "search-per-fold-and-task-grouped", "loto-neither-side"], (run.selector_eval,)),
        Stage("fit", "fit the selectors on all pairs (Ray Tune, then Ray Train)", fit_both, search,
              (run.selector, run.aux_selector)),
        Stage("multiway", "plan 3- and 4-way merges and judge them on measured merges",
              lambda: judge_multiway(run), ["calibration-intervals-v3"], (run.multiway,)),
        Stage("bandit", "online bandit replayed on held-out pairs",
              lambda: replay_bandit(run, rounds=s.sim_rounds, repeats=s.sim_repeats, seed=s.seed),
              [str(s.sim_rounds), str(s.sim_repeats), "selector-imputes"], (run.bandit,)),
    ]


def _stamp(path: Path) -> list[int] | None:
    """[size, mtime] of a file, None when it is gone or not a file."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None


def _files(root: Path) -> dict[str, list[int]]:
    """Every file under the run folder but the stage markers: relative path -> [size, mtime]."""
    stamps = {path.relative_to(root).as_posix(): _stamp(path) for path in root.rglob("*")
              if not (path.name.startswith(".stage-") and path.parent == root)}
    return {rel: stamp for rel, stamp in stamps.items() if stamp is not None}


def _changed_outputs(root: Path, written: dict | None) -> list[str]:
    """The files a finished stage wrote that are no longer as it left them (a marker of an older
    version lists none: nothing to check)."""
    if not isinstance(written, dict):
        return []
    return [rel for rel, stamp in sorted(written.items()) if _stamp(root / rel) != stamp]


def _read_marker(marker: Path, echo: Callable[[str], None]) -> dict | None:
    """A stage's finished-marker, or None (not done) when it is absent or unreadable: a stage
    whose marker cannot be read simply runs again."""
    try:
        raw = json.loads(marker.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raw = None
    if isinstance(raw, dict) and _marker_fields_ok(raw):
        return raw
    echo(f"{marker}: unreadable stage marker; running the stage again")
    return None


def _marker_fields_ok(raw: dict) -> bool:
    """Whether a marker's fields have the types the runner writes: an edited `seconds` was a
    ValueError traceback on every rerun, and `files` that is not a mapping reused the stage
    unchecked (only a marker of an older version, without `files`, lists nothing to check)."""
    seconds, files = raw.get("seconds", 0.0), raw.get("files", {})
    return (isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and isinstance(files, dict)
            and all(isinstance(v, list) for v in files.values()))


def _check_foreign_outputs(all_stages: list[Stage], layout: RunLayout) -> None:
    """Refuse, before any work, a run folder holding a stage's output that no stage of it began
    (no marker): a stage replaces its output (a zoo the user built at RUN/zoo was rebuilt from
    --zoo-config, without --overwrite). A stage writes its marker when it starts and again when
    it finishes, so an interrupted run still resumes."""
    for st in all_stages:
        if layout.marker(st.name).exists():
            continue
        for out in st.outputs:
            if out.exists():
                raise SimMergeError(f"{out}: already there, and no {st.name!r} stage of this run folder wrote it; "
                                    f"the stage would replace it: move it away or choose another --out")


def check_run_folder(out: Path) -> None:
    """A run folder that is a file, lies under one, or cannot be written is one line before any
    work (it was a FileExistsError traceback)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: not a folder; the run folder (--out) holds the stages' folders")
    check_creatable(out)


def run(s: PipelineSettings, *, echo: Callable[[str], None] = print, until: str | None = None) -> dict[str, float]:
    """Run every stage, or those up to `until` (skipping finished ones); returns seconds per stage."""
    all_stages = stages(s, echo)  # the zoo config missing or invalid: one line, before the run folder exists
    if until is not None:
        names = [st.name for st in all_stages]
        if until not in names:
            raise SimMergeError(f"no pipeline stage {until!r}; stages: {', '.join(names)}")
        all_stages = all_stages[:names.index(until) + 1]
    layout = RunLayout(s.out)
    check_run_folder(s.out)
    _check_foreign_outputs(all_stages, layout)
    s.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    upstream: list[str] = []
    for i, st in enumerate(all_stages, start=1):
        key = _digest([st.name, *st.inputs, *upstream])
        marker = layout.marker(st.name)
        prefix = f"[{i}/{len(all_stages)}] {st.name:<13}"
        done = _read_marker(marker, echo)
        changed = _changed_outputs(s.out, done.get("files")) if done is not None and done.get("key") == key else None
        if changed == []:
            timings[st.name] = float(done.get("seconds", 0.0))
            echo(f"{prefix} done earlier ({timings[st.name]:.0f} s), reused")
        else:
            if changed:
                named = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
                echo(f"{prefix} {len(changed)} of its outputs changed since it finished ({named}); running it again")
            echo(f"{prefix} {st.title} ...")
            if done is None:  # the run folder's claim on the stage's outputs, before they appear (resumable)
                atomic_write_text(marker, json.dumps({"key": None, "started": True}))
            before = _files(s.out)
            t0 = time.perf_counter()
            st.run()
            timings[st.name] = time.perf_counter() - t0
            written = {rel: stamp for rel, stamp in _files(s.out).items() if before.get(rel) != stamp}
            atomic_write_text(marker, json.dumps({"key": key, "seconds": timings[st.name], "files": written}))
            echo(f"{prefix} finished in {timings[st.name]:.0f} s")
        upstream.append(key)
    return timings
