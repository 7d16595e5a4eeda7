"""mergekit run in-process as the oracle, on configs naming models relative to a folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file

from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint


def make_zoo(root: Path, spec: SyntheticSpec, n: int = 3) -> Path:
    """base + n fine-tune-like variants m1..mn of `spec` under `root`."""
    make_checkpoint(root / "base", spec)
    for i in range(1, n + 1):
        make_checkpoint(root / f"m{i}", dataclasses.replace(spec, seed=i), base=root / "base", delta_std=0.01)
    return root


def run_mergekit(cfg: dict, root: Path, out: Path, *, copy_tokenizer: bool = False) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mk_run
    from mergekit.options import MergeOptions

    def absolutize(node):
        if isinstance(node, dict):
            return {k: (str(root / v) if k in ("model", "base_model", "tokenizer_source", "source")
                        and isinstance(v, str) and (root / v).is_dir() else absolutize(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [absolutize(v) for v in node]
        return node

    mk_run(MergeConfiguration.model_validate(absolutize(cfg)), str(out),
           MergeOptions(copy_tokenizer=copy_tokenizer, write_model_card=False, quiet=True))


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors
