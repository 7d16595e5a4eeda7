"""Checks that checkpoints share one architecture: tensor names and shapes across models, and
a config.json against the weights beside it. No tensor values are read."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from simmerge_ray.errors import CheckpointError, first_line
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.shared_vocab import SharedVocab


def signature(ck: Checkpoint, vocab: SharedVocab | None = None, index: int = 0) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes compared (with `vocab`: a vocabulary tensor's shared rows, for
    checkpoint `index`); the head a checkpoint ties to its embedding counts as held (read from
    the embedding, as mergekit's tied_names does)."""
    sig = {n: tuple(e.shape) for n, e in ck.entries.items()}
    if ck.tied_head is not None:
        sig[ck.tied_head] = tuple(ck.stored_entry(ck.tied_head).shape)
    return sig if vocab is None else {n: vocab.shape(index, n, shape) for n, shape in sig.items()}


def differences(ref: dict[str, tuple[int, ...]], other: dict[str, tuple[int, ...]]) -> list[str]:
    """What `other` lacks, holds beyond and holds in another shape than `ref`, a few names each."""
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
    ref = signature(ckpts[0], vocab, 0)
    problems = []
    for index, (name, ck) in enumerate(zip(names[1:], ckpts[1:]), start=1):
        other = signature(ck, vocab, index)
        diff = differences(ref, other)
        if diff:
            heads = [n for n in ref.keys() ^ other.keys() if "lm_head" in n or "embed_out" in n]
            hint = " (a head tied to the embeddings on one side? config.json tie_word_embeddings)" if heads else ""
            problems.append(f"model {name!r} ({ck.path}): " + "; ".join(diff) + hint)
    if problems:
        raise CheckpointError(
            f"models do not share tensor names and shapes (compared with model {names[0]!r} at "
            f"{ckpts[0].path}): " + " | ".join(problems))


def check_same_model_type(names: Sequence[str], ckpts: Sequence[Checkpoint], consequence: str = "cannot be compared"
                          ) -> None:
    """Every checkpoint whose config.json names a `model_type` names the first such one's. Tensor
    names and shapes alone let a llama and a mistral of one size through (same names, same
    shapes), and only the base was compared with a model: two catalog models of different
    architectures were compared as one (`merge` merged them as one). A checkpoint without a
    model_type (a lone file) is not judged here. `consequence` ends the message: what is refused."""
    typed = [(n, ck, ck.config.get("model_type")) for n, ck in zip(names, ckpts) if ck.config.get("model_type")]
    if not typed:
        return
    first, first_ck, kind = typed[0]
    for name, ck, other in typed[1:]:
        if other != kind:
            raise CheckpointError(f"{name} ({ck.path}) is a {other!r} checkpoint but {first} ({first_ck.path}) is "
                                  f"{kind!r} (config.json model_type): checkpoints of different architectures "
                                  f"{consequence}")


def loaded_name(model: object) -> Callable[[str], str]:
    """Stored tensor name -> the name `model` (a transformers model) holds it under once loaded.
    transformers 5 renames some stored names as it loads them (GPT-NeoX's `embed_out.` is its
    `lm_head.`; old `LayerNorm.gamma`/`beta`), so a checkpoint it wrote itself does not hold its
    model's state-dict names. Only transformers 5's plain renamings are followed (with transformers
    4, whose GPT-NeoX holds `embed_out`, names are taken as stored; a checkpoint whose tensors
    transformers splits or fuses as it loads is reported as not matching)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightRenaming
    except ImportError:  # transformers 4
        return lambda name: name
    renamings = [t for t in get_model_conversion_mapping(model)
                 if isinstance(t, WeightRenaming) and not isinstance(t, PrefixChange)]

    def rename(name: str) -> str:
        for r in renamings:
            name, _ = r.rename_source_key(name)
        return name

    return rename


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
        raise CheckpointError(f"{cfg}: transformers cannot build a model from it ({first_line(e, limit=200)})") from None
    described = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    rename = loaded_name(model)
    stored = {rename(n): shape for n, shape in signature(ck).items()}
    diff = differences(described, {n: s for n, s in stored.items() if n in described} if allow_extra else stored)
    if diff:
        raise CheckpointError(f"{cfg}: does not match the weights beside it (against the model it describes, "
                              f"the weights: " + "; ".join(diff) + ")")
