"""Training: pack text into token blocks, then run a seeded AdamW loop (base pretraining and experts).

Pure computation: no files, no Ray. Determinism comes from seeded data streams, seeded init and
a single intra-op thread (set by the caller).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from simmerge_ray.testbed.lora import add_lora, merge_lora
from simmerge_ray.testbed.zoo_config import LoraConfig, TrainConfig


def pack_blocks(texts: Iterator[str], tokenizer: PreTrainedTokenizerFast, seq_len: int, n_blocks: int) -> torch.Tensor:
    """Concatenate tokenised documents (each ended by EOS) and cut them into [n_blocks, seq_len]."""
    need = n_blocks * seq_len
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    while len(ids) < need:
        batch = list(itertools.islice(texts, 64))
        if not batch:
            raise ValueError("text stream ended before the training budget was filled")
        for enc in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
            ids.append(eos)
    return torch.tensor(ids[:need], dtype=torch.long).view(n_blocks, seq_len)


def mixed_texts(streams: list[Iterator[str]], weights: list[float], seed: int) -> Iterator[str]:
    """Draw documents from several streams with the given probabilities (seeded)."""
    rng = random.Random(f"mix|{seed}")
    while True:
        yield next(rng.choices(streams, weights=weights)[0])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_lm(model: PreTrainedModel, blocks: torch.Tensor, cfg: TrainConfig, lora: LoraConfig | None = None) -> list[float]:
    """Train in place on `blocks` (steps x batch_size rows), LoRA merged back if given; returns losses."""
    torch.manual_seed(cfg.seed)
    params = add_lora(model, lora.rank, lora.alpha, cfg.seed, head=lora.head) if lora else list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses: list[float] = []
    for step in range(cfg.steps):
        batch = blocks[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if lora:
        merge_lora(model)
    model.eval()
    return losses
