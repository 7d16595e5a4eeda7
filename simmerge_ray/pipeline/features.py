"""The feature stages: structural (one streaming pass over the weights) and functional (probe
inference, then per-task pair features). `simmerge features ...` and `simmerge probe` run
these, and so does the pipeline."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from simmerge_ray.errors import ConfigError
from simmerge_ray.features.structural import StructuralOptions, StructuralRun
from simmerge_ray.inference.catalog_probes import ModelProbes
from simmerge_ray.inference.pipeline import RunReport
from simmerge_ray.inference.settings import ProbeSettings, RunOptions
from simmerge_ray.ray_session import init_ray, quiet_ray_data
from simmerge_ray.sizes import human_bytes, human_rate

if TYPE_CHECKING:
    from simmerge_ray.catalog import Catalog

MANIFEST = "probe_manifest.json"


def structural(catalog: Path, out: Path, opts: StructuralOptions = StructuralOptions(), *,
               address: str | None = None, echo: Callable[[str], None] = print) -> StructuralRun:
    """Structural features and Gram matrices of every model pair, with a progress bar on a terminal."""
    from tqdm import tqdm

    from simmerge_ray.catalog import Catalog
    from simmerge_ray.features.structural import check_structural_out, compute_structural
    from simmerge_ray.features.structural_rows import open_rows

    cat = Catalog.load(catalog)
    check_structural_out(cat, Path(out), opts.overwrite)
    rows = open_rows(cat)  # every header read and compared before Ray starts
    init_ray(address)
    with tqdm(desc="structural pass", unit="B", unit_scale=True, unit_divisor=1024, leave=False,
              disable=None) as bar:  # no bar where stderr is not a terminal
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        run = compute_structural(cat, out, opts, progress, rows)
    from simmerge_ray.features.gram_cache import gram_cache_root
    from simmerge_ray.features.joined import JOINED_FILE

    read = run.total_bytes_read
    # the Gram cache is this machine's (SIMMERGE_CACHE), not --out's: a fresh --out finds its rows there
    cached = (f", {run.pairs_cached} row pairs from this machine's Gram cache ({gram_cache_root()})"
              if run.pairs_cached else "")
    joined = f" (and {JOINED_FILE}, joined with the functional table)" if (Path(out) / JOINED_FILE).is_file() else ""
    echo(f"structural features of {len(run.models)} models"
         f"{' with base ' + run.base if run.base else ''}: {run.tensors} tensors "
         f"({run.tensors_computed} computed{cached}) -> {run.out}{joined}")
    echo(f"read {human_bytes(read)} in {run.seconds:.1f} s" + (f" ({human_rate(read, run.seconds)})" if read else ""))
    return run


def run_options(backend: str = "hf", actors: int | None = None, batch_size: int = 8,
                nvme_path: Path | None = None) -> RunOptions:
    """How probes run: the actor pool takes the inference asks that jobs export (SIMMERGE_*)."""
    from simmerge_ray import resources

    ask = resources.inference_ask()
    return RunOptions(backend=backend, num_actors=actors or resources.max_actors(1), batch_size=batch_size,
                      cpus_per_actor=ask.num_cpus or 1.0, gpus_per_actor=ask.num_gpus, memory_per_actor=ask.memory,
                      nvme_path=nvme_path)


@dataclass(frozen=True)
class ProbeRequest:
    """One probe run over a catalog: its outputs are cached per (model, probe set, settings)."""

    catalog: Path
    out: Path
    options: RunOptions
    settings: ProbeSettings = ProbeSettings()
    cache: Path | None = None  # default: out/probe_cache
    overwrite: bool = False  # discard the cache's entries first
    tasks: list[str] | None = None  # default: every task of the catalog
    address: str | None = None

    @property
    def cache_dir(self) -> Path:
        return self.cache if self.cache is not None else self.out / "probe_cache"


@dataclass(frozen=True)
class ProbeRun:
    """What `run_probes` did: the output folder, settings, per-task plans and run reports."""

    out: Path
    settings: ProbeSettings
    options: RunOptions
    plans: dict[str, dict[str, ModelProbes]]
    reports: dict[tuple[str, str], RunReport]
    model_tasks: dict[str, str | None]  # each catalog model's own task (None: no task's expert)


def check_probe_catalog(catalog: Catalog, tasks: list[str] | None, *, pairs: bool) -> None:
    """A catalog with no task to probe, or (`pairs`: functional features) fewer than two models,
    is refused: it used to give an empty manifest or table and exit 0."""
    where = catalog.source or "catalog"
    if not (catalog.tasks if tasks is None else tasks):
        raise ConfigError(f"{where}: no tasks to probe (add `tasks:` entries, each with a `probes:` file)")
    if pairs and len(catalog.models) < 2:
        raise ConfigError(f"{where}: functional features compare pairs of models, and the catalog names "
                          f"{len(catalog.models)}")


def run_probes(req: ProbeRequest, *, require_comparable: bool = False, outputs: tuple[str, ...] = ()) -> ProbeRun:
    """Check the output folder (for the manifest and `outputs`), start or join Ray, and run
    every model's missing probes, with a token progress bar on a terminal."""
    from tqdm import tqdm

    from simmerge_ray.catalog import Catalog
    from simmerge_ray.inference.catalog_probes import probe_catalog
    from simmerge_ray.io.out_checks import check_creatable, check_not_input
    from simmerge_ray.io.stage_files import check_stage

    catalog = Catalog.load(req.catalog)
    check_probe_catalog(catalog, req.tasks, pairs=require_comparable)
    out = Path(req.out)
    check_stage(out, (MANIFEST, *outputs), replace=True, inputs=catalog.paths)
    check_not_input(req.cache_dir, catalog.paths, noun="the probe cache")
    if req.cache_dir.exists() and not req.cache_dir.is_dir():
        raise ConfigError(f"{req.cache_dir}: the probe cache must be a folder, and this is a file")
    check_creatable(req.cache_dir / "x")
    bars: list[tqdm] = []

    def on_start(work: dict[str, list[ModelProbes]]) -> Callable[[str, int], object]:
        """One bar for the catalog's probe tokens (cached ones count as done)."""
        runs = [mp for models in work.values() for mp in models]
        total = sum(mp.probes.num_tokens for mp in runs)
        cached = sum(len(mp.probes.ids[i]) for mp in runs for i in mp.cache.done_ids())
        bars[:] = [tqdm(total=total, initial=cached, unit="tok", desc=f"{len(work)} models", disable=None)]
        return lambda _name, tokens: bars[0].update(tokens)

    def connect() -> None:
        init_ray(req.address)
        quiet_ray_data()

    plans, reports = probe_catalog(catalog, req.settings, req.options, req.cache_dir, tasks=req.tasks,
                                   require_comparable=require_comparable, overwrite=req.overwrite, connect=connect,
                                   on_start=on_start)
    for bar in bars:
        bar.close()
    return ProbeRun(out, req.settings, req.options, plans, reports, catalog.model_tasks)


