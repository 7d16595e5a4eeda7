"""Build a fresh causal LM of any supported architecture from transformers' own config classes."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from simmerge_ray.testbed.zoo_config import ArchitectureConfig


def make_config(arch: ArchitectureConfig, vocab_size: int, eos_id: int, pad_id: int) -> PretrainedConfig:
    return AutoConfig.for_model(
        arch.type,
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        use_cache=False,
    )


def init_model(arch: ArchitectureConfig, vocab_size: int, eos_id: int, pad_id: int, seed: int) -> PreTrainedModel:
    """A randomly initialised float32 model; the seed fixes every initial weight."""
    torch.manual_seed(seed)
    config = make_config(arch, vocab_size, eos_id, pad_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model
