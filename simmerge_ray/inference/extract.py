"""From a padded batch's raw outputs to one record of tensors per probe (pure tensor math).

A record holds, for one probe of length T (T' = min(T, attn_max_length)):
  logp [T, V]                      next-token log-probs at every position (small vocabularies), or
  topk_idx/topk_logp [T, k], tail_logmass [T]   the compact form (large vocabularies);
  hidden [L, H]                    each block's output mean-pooled over the probe's real tokens;
  attn [L, T', T']                 each block's attention map averaged over heads. Causal, so the
                                   top-left T'xT' block is exactly the map of the first T' tokens.
"""

from __future__ import annotations

import torch

from simmerge_ray.inference.backend import ForwardOutputs
from simmerge_ray.inference.compact import compact_logprobs
from simmerge_ray.inference.settings import ProbeSettings


def pad_batch(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence; mask 1 on real tokens. Right padding keeps the
    default position ids of the real tokens equal to an unpadded run's."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def probe_records(out: ForwardOutputs, attention_mask: torch.Tensor,
                  settings: ProbeSettings) -> list[dict[str, torch.Tensor]]:
    """One record per batch row, cut to that row's real length, in float32 on the CPU."""
    lengths = attention_mask.sum(dim=1).tolist()
    vocab = out.logits.shape[-1]
    records = []
    for b, t in enumerate(lengths):
        logp = torch.log_softmax(out.logits[b, :t].float(), dim=-1).cpu()
        rec = {"logp": logp} if vocab <= settings.full_vocab_limit else compact_logprobs(logp, settings.top_k)
        rec["hidden"] = torch.stack([h[b, :t].float().mean(dim=0) for h in out.hidden_states]).cpu()
        ta = min(t, settings.attn_max_length)
        rec["attn"] = torch.stack([a[b, :, :ta, :ta].float().mean(dim=0) for a in out.attentions]).cpu()
        records.append({k: v.contiguous() for k, v in rec.items()})
    return records
