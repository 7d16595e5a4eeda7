"""A minimal LoRA: low-rank adapters on the linear layers of the blocks, merged back after training.

Written here (a few lines) so that the adapter initialisation and the merge are fully seeded and
the merged expert is an ordinary checkpoint whose task vector has rank <= r per matrix.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from simmerge_ray.io.checkpoint import layer_index


class LoRALinear(nn.Module):
    """y = x W^T (+ b) + (alpha/r) x A^T B^T, with W frozen and B starting at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(base.in_features)
        a = (torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        return self.base


def add_lora(model: nn.Module, rank: int, alpha: float, seed: int, *, head: bool = False) -> list[nn.Parameter]:
    """Freeze the model, wrap every linear layer inside a transformer block (and the output head
    if `head`); return the trainable adapter parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    trainable: list[nn.Parameter] = []
    for name, module in sorted(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}."
            in_scope = layer_index(full) is not None or (head and not name and child_name == "lm_head")
            if isinstance(child, nn.Linear) and in_scope:
                wrapped = LoRALinear(child, rank, alpha, gen)
                setattr(module, child_name, wrapped)
                trainable += [wrapped.lora_a, wrapped.lora_b]
    return trainable


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight and restore plain linear layers."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
