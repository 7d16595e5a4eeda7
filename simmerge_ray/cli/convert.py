"""`simmerge convert SRC --out DIR --allow-pickle`: turn a pickle .bin checkpoint into safetensors."""

from __future__ import annotations

import argparse

from simmerge_ray.errors import SimMergeError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert a pytorch_model.bin checkpoint to safetensors",
                              epilog="example:\n  simmerge convert old-model/ --out old-model-st/ --allow-pickle")
    p.add_argument("src", help="checkpoint folder holding pytorch_model*.bin")
    p.add_argument("--out", required=True, help="output folder for the safetensors checkpoint (created)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="required: unpickling can run code, only convert files you trust")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that simmerge wrote")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Pickles are loaded with torch's restricted unpickler (tensors only), never as code."""
    from simmerge_ray.io.out_checks import check_output
    from simmerge_ray.io.pickle_state import open_pickle_checkpoint
    from simmerge_ray.io.synthetic import write_checkpoint

    if not args.allow_pickle:
        raise SimMergeError("convert reads pickle files, which can run code: pass --allow-pickle to confirm")
    check_output(args.out, overwrite=args.overwrite, inputs=[args.src])
    ck = open_pickle_checkpoint(args.src)
    items = [(e.name, e.shape, e.dtype, (lambda n=n: ck.read(n))) for n, e in ck.entries.items()]  # names as stored
    out = write_checkpoint(args.out, ck.config, items, 2 * 1024**3, overwrite=args.overwrite,
                           side_files_from=ck.path, inputs=[args.src])
    print(f"converted {len(items)} tensors -> {out}")
    return 0
