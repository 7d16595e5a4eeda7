"""Embedding and head rows re-indexed to a merged vocabulary (mergekit's tokenizer surgery).

When a config builds an output tokenizer, each model's vocabulary tensor is first laid out in
the output's token order: a token the model has keeps its own row; a token it lacks (or one a
`tokens:` entry forces) takes a row made once for every model: the only model that has it, else
the base's, else the mean of the models that have it, or what the entry names (a model's row
for that token or for another token, or zeros). Rows past the vocabulary (`pad_to_multiple_of`)
take the mean of the model's rows. The method then merges the re-indexed tensors as any other.
Plain data: it travels to the Ray workers with its tensor's task.
"""

from __future__ import annotations

from dataclasses import dataclass

from simmerge_ray.lazy_torch import torch

Key = tuple[str, str]  # (model ref, tensor name)


@dataclass(frozen=True)
class RowSource:
    """How a token's shared row is made: "average" of the models having it, a model's `row`
    ("row"), or "zero"."""

    kind: str
    model: str | None = None
    row: int | None = None


@dataclass(frozen=True)
class VocabRemap:
    """One vocabulary tensor's re-indexing: per model, its row for every output token (-1: none)."""

    rows: int  # output rows (the vocabulary, padded)
    vocab_len: int
    perms: dict[str, tuple[int, ...]]  # model ref -> row per output token id
    shared: dict[int, RowSource]  # output token id -> its row for models lacking it (or forced)
    forced: frozenset[int]

    def remap(self, loaded: dict[Key, torch.Tensor]) -> dict[Key, torch.Tensor]:
        """Every loaded tensor re-indexed to the output's rows, in its own dtype."""
        by_model = {key[0]: t for key, t in loaded.items()}
        made = {tid: self._shared_row(src, tid, by_model) for tid, src in self.shared.items()}
        return {key: self._one(t, self.perms[key[0]], made) for key, t in loaded.items()}

    def _shared_row(self, src: RowSource, tid: int, by_model: dict[str, torch.Tensor]) -> torch.Tensor:
        first = next(iter(by_model.values()))
        if src.kind == "zero":
            return first.new_zeros(first.shape[1:])
        if src.kind == "row":
            return by_model[src.model][src.row]
        acc, count = first.new_zeros(first.shape[1:]), 0  # summed in order, in the tensors' dtype
        for model, t in by_model.items():
            if self.perms[model][tid] >= 0:
                acc, count = acc + t[self.perms[model][tid]], count + 1
        return acc / count

    def _one(self, old: torch.Tensor, perm: tuple[int, ...], made: dict[int, torch.Tensor]) -> torch.Tensor:
        new = old.new_zeros((self.rows, *old.shape[1:]))
        idx = torch.tensor(perm, dtype=torch.long)
        own = idx >= 0
        if self.forced:
            own[list(self.forced)] = False
        new[: self.vocab_len][own] = old[idx[own]]
        for tid, row in made.items():
            if tid in self.forced or perm[tid] < 0:
                new[tid] = row
        if self.rows > self.vocab_len:
            new[self.vocab_len:] = new[: self.vocab_len].mean(dim=0)
        return new


def row_sources(perms: dict[str, tuple[int, ...]], models: list[str], base: str | None,
                explicit: dict[int, RowSource], forced: frozenset[int]) -> dict[int, RowSource]:
    """The shared row of every token some of `models` lack (or that is forced), as mergekit
    assigns them: an explicit `tokens:` source, else the one model that has it, else zeros when
    none has it, else the base's row, else the mean of the models that have it."""
    n = len(next(iter(perms.values())))
    out: dict[int, RowSource] = {}
    for tid in range(n):
        has = [m for m in models if perms[m][tid] >= 0]
        if len(has) == len(models) and tid not in forced:
            continue
        if tid in explicit:
            out[tid] = explicit[tid]
        elif len(has) == 1:
            out[tid] = RowSource("row", has[0], perms[has[0]][tid])
        elif not has:
            out[tid] = RowSource("zero")
        elif base in has:
            out[tid] = RowSource("row", base, perms[base][tid])
        else:
            out[tid] = RowSource("average")
    return out
