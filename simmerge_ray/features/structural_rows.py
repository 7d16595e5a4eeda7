"""The structural pass's rows: the catalog's checkpoints (models in order, then the base),
opened and checked to be comparable tensor by tensor before anything is read (no Ray, no math)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import CheckpointError, ConfigError
from simmerge_ray.io.checkpoint import Checkpoint, merged_head
from simmerge_ray.io.safetensors_format import FLOAT_DTYPES


@dataclass
class Rows:
    """The stacked rows of the pass: the models in catalog order, then the base."""

    names: list[str]
    ckpts: list[Checkpoint]
    n_models: int
    has_base: bool
    tensors: list[str]  # float tensors with at least one value, sorted

    @property
    def ref(self) -> int:
        """Row the Gram is centred on: the base, else the first model."""
        return self.n_models if self.has_base else 0

    def entry(self, row: int, tensor: str):
        return self.ckpts[row].stored_entry(tensor)


def open_rows(catalog: Catalog) -> Rows:
    """Open every checkpoint of the catalog and check they can be compared tensor by tensor."""
    where = catalog.source or "catalog"
    if len(catalog.models) < 2:
        raise ConfigError(f"{where}: structural features compare models pairwise and need at least 2 "
                          f"models; the catalog has {len(catalog.models)}")
    ckpts = [Checkpoint.open(m.path) for m in catalog.models]
    names = list(catalog.names)
    check_same_tensors(names, ckpts)
    if catalog.base is not None:
        base = Checkpoint.open(catalog.base)
        _check_base(names[0], ckpts[0], base)
        base_name = base.path.name if base.path.name not in names else f"{base.path.name}(base)"
        names.append(base_name)
        ckpts.append(base)
    first = ckpts[0]
    held = list(first.entries)
    if first.tied_head is not None and first.tied_head == merged_head(ckpts):
        held.append(first.tied_head)  # stored by another model: compared, as `merge` merges it
    tensors = sorted(n for n in held if (e := first.stored_entry(n)).dtype in FLOAT_DTYPES and e.numel > 0)
    if not tensors:
        raise CheckpointError(f"{first.path}: no floating-point tensors to compare")
    return Rows(names, ckpts, len(catalog.models), catalog.base is not None, tensors)


def _signature(ck: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes; the head a checkpoint ties to its embedding counts as held (read
    from the embedding, as mergekit's tied_names does)."""
    sig = {n: tuple(e.shape) for n, e in ck.entries.items()}
    return sig if ck.tied_head is None else {**sig, ck.tied_head: tuple(ck.stored_entry(ck.tied_head).shape)}


def _differences(ref: dict[str, tuple[int, ...]], other: dict[str, tuple[int, ...]]) -> list[str]:
    missing = sorted(ref.keys() - other.keys())
    extra = sorted(other.keys() - ref.keys())
    shapes = sorted(n for n in ref.keys() & other.keys() if ref[n] != other[n])

    def listed(items: list[str], fmt: Callable[[str], str]) -> str:
        more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
        return ", ".join(fmt(n) for n in items[:3]) + more

    out = []
    if missing:
        out.append(f"lacks {listed(missing, repr)}")
    if extra:
        out.append(f"has extra {listed(extra, repr)}")
    if shapes:
        out.append("shape " + listed(shapes, lambda n: f"of {n!r} is {list(other[n])} not {list(ref[n])}"))
    return out


def check_same_tensors(names: Sequence[str], ckpts: Sequence[Checkpoint]) -> None:
    ref = _signature(ckpts[0])
    problems = []
    for name, ck in zip(names[1:], ckpts[1:]):
        other = _signature(ck)
        diff = _differences(ref, other)
        if diff:
            heads = [n for n in ref.keys() ^ other.keys() if "lm_head" in n or "embed_out" in n]
            hint = " (a head tied to the embeddings on one side? config.json tie_word_embeddings)" if heads else ""
            problems.append(f"model {name!r} ({ck.path}): " + "; ".join(diff) + hint)
    if problems:
        raise CheckpointError(
            f"models do not share tensor names and shapes (compared with model {names[0]!r} at "
            f"{ckpts[0].path}): " + " | ".join(problems))


def _check_base(first_name: str, first: Checkpoint, base: Checkpoint) -> None:
    kinds = (first.config.get("model_type"), base.config.get("model_type"))
    if None not in kinds and kinds[0] != kinds[1]:
        raise CheckpointError(f"base {base.path} is a {kinds[1]!r} checkpoint but the models are "
                              f"{kinds[0]!r} (model {first_name!r} at {first.path})")
    diff = _differences(_signature(first), _signature(base))
    if diff:
        raise CheckpointError(f"base {base.path} does not match the models' architecture (compared with "
                              f"model {first_name!r} at {first.path}): " + "; ".join(diff))


