"""`simmerge probe --catalog C --out DIR`: run every catalog model on every task's probes.

`simmerge features functional` (cli/features_functional.py) shares these flags and this run.
Outputs of each (model, probe set, settings) are cached under DIR/probe_cache (or --cache), one
file per finished batch, so an interrupted run resumes. Actor resources default to the
SIMMERGE_*_INFERENCE_ACTOR asks (simmerge_ray.resources) that the jobs/ entry points export.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from simmerge_ray.cli.common import init_ray, quiet_ray_data
from simmerge_ray.inference.catalog_probes import ModelProbes
from simmerge_ray.inference.pipeline import RunReport
from simmerge_ray.inference.settings import ProbeSettings, RunOptions

MANIFEST = "probe_manifest.json"


def add_probe_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that runs probe inference."""
    p.add_argument("--catalog", "--config", dest="catalog", required=True,
                   help="catalog YAML (each task's probes: .jsonl with a \"text\" field, .parquet or .txt, "
                        "one probe per line)")
    p.add_argument("--out", required=True, help="output folder (shareable with `features structural`)")
    p.add_argument("--cache", default=None, help="probe-output cache folder (default: DIR/probe_cache)")
    p.add_argument("--overwrite", action="store_true", help="discard the probe outputs cached in --cache first (only its cache entries)")
    p.add_argument("--tasks", nargs="+", default=None, help="only these tasks (default: all in the catalog)")
    p.add_argument("--backend", choices=("hf", "deepspeed"), default="hf",
                   help="hf: model in memory; deepspeed: ZeRO-3 inference with parameters offloaded")
    p.add_argument("--nvme-path", default=None, help="deepspeed: offload parameters to NVMe here")
    p.add_argument("--actors", type=int, default=None, help="actors per model (default: SIMMERGE_MAX_ACTORS or 1)")
    p.add_argument("--batch-size", type=int, default=8, help="probes per forward pass")
    p.add_argument("--max-length", type=int, default=128, help="truncate probes to this many tokens")
    p.add_argument("--attn-max-length", type=int, default=64, help="attention maps over the first N tokens")
    p.add_argument("--full-vocab-limit", type=int, default=8192,
                   help="store whole next-token distributions up to this vocabulary size")
    p.add_argument("--top-k", type=int, default=256, help="compact form above the limit: top-k + tail mass")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype the models run in")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("probe", help="run every catalog model on its tasks' probes (cached, resumable)",
                              epilog="example:\n  simmerge probe --catalog catalog.yaml --out probes-out/")
    add_probe_flags(p)
    p.set_defaults(func=run_probe)


@dataclass(frozen=True)
class ProbeRun:
    """What `probe_from_args` did: the output folder, settings, per-task plans and run reports."""

    out: Path
    settings: ProbeSettings
    options: RunOptions
    plans: dict[str, dict[str, ModelProbes]]
    reports: dict[tuple[str, str], RunReport]


def probe_from_args(args: argparse.Namespace, *, require_comparable: bool = False,
                    outputs: tuple[str, ...] = ()) -> ProbeRun:
    """Validate the flags and the output folder (for the manifest and `outputs`), start or join
    Ray, and run every model's missing probes."""
    from pydantic import ValidationError
    from tqdm import tqdm

    from simmerge_ray import resources
    from simmerge_ray.catalog import Catalog
    from simmerge_ray.errors import ConfigError
    from simmerge_ray.inference.cache import discard_entries
    from simmerge_ray.inference.catalog_probes import probe_catalog
    from simmerge_ray.io.out_checks import check_not_input
    from simmerge_ray.io.stage_files import check_stage

    catalog = Catalog.load(args.catalog)
    ask = resources.inference_ask()
    try:
        settings = ProbeSettings(max_length=args.max_length, attn_max_length=args.attn_max_length,
                                 full_vocab_limit=args.full_vocab_limit, top_k=args.top_k, dtype=args.dtype)
        options = RunOptions(backend=args.backend, num_actors=args.actors or resources.max_actors(1),
                             batch_size=args.batch_size, cpus_per_actor=ask.num_cpus or 1.0,
                             gpus_per_actor=ask.num_gpus, memory_per_actor=ask.memory,
                             nvme_path=Path(args.nvme_path) if args.nvme_path else None)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "nvme_path"
        flag = {"num_actors": "--actors"}.get(field, "--" + field.replace("_", "-"))
        raise ConfigError(f"{flag}: {err['msg']}") from None
    out = Path(args.out)
    cache_dir = Path(args.cache) if args.cache else out / "probe_cache"
    check_stage(out, (MANIFEST, *outputs), replace=True, inputs=catalog.paths)
    check_not_input(cache_dir, catalog.paths)
    if args.overwrite:
        discard_entries(cache_dir)
    init_ray(args.address)
    quiet_ray_data()
    bars: list[tqdm] = []

    def on_start(work: dict[str, list[ModelProbes]]) -> Callable[[str, int], object]:
        """One bar for the catalog's probe tokens (cached ones count as done)."""
        runs = [mp for models in work.values() for mp in models]
        total = sum(mp.probes.num_tokens for mp in runs)
        cached = sum(len(mp.probes.ids[i]) for mp in runs for i in mp.cache.done_ids())
        bars[:] = [tqdm(total=total, initial=cached, unit="tok", desc=f"{len(work)} models", disable=None)]
        return lambda _name, tokens: bars[0].update(tokens)

    plans, reports = probe_catalog(catalog, settings, options, cache_dir, tasks=args.tasks,
                                   require_comparable=require_comparable, on_start=on_start)
    for bar in bars:
        bar.close()
    return ProbeRun(out, settings, options, plans, reports)


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


def print_summary(run: ProbeRun) -> None:
    for task, plan in run.plans.items():
        for name, mp in plan.items():
            r = run.reports[(task, name)]
            cut = f", {mp.probes.truncated} truncated to {mp.probes.max_length} tokens" if mp.probes.truncated else ""
            print(f"{task}/{name}: {mp.probes.num_probes} probes{cut}; ran {r.probes_run} "
                  f"({r.tokens_run} tokens), {mp.probes.num_probes - r.probes_run} from the cache")


def run_probe(args: argparse.Namespace) -> int:
    run = probe_from_args(args)
    print_summary(run)
    print(f"wrote {write_manifest(run)}")
    return 0