def write_manifest(run: ProbeRun) -> Path:
    """DIR/probe_manifest.json: settings, and per task and model the cache folder and what ran."""
    from simmerge_ray.io.stage_files import stage_files

    manifest = {
        "settings": run.settings.model_dump(),
        "backend": run.options.backend,
        "tasks": {
            task: {
                name: {"cache": str(mp.cache.root), "probe_digest": mp.probes.digest(),
                       "num_probes": mp.probes.num_probes, "num_tokens": mp.probes.num_tokens,
                       "truncated": mp.probes.truncated, "probes_run": run.reports[(task, name)].probes_run,
                       "tokens_run": run.reports[(task, name)].tokens_run}
                for name, mp in plan.items()
            }
            for task, plan in run.plans.items()
        },
    }
    with stage_files(run.out, "probe", (MANIFEST,), replace=True) as tmp:
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return run.out / MANIFEST


def summary_lines(run: ProbeRun) -> list[str]:
    """Per task and model: probes, truncations, what ran and what came from the cache."""
    lines = []
    for task, plan in run.plans.items():
        for name, mp in plan.items():
            r = run.reports[(task, name)]
            cut = f", {mp.probes.truncated} truncated to {mp.probes.max_length} tokens" if mp.probes.truncated else ""
            lines.append(f"{task}/{name}: {mp.probes.num_probes} probes{cut}; ran {r.probes_run} "
                         f"({r.tokens_run} tokens), {mp.probes.num_probes - r.probes_run} from the cache")
    return lines


def functional(req: ProbeRequest, *, echo: Callable[[str], None] = print) -> dict[str, Path]:
    """Run the missing probes, then write out/functional.parquet (and out/features.parquet when
    the structural features are there); returns what was written."""
    from simmerge_ray.features.functional import write_functional_features
    from simmerge_ray.features.joined import FUNCTIONAL_FILE, JOINED_FILE

    run = run_probes(req, require_comparable=True, outputs=(FUNCTIONAL_FILE, JOINED_FILE))
    for line in summary_lines(run):
        echo(line)
    write_manifest(run)
    written = write_functional_features(run.plans, run.model_tasks, run.out)
    for what, path in written.items():
        echo(f"wrote {what}: {path}")
    return written
