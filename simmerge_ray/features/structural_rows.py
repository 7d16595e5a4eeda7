"""The structural pass's rows: the catalog's checkpoints (models in order, then the base),
opened and checked to be comparable tensor by tensor before anything is read (no Ray, no math)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math
from dataclasses import dataclass, field

from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import CheckpointError, ConfigError
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
    held = list(first.entries)
    if first.tied_head is not None and first.tied_head == merged_head(ckpts):
        held.append(first.tied_head)  # stored by another model: compared, as `merge` merges it
    tensors = sorted(n for n in held if (e := first.stored_entry(n)).dtype in FLOAT_DTYPES and e.numel > 0)
    if not tensors:
        raise CheckpointError(f"{first.path}: no floating-point tensors to compare")
    vocab_rows = {t: vocab.rows for t in tensors if vocab is not None and vocab.is_vocab_tensor(
        0, t, first.stored_entry(t).shape)}
    return Rows(names, ckpts, len(catalog.models), base is not None, tensors, vocab_rows)


def _signature(ck: Checkpoint, vocab: SharedVocab | None = None, index: int = 0) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes compared (with `vocab`: a vocabulary tensor's shared rows, for
    checkpoint `index`); the head a checkpoint ties to its embedding counts as held (read from
    the embedding, as mergekit's tied_names does)."""
    sig = {n: tuple(e.shape) for n, e in ck.entries.items()}
    if ck.tied_head is not None:
        sig[ck.tied_head] = tuple(ck.stored_entry(ck.tied_head).shape)
    return sig if vocab is None else {n: vocab.shape(index, n, shape) for n, shape in sig.items()}


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


def check_same_tensors(names: Sequence[str], ckpts: Sequence[Checkpoint], vocab: SharedVocab | None = None) -> None:
    """Every checkpoint holds the first one's tensors in the same shapes (with `vocab`, whose
    sizes are given in this order: vocabulary tensors compared on their shared rows)."""
    ref = _signature(ckpts[0], vocab, 0)
    problems = []
    for index, (name, ck) in enumerate(zip(names[1:], ckpts[1:]), start=1):
        other = _signature(ck, vocab, index)
        diff = _differences(ref, other)
        if diff:
            heads = [n for n in ref.keys() ^ other.keys() if "lm_head" in n or "embed_out" in n]
            hint = " (a head tied to the embeddings on one side? config.json tie_word_embeddings)" if heads else ""
            problems.append(f"model {name!r} ({ck.path}): " + "; ".join(diff) + hint)
    if problems:
        raise CheckpointError(
            f"models do not share tensor names and shapes (compared with model {names[0]!r} at "
            f"{ckpts[0].path}): " + " | ".join(problems))


def check_config_matches_weights(ck: Checkpoint, *, allow_extra: bool = False) -> None:
    """The model transformers builds from the folder's config.json holds exactly the stored
    tensors in their shapes (a tied head counts as its embedding), as a strict load_state_dict
    needs: a config edited apart from its weights (model_type dropped, another intermediate_size)
    is named here in one line, before any work, not in a traceback from inside a Ray actor. The
    model is built on the meta device: no memory, whatever its size. `allow_extra`: stored
    tensors the model does not hold are fine (transformers' from_pretrained skips them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = ck.path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{cfg}: not found (the model is built from it)")
    if not isinstance(ck.config.get("model_type"), str) or not ck.config["model_type"]:
        raise CheckpointError(f"{cfg}: model_type: missing or not a name (transformers needs it to know the architecture)")
    try:
        config = AutoConfig.from_pretrained(str(ck.path), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # any transformers failure here is the config's: say which file
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{cfg}: transformers cannot build a model from it ({first})") from None
    described = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    stored = _signature(ck)
    diff = _differences(described, {n: s for n, s in stored.items() if n in described} if allow_extra else stored)
    if diff:
        raise CheckpointError(f"{cfg}: does not match the weights beside it (against the model it describes, "
                              f"the weights: " + "; ".join(diff) + ")")


def _check_base(first_name: str, first: Checkpoint, base: Checkpoint, vocab: SharedVocab | None) -> None:
    kinds = (first.config.get("model_type"), base.config.get("model_type"))
    if None not in kinds and kinds[0] != kinds[1]:
        raise CheckpointError(f"base {base.path} is a {kinds[1]!r} checkpoint but the models are "
                              f"{kinds[0]!r} (model {first_name!r} at {first.path})")
    diff = _differences(_signature(first, vocab, 0), _signature(base, vocab, len(vocab.sizes) - 1 if vocab else 0))
    if diff:
        raise CheckpointError(f"base {base.path} does not match the models' architecture (compared with "
                              f"model {first_name!r} at {first.path}): " + "; ".join(diff))


