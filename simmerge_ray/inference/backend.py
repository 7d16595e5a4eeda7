"""One interface over the inference back-ends: a padded, masked batch in, raw outputs out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from simmerge_ray.errors import CheckpointError

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from transformers.utils import ModelOutput


@dataclass
class ForwardOutputs:
    """Logits [B,T,V], per-block hidden states L x [B,T,H], per-block attentions L x [B,heads,T,T]."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    attentions: tuple[torch.Tensor, ...]


class Backend(Protocol):
    name: str
    device: torch.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ForwardOutputs: ...


def pick_device() -> torch.device:
    """CUDA where present (lent GPU, cluster node), otherwise CPU. On CUDA, float32 matmuls are
    pinned to IEEE precision: with TF32 (which an environment can switch on, e.g. NVIDIA's
    containers) a probe's log-probs moved by up to 0.19 on an H200, and cached probe outputs
    must not depend on where they were computed."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    torch.set_float32_matmul_precision("highest")
    return torch.device("cuda", torch.cuda.current_device())


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_config(model_dir: Path) -> PretrainedConfig:
    """The model's transformers config, or a CheckpointError naming the folder."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # OSError, ValueError, JSON errors: all mean "this folder is not loadable"
        raise CheckpointError(f"{model_dir}: cannot load model config ({e})") from None


def split_outputs(out: ModelOutput) -> ForwardOutputs:
    """Keep the block outputs (drop the embedding output at index 0) and the attentions."""
    if out.attentions is None or any(a is None for a in out.attentions):
        raise CheckpointError("model returned no attention maps; it must support attn_implementation='eager'")
    return ForwardOutputs(out.logits, tuple(out.hidden_states[1:]), tuple(out.attentions))


def load_backend(name: str, model_dir: Path, *, dtype: str = "float32", nvme_path: Path | None = None) -> Backend:
    """Construct a back-end by name (`hf` or `deepspeed`)."""
    if name == "hf":
        from simmerge_ray.inference.hf_backend import HFBackend

        return HFBackend(Path(model_dir), torch_dtype(dtype))
    if name == "deepspeed":
        from simmerge_ray.inference.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(Path(model_dir), torch_dtype(dtype), nvme_path=nvme_path)
    raise ValueError(f"unknown inference backend {name!r} (hf, deepspeed)")


def run_model(model: torch.nn.Module, device: torch.device | str, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> ForwardOutputs:
    """One forward pass with every layer's hidden states and attention maps (callers choose
    the grad mode: ZeRO-3 needs no_grad, plain models can use inference_mode)."""
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        output_hidden_states=True,
        output_attentions=True,
        use_cache=False,
    )
    return split_outputs(out)
