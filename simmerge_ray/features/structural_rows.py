"""The structural pass's rows: the catalog's checkpoints (models in order, then the base),
opened and checked to be comparable tensor by tensor before anything is read (no Ray, no math)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import CheckpointError, ConfigError
from simmerge_ray.io.architecture import check_same_model_type, check_same_tensors, differences, signature
from simmerge_ray.io.checkpoint import Checkpoint, merged_head
from simmerge_ray.io.safetensors_format import FLOAT_DTYPES, TensorEntry
from simmerge_ray.io.shared_vocab import SharedVocab, shared_vocab


@dataclass
class Rows:
    """The stacked rows of the pass: the models in catalog order, then the base."""

    names: list[str]
    ckpts: list[Checkpoint]
    n_models: int
    has_base: bool
    tensors: list[str]  # float tensors with at least one value, sorted
    vocab_rows: dict[str, int] = field(default_factory=dict)  # vocabulary tensor -> leading rows compared

    def numel(self, tensor: str) -> int:
        """Values compared per checkpoint (the leading ones of the stored tensor)."""
        return math.prod(self.shape(tensor))

    def shape(self, tensor: str) -> tuple[int, ...]:
        """The shape compared: a vocabulary tensor's shared rows (models of different vocabulary
        sizes), else the whole tensor."""
        shape = tuple(self.ckpts[0].stored_entry(tensor).shape)
        return (self.vocab_rows[tensor], *shape[1:]) if tensor in self.vocab_rows else shape

    def key(self, tensor: str) -> str:
        """The tensor's name in caches: with its row count when only shared rows are compared."""
        return f"{tensor}[:{self.vocab_rows[tensor]}]" if tensor in self.vocab_rows else tensor

    @property
    def ref(self) -> int:
        """Row the Gram is centred on: the base, else the first model."""
        return self.n_models if self.has_base else 0

    def entry(self, row: int, tensor: str) -> TensorEntry:
        return self.ckpts[row].stored_entry(tensor)


def open_rows(catalog: Catalog) -> Rows:
    """Open every checkpoint of the catalog and check they can be compared tensor by tensor."""
    where = catalog.source or "catalog"
    if len(catalog.models) < 2:
        raise ConfigError(f"{where}: structural features compare models pairwise and need at least 2 "
                          f"models; the catalog has {len(catalog.models)}")
    ckpts = [Checkpoint.open(m.path) for m in catalog.models]
    names = list(catalog.names)
    base = Checkpoint.open(catalog.base) if catalog.base is not None else None
    check_same_model_type([f"model {n!r}" for n in names] + (["the base"] if base is not None else []),
                          [*ckpts, *([base] if base is not None else [])])  # first: shapes may agree
    if base is not None:
        base_name = base.path.name if base.path.name not in names else f"{base.path.name}(base)"
        vocab = shared_vocab([*names, base_name], [*ckpts, base])
    else:
        vocab = shared_vocab(names, ckpts)
    check_same_tensors(names, ckpts, vocab)
    if base is not None:
        _check_base(names[0], ckpts[0], base, vocab)
        names.append(base_name)
        ckpts.append(base)
    first = ckpts[0]
    _ = first.num_layers  # a config.json num_hidden_layers that is not a count: refused now, not after the pass
    held = list(first.entries)
    if first.tied_head is not None and first.tied_head == merged_head(ckpts):
        held.append(first.tied_head)  # stored by another model: compared, as `merge` merges it
    tensors = sorted(n for n in held if (e := first.stored_entry(n)).dtype in FLOAT_DTYPES and e.numel > 0)
    if not tensors:
        raise CheckpointError(f"{first.path}: no floating-point tensors to compare")
    _check_float_alike(names, ckpts, held)
    vocab_rows = {t: vocab.rows for t in tensors if vocab is not None and vocab.is_vocab_tensor(
        0, t, first.stored_entry(t).shape)}
    return Rows(names, ckpts, len(catalog.models), base is not None, tensors, vocab_rows)


def _check_base(first_name: str, first: Checkpoint, base: Checkpoint, vocab: SharedVocab | None) -> None:
    """The base's tensors against the first model's (its model_type is checked with the models')."""
    diff = differences(signature(first, vocab, 0), signature(base, vocab, len(vocab.sizes) - 1 if vocab else 0))
    if diff:
        raise CheckpointError(f"base {base.path} does not match the models' architecture (compared with "
                              f"model {first_name!r} at {first.path}): " + "; ".join(diff))


def _check_float_alike(names: list[str], ckpts: list[Checkpoint], tensors: list[str]) -> None:
    """A tensor stored as floats in one checkpoint and as integers (or bools) in another: compared,
    its integers would be read as weights; skipped, the features would hang on catalog order."""
    first = ckpts[0]
    for t in tensors:
        ref = first.stored_entry(t).dtype
        for name, ck in zip(names[1:], ckpts[1:]):
            dtype = ck.stored_entry(t).dtype
            if (dtype in FLOAT_DTYPES) != (ref in FLOAT_DTYPES):
                raise CheckpointError(f"tensor {t!r} is {dtype} in {name!r} ({ck.stored_entry(t).file}) but {ref} in "
                                      f"{names[0]!r} ({first.stored_entry(t).file}): a float tensor is compared "
                                      f"only with float tensors")
