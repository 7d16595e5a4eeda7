"""Which module group a tensor belongs to, and which relative-depth third its layer falls in.

Features are summarised per group and per depth third (never per layer index) so that the
feature vector has the same width for a 2-layer test model and a 64-layer production one.
"""

from __future__ import annotations

import re

GROUPS: tuple[str, ...] = ("attn", "mlp", "embed", "norm")
OTHER = "other"
THIRDS: tuple[int, ...] = (0, 1, 2)

# Checked in order: a layer norm inside an attention block (q_norm) is a norm, not attention.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("norm", re.compile(r"(^|[._])(\w*norm\w*|ln_\w+|ln\d*)\.(weight|bias)$")),
    ("embed", re.compile(r"(embed|wte\b|wpe\b|lm_head|embed_out|word_embeddings|^output\.weight$|\.shared\.)")),
    ("attn", re.compile(r"(attn|attention|[._](q|k|v|o|qkv)_proj[._]|query_key_value|c_attn)")),
    ("mlp", re.compile(r"(mlp|feed_forward|ffn|(gate|up|down)_proj|dense_h_to_4h|dense_4h_to_h|"
                       r"[._]fc\d*[._]|[._]w[123][._]|experts)")),
)


# Tensors outside the blocks with one row per token: input embeddings and output heads (with their
# biases), as mergekit's architecture files declare them (`vocabulary_axis`; tested against all of
# them): a `tokenizer:` merge re-indexes their rows, and models of different vocabulary sizes are
# compared on the rows they share.
_VOCABULARY = re.compile(r"(^|\.)(embed_tokens|tok_embeddings|tokens_embed|word_embeddings?|wte|embed_in|embed_out|"
                         r"output_layer|vocab_projector|shared|embeddings)\.(weight|bias)$|"
                         r"(^|\.)predictions\.(decoder\.weight|bias)$|(^|[._])lm_head\.((decoder|linear)\.)?(weight|bias)$|"
                         r"^output\.weight$")


def is_vocabulary_name(tensor_name: str) -> bool:
    """Whether a tensor is named as an embedding or head over the vocabulary (its rows decide)."""
    return _VOCABULARY.search(tensor_name) is not None


def module_group(tensor_name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'attn'; unknown modules -> 'other'."""
    for group, pattern in _PATTERNS:
        if pattern.search(tensor_name):
            return group
    return OTHER


def depth_third(layer: int, num_layers: int) -> int:
    """Relative-depth third (0, 1, 2) of a block, judged by the block's centre.

    Using the centre ((layer + 0.5) / num_layers) keeps the split symmetric: in a 3-layer model
    each third holds one block, in a 2-layer model the middle third is empty.
    """
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} outside a model of {num_layers} layers")
    return min(2, int(3 * (layer + 0.5) / num_layers))
