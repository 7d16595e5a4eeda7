"""Compact next-token distributions for large vocabularies: top-k log-probs plus tail mass.

Storing [T, V] float32 per probe is fine for small vocabularies and far too much for 256k ones.
The compact form keeps the k most likely tokens exactly and the log of the remaining mass;
`expand` spreads that tail uniformly over the other V-k tokens. The KL computed from expanded
forms differs from the exact KL; `benchmarks/bench_probe.py` measures by how much (docs/functional.md).
"""

from __future__ import annotations

import torch


def compact_logprobs(logp: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """[T, V] log-probs -> topk_idx [T,k] int32, topk_logp [T,k], tail_logmass [T]."""
    k = min(k, logp.shape[-1])
    top, idx = logp.topk(k, dim=-1)
    # The tail's own logsumexp (not log(1 - top mass)): exact, and finite unless it underflows.
    rest = logp.scatter(-1, idx, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1)
    return {"topk_idx": idx.to(torch.int32), "topk_logp": top, "tail_logmass": tail}


def expand_logprobs(topk_idx: torch.Tensor, topk_logp: torch.Tensor, tail_logmass: torch.Tensor,
                    vocab_size: int) -> torch.Tensor:
    """Back to [T, V] log-probs, the tail mass spread evenly over the tokens outside the top k."""
    t, k = topk_idx.shape
    rest = vocab_size - k
    if rest <= 0:
        out = torch.empty(t, vocab_size, dtype=torch.float32)
    else:
        # An empty tail (every other logit -inf) stays -inf: zero probability, which the
        # functional features refuse by name rather than turn into a huge finite KL.
        fill = tail_logmass.float() - torch.log(torch.tensor(float(rest)))
        out = fill[:, None].expand(t, vocab_size).clone()
    out.scatter_(1, topk_idx.long(), topk_logp.float())
    return out
