"""Synthetic checkpoints of real transformers architectures, for tests and benchmarks.

Tensor names and shapes come from the architecture's own transformers classes (instantiated on
the meta device, so a 100B-shaped model costs nothing); values come from a seeded generator per
tensor, so any tensor can be regenerated alone and the same seed gives the same bytes. EXAONE 3
(`exaone`), which transformers loads through llama's classes, is stored under its own checkpoint
names (`transformer.h.N.attn.attention.q_proj`, ...), as its published checkpoints are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from simmerge_ray.io.digest_cache import name_seed
from simmerge_ray.io.atomic import atomic_output_dir
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.checkpoint_files import INDEX_FILE, SINGLE_FILE
from simmerge_ray.io.side_files import copy_side_files
from simmerge_ray.io.safetensors_format import DTYPE_BYTES, DTYPE_TO_TORCH, StreamingWriter, dtype_code

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt_neox", "cohere2", "exaone")

# Architectures whose checkpoints transformers renames onto another's modules on load: the
# donor's model class, and its names rewritten to the checkpoint's (in order).
STORED_NAMES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "exaone": ("LlamaForCausalLM", (
        (r"^model\.embed_tokens\.", "transformer.wte."), (r"^model\.layers\.", "transformer.h."),
        (r"^model\.norm\.", "transformer.ln_f."), (r"\.self_attn\.o_proj\.", ".attn.attention.out_proj."),
        (r"\.self_attn\.", ".attn.attention."), (r"\.input_layernorm\.", ".ln_1."),
        (r"\.post_attention_layernorm\.", ".ln_2."), (r"\.mlp\.gate_proj\.", ".mlp.c_fc_0."),
        (r"\.mlp\.up_proj\.", ".mlp.c_fc_1."), (r"\.mlp\.down_proj\.", ".mlp.c_proj."),
    )),
}


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate: an architecture at a size, a seed, a storage dtype and a shard size."""

    architecture: str = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int = 256
    tie_word_embeddings: bool = False
    seed: int = 0
    dtype: str = "bfloat16"
    max_shard_bytes: int = 2 * 1024**3
    init_std: float = 0.02


def make_config(spec: SyntheticSpec) -> PretrainedConfig:
    """A transformers config object for the spec's architecture and size."""
    from transformers import AutoConfig

    if spec.architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {spec.architecture!r} not in {ARCHITECTURES}")
    inter = spec.intermediate_size or 4 * spec.hidden_size
    kw: dict = dict(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=inter,
        vocab_size=spec.vocab_size,
        tie_word_embeddings=spec.tie_word_embeddings,
        max_position_embeddings=512,
    )
    if spec.architecture != "gpt_neox":
        kw["num_key_value_heads"] = spec.num_kv_heads or spec.num_heads
    if spec.architecture == "cohere2":
        kw["sliding_window"] = 64
    if spec.architecture == "exaone":  # its default eos id (361) is past a small vocabulary
        kw["eos_token_id"] = spec.vocab_size - 1
    cfg = AutoConfig.for_model(spec.architecture, **kw)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg.architectures = ["ExaoneForCausalLM" if spec.architecture == "exaone"
                         else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[spec.architecture]]
    cfg.torch_dtype = DTYPE_TO_TORCH[dtype_code(spec.dtype)]
    return cfg


