"""The per-domain scores: greedy answer-token accuracy (what labels are computed on by default,
as the paper scores tasks) and, beside it, the smooth likelihood score.

accuracy = the mean over examples of the share of an example's answer tokens the model predicts
greedily (teacher-forced); score = exp(mean over examples of the mean log-probability of the
answer's tokens), i.e. the geometric-mean probability per answer token, in (0, 1]. The score is
smooth, so it separates experts from the base long before a tiny model answers exactly right,
and positive, so ratios such as expert retention (s_merge / s_expert - 1) read the right way
round; `simmerge label --metric score` computes the labels on it. Texts are tokenised whole (as
in training) and the answer's tokens are those that end past the prompt, so the scores read
exactly the tokenisation the model was trained on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from simmerge_ray.errors import ConfigError
from simmerge_ray.testbed.domains.base import Example

# Tokens kept of each eval example (its end: the answer), alike in the zoo's scores and the labels,
# so that an expert's score in the score matrix is the one its merges are judged against.
EVAL_MAX_LEN = 192


@dataclass(frozen=True)
class EncodedEvalSet:
    """An eval set tokenised once, reused for every model scored on it."""

    input_ids: torch.Tensor  # [n, L] right-padded
    attention_mask: torch.Tensor  # [n, L]
    target_mask: torch.Tensor  # [n, L]: True where position j predicts an answer token at j+1


def load_examples(path: Path) -> list[Example]:
    """An eval set (JSON lines of prompt and answer); blank lines are skipped, as in probe files
    and request tables (an editor's trailing newline was "line N: expected a JSON object")."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(Example(row["prompt"], row["answer"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}: line {i + 1}: expected a JSON object with 'prompt' and 'answer'") from None
    if not out:
        raise ConfigError(f"{path}: empty eval set")
    return out


def encode(examples: list[Example], tokenizer: PreTrainedTokenizerFast, max_len: int) -> EncodedEvalSet:
    """Tokenise prompt+answer; keep the last `max_len` tokens (the answer is at the end)."""
    enc = tokenizer([e.text for e in examples], add_special_tokens=False, return_offsets_mapping=True)
    rows: list[tuple[list[int], list[bool]]] = []
    for ex, ids, offsets in zip(examples, enc["input_ids"], enc["offset_mapping"]):
        is_answer = [end > len(ex.prompt) for _, end in offsets]
        if not any(is_answer) or is_answer[0]:
            raise ConfigError(f"eval example with prompt {ex.prompt[-40:]!r}: no prompt or answer tokens")
        rows.append((ids[-max_len:], is_answer[-max_len:]))
    width = max(len(ids) for ids, _ in rows)
    n = len(rows)
    # Padding sits past every row's last token and outside its attention mask, so its id changes no
    # score; a tokenizer without a pad token (Llama's and Mistral's ship none) pads with id 0.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    target = torch.zeros((n, width), dtype=torch.bool)
    for i, (ids, ans) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        target[i, : len(ids) - 1] = torch.tensor(ans[1:])
    return EncodedEvalSet(input_ids, attention, target)


@torch.no_grad()
def example_scores(model: PreTrainedModel, data: EncodedEvalSet, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example (float64, [n]): the mean answer-token log-prob and the share of answer tokens
    predicted greedily; kept apart so that eval-set noise can be resampled (bootstrap).

    Rows are batched in length order (less padding) and the output head runs on the answer
    positions only (an eighth of a small model's cost when it ran on every position).
    """
    model.eval()
    head = model.get_output_embeddings()
    lengths = data.attention_mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    n = data.input_ids.shape[0]
    logliks = torch.zeros(n, dtype=torch.float64)
    hits = torch.zeros(n, dtype=torch.float64)
    for s in range(0, n, batch_size):
        rows = order[s:s + batch_size]
        width = int(lengths[rows].max())
        ids = data.input_ids[rows, :width]
        mask = data.target_mask[rows, : width - 1]
        hidden = model.base_model(input_ids=ids, attention_mask=data.attention_mask[rows, :width]).last_hidden_state
        picked = head(hidden[:, :-1][mask]).double()  # [answer tokens, vocab]
        nxt = ids[:, 1:][mask]
        tok_lp = torch.log_softmax(picked, dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        row_of = torch.arange(len(rows)).unsqueeze(1).expand_as(mask)[mask]
        count = mask.sum(1).double()
        logliks[rows] = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row_of, tok_lp) / count
        hit = (picked.argmax(-1) == nxt).double()
        hits[rows] = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row_of, hit) / count
    return logliks, hits


def score(model: PreTrainedModel, data: EncodedEvalSet, batch_size: int = 16) -> dict[str, float]:
    """{'score': exp(loglik), 'loglik': mean answer-token log-prob, 'accuracy': greedy hits}."""
    logliks, hits = example_scores(model, data, batch_size)
    loglik = float(logliks.mean())
    return {"score": math.exp(loglik), "loglik": loglik, "accuracy": float(hits.mean())}
