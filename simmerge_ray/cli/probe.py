"""`simmerge probe --catalog C --out DIR`: run every catalog model on every task's probes.

`simmerge features functional` (cli/features_functional.py) shares these flags and this run
(simmerge_ray/pipeline/features.py). Outputs of each (model, probe set, settings) are cached
under DIR/probe_cache (or --cache), one file per finished batch, so an interrupted run resumes.
Actor resources default to the SIMMERGE_*_INFERENCE_ACTOR asks (simmerge_ray.resources) that the
jobs/ entry points export.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from simmerge_ray.cli.common import at_least_one

if TYPE_CHECKING:
    from simmerge_ray.pipeline.features import ProbeRequest


def add_probe_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that runs probe inference."""
    p.add_argument("--catalog", "--config", dest="catalog", required=True,
                   help="catalog YAML (each task's probes: .jsonl with a \"text\" field, .parquet or .txt, "
                        "one probe per line)")
    p.add_argument("--out", required=True, help="output folder (shareable with `features structural`)")
    p.add_argument("--cache", default=None, help="probe-output cache folder (default: OUT/probe_cache)")
    p.add_argument("--overwrite", action="store_true",
                   help="measure this run's probes again: its entries in --cache are discarded once the inputs are "
                        "checked (other entries stay)")
    p.add_argument("--tasks", nargs="+", default=None, help="only these tasks (default: all in the catalog)")
    p.add_argument("--backend", choices=("hf", "deepspeed"), default="hf",
                   help="hf: model in memory; deepspeed: ZeRO-3 inference with parameters offloaded")
    p.add_argument("--nvme-path", default=None, help="deepspeed: offload parameters to NVMe here")
    p.add_argument("--actors", type=at_least_one, default=None, help="actors per model (default: SIMMERGE_MAX_ACTORS or 1)")
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


def probe_request(args: argparse.Namespace) -> ProbeRequest:
    """The probe run the flags ask for; a flag's bad value is a one-line error naming it."""
    from pydantic import ValidationError

    from simmerge_ray.errors import ConfigError
    from simmerge_ray.inference.settings import ProbeSettings
    from simmerge_ray.pipeline.features import ProbeRequest, run_options

    try:
        settings = ProbeSettings(max_length=args.max_length, attn_max_length=args.attn_max_length,
                                 full_vocab_limit=args.full_vocab_limit, top_k=args.top_k, dtype=args.dtype)
        options = run_options(args.backend, args.actors, args.batch_size,
                              Path(args.nvme_path) if args.nvme_path else None)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "nvme_path"
        flag = {"num_actors": "--actors"}.get(field, "--" + field.replace("_", "-"))
        raise ConfigError(f"{flag}: {err['msg']}") from None
    return ProbeRequest(Path(args.catalog), Path(args.out), options, settings,
                        cache=Path(args.cache) if args.cache else None, overwrite=args.overwrite,
                        tasks=args.tasks, address=args.address)


def run_probe(args: argparse.Namespace) -> int:
    from simmerge_ray.pipeline.features import run_probes, summary_lines, write_manifest

    run = run_probes(probe_request(args))
    for line in summary_lines(run):
        print(line)
    print(f"wrote {write_manifest(run)}")
    return 0
