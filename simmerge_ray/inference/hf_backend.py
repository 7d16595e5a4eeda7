"""The `hf` back-end: the whole transformers model in memory on one device."""

from __future__ import annotations

from pathlib import Path

import torch

from simmerge_ray.errors import CheckpointError
from simmerge_ray.inference.backend import ForwardOutputs, load_config, pick_device, run_model


class HFBackend:
    name = "hf"

    def __init__(self, model_dir: Path, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        load_config(model_dir)
        self.device = pick_device()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype, attn_implementation="eager", local_files_only=True
            )
        except Exception as e:  # missing/corrupt weights surface as OSError/RuntimeError/ValueError
            raise CheckpointError(f"{model_dir}: cannot load model ({e})") from None
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ForwardOutputs:
        return run_model(self.model, self.device, input_ids, attention_mask)
