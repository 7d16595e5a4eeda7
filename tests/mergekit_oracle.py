"""mergekit run in-process as the oracle, on configs naming models relative to a folder."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _ties_in_index_order():
    """mergekit's magnitude and breadcrumbs sparsification with ties kept in index order.

    mergekit ranks |delta| with torch.argsort / torch.sort, whose order among equal values is
    unspecified (it differs between sizes, CPU and GPU); our linear-time selection keeps ties in
    index order, as a stable sort does. The oracle is pinned to that order so results compare
    element for element; everything else is mergekit's own code.
    """
    import mergekit.sparsify as mk_sparsify

    original, original_outliers = mk_sparsify.magnitude, mk_sparsify.magnitude_outliers

    def magnitude(tensor: torch.Tensor, density: float, rescale_norm=None) -> torch.Tensor:
        if density >= 1 or density <= 0 or tensor.numel() == 0:
            return original(tensor, density, rescale_norm)
        k = max(1, int(density * tensor.numel()))
        keep = torch.sort(tensor.abs().reshape(-1).float(), descending=True, stable=True).indices[:k]
        mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
        mask[keep] = 1
        return mk_sparsify.rescaled_masked_tensor(tensor, mask.reshape_as(tensor), rescale_norm)

    def magnitude_outliers(tensor: torch.Tensor, density: float, rescale_norm=None, gamma: float = 0.01):
        if density >= 1:
            return original_outliers(tensor, density, rescale_norm, gamma)
        n, keep = tensor.numel(), int(density * tensor.numel())
        n_bot = max(0, n - keep - int(gamma * n))
        order = torch.sort(tensor.abs().reshape(-1).float(), stable=True).indices[n_bot:n_bot + keep]
        mask = torch.zeros(n, dtype=tensor.dtype)
        mask[order] = 1
        return mk_sparsify.rescaled_masked_tensor(tensor, mask.reshape_as(tensor), rescale_norm)

    mk_sparsify.magnitude, mk_sparsify.magnitude_outliers = magnitude, magnitude_outliers
    try:
        yield
    finally:
        mk_sparsify.magnitude, mk_sparsify.magnitude_outliers = original, original_outliers


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

    with _ties_in_index_order():
        mk_run(MergeConfiguration.model_validate(absolutize(cfg)), str(out),
               MergeOptions(copy_tokenizer=copy_tokenizer, write_model_card=False, quiet=True))


def run_mergekit_multi(config_file: Path, out: Path, intermediates: Path) -> None:
    """mergekit-multi (mergekit's multimerge command) in-process on a multi-document config whose
    models are absolute paths (mergekit reads relative ones from the current folder)."""
    from mergekit.scripts.multimerge import main

    with _ties_in_index_order():
        main.main([str(config_file), "--out-path", str(out), "-I", str(intermediates), "--no-lazy",
                   "--no-copy-tokenizer", "--no-write-model-card", "--quiet"], standalone_mode=False)


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns as integers in the order of the values (+0 and -0 equal)."""
    bits = {2: torch.int16, 4: torch.int32}[x.element_size()]
    i = x.view(bits).long()
    return torch.where(i < 0, -(i & (2 ** (8 * x.element_size() - 1) - 1)), i)


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between a and b (one float dtype) in units in the last place: 0 when
    the values are equal, 1 when the farthest pair are neighbouring values of the dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    return int((_ordered(a) - _ordered(b)).abs().max()) if a.numel() else 0