def tensor_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a checkpoint of this config stores (tied ones once)."""
    import transformers

    donor, renames = STORED_NAMES.get(config.model_type, (None, ()))
    with torch.device("meta"):
        model = (getattr(transformers, donor)(config) if donor
                 else transformers.AutoModelForCausalLM.from_config(config))
    return {_stored_name(name, renames): tuple(p.shape) for name, p in model.named_parameters()}


def _stored_name(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in renames:
        name = re.sub(pattern, replacement, name)
    return name


def _add_base_chunks(base: Checkpoint, name: str, deltas: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    start = 0
    for d in deltas:
        yield base.read_range(name, start, d.numel()).to(torch.float32) + d
        start += d.numel()


CHUNK = 16 * 1024**2  # elements generated at a time for tensors larger than this


def random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float,
                  *, norms_at_one: bool = True) -> torch.Tensor | Iterator[torch.Tensor]:
    """The float32 values of one synthetic tensor (norm weights near 1 unless told otherwise).

    Tensors above CHUNK elements come as an iterator of flat chunks, each from its own seed,
    so a 3-billion-element embedding is generated without ever being whole in memory.
    """
    numel = int(torch.Size(shape).numel())
    offset = 1.0 if norms_at_one and "norm" in name and len(shape) == 1 and name.endswith("weight") else 0.0
    if numel <= CHUNK:
        g = torch.Generator().manual_seed(name_seed(seed, name))
        return torch.randn(shape, generator=g) * std + offset

    def chunks() -> Iterator[torch.Tensor]:
        for i, start in enumerate(range(0, numel, CHUNK)):
            g = torch.Generator().manual_seed(name_seed(seed, f"{name}#{i}"))
            yield torch.randn(min(CHUNK, numel - start), generator=g) * std + offset
    return chunks()


def write_checkpoint(out: Path, config: PretrainedConfig | dict, tensors: Iterable[tuple[str, Sequence[int], str | torch.dtype, Callable[[], torch.Tensor]]], max_shard_bytes: int, *, overwrite: bool = False,
                     side_files_from: Path | None = None, inputs: Sequence[Path] = ()) -> Path:
    """Write tensors as a (sharded) HF folder; `tensors` yields (name, shape, dtype, producer).

    `producer()` is called for one tensor at a time, right before it is written, so memory
    stays at one tensor. `config` is a transformers config (saved as config.json) or a dict.
    """
    items = [(name, tuple(shape), dtype_code(dtype), producer) for name, shape, dtype, producer in tensors]
    shards: list[list] = [[]]
    size = 0
    for item in items:
        nbytes = DTYPE_BYTES[item[2]] * int(torch.Size(item[1]).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    with atomic_output_dir(Path(out), overwrite=overwrite, inputs=inputs) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(shards):
            fname = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            w = StreamingWriter(tmp / fname, [(n, s, c) for n, s, c, _ in shard])
            for name, _, code, producer in shard:
                made = producer()
                # a producer returns the tensor, or an iterator of flat chunks for huge ones
                for part in ([made] if isinstance(made, torch.Tensor) else made):
                    part = part.to(DTYPE_TO_TORCH[code])
                    w.write_part(name, part)
                    total += part.numel() * part.element_size()
                weight_map[name] = fname
            w.close()
        if len(shards) > 1:
            (tmp / INDEX_FILE).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        if isinstance(config, dict):
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        else:
            config.save_pretrained(tmp)
        if side_files_from is not None:
            copy_side_files(Path(side_files_from), tmp)
    return Path(out)


def make_checkpoint(out: Path, spec: SyntheticSpec, *, base: Path | None = None,
                    delta_std: float = 0.0, overwrite: bool = False) -> Path:
    """Generate a checkpoint; with `base`, values are base + seeded noise of `delta_std`
    (a fine-tune-like variant that shares the base's direction, as real experts do)."""
    config = make_config(spec)
    shapes = tensor_shapes(config)
    base_ckpt = Checkpoint.open(base) if base is not None else None

    def producer(name: str, shape: tuple[int, ...]):
        def make() -> torch.Tensor | Iterator[torch.Tensor]:
            if base_ckpt is None:
                return random_tensor(name, shape, spec.seed, spec.init_std)
            delta = random_tensor(name, shape, spec.seed, delta_std, norms_at_one=False)
            if isinstance(delta, torch.Tensor):
                return base_ckpt.read_f32(name) + delta
            return _add_base_chunks(base_ckpt, name, delta)
        return make

    items = [(n, s, spec.dtype, producer(n, s)) for n, s in shapes.items()]
    return write_checkpoint(out, config, items, spec.max_shard_bytes, overwrite=overwrite)


def make_family(root: Path, spec: SyntheticSpec, n: int = 2, delta_std: float = 0.02) -> Path:
    """`root/base` and `n` fine-tune-like models `root/m1..mn` (seeds 1..n) around it: the
    smallest catalog a merge needs."""
    root = Path(root)
    make_checkpoint(root / "base", spec)
    for i in range(1, n + 1):
        make_checkpoint(root / f"m{i}", replace(spec, seed=i), base=root / "base", delta_std=delta_std)
    return root
