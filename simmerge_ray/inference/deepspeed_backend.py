"""The `deepspeed` back-end: ZeRO stage 3 inference (ZeRO-Inference).

Parameters are partitioned at load time (transformers' `HfDeepSpeedConfig` makes
`from_pretrained` build the model inside `deepspeed.zero.Init`) and offloaded to CPU memory, or
to NVMe when `nvme_path` is given; each block's parameters are gathered onto the compute device
only while that block runs. So a model larger than the device runs, one layer's weights at a
time. On a CPU-only host it runs on the CPU with the gloo process group; with CUDA, on the GPU
with NCCL. Each process (Ray actor) is its own single-rank world unless launched otherwise.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from simmerge_ray.errors import CheckpointError, ConfigError
from simmerge_ray.inference.backend import ForwardOutputs, load_config, pick_device, run_model


def zero_inference_config(dtype: torch.dtype, nvme_path: Path | None, *, pin_memory: bool) -> dict:
    """ZeRO-3 config with parameter offload; no optimizer (inference only)."""
    offload: dict = {"device": "nvme", "nvme_path": str(nvme_path)} if nvme_path else {"device": "cpu"}
    offload["pin_memory"] = pin_memory
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "offload_param": offload},
        "bf16": {"enabled": dtype == torch.bfloat16},
    }


def _init_single_rank(backend: str) -> None:
    """Start a one-rank process group (gloo on CPU, nccl on GPU) unless one already exists."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if os.environ.get("WORLD_SIZE") == "1":
        # DeepSpeed's CPU back-end JIT-compiles a shared-memory all-reduce op when it starts (1 to
        # 3 minutes on each fresh machine); one rank never reduces across processes, so skip it.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)


def _check_nvme(nvme_path: Path) -> None:
    """NVMe offload needs DeepSpeed's async_io op, which needs libaio: say so instead of crashing."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise ConfigError(f"--nvme-path {nvme_path}: NVMe offload needs DeepSpeed's async_io op, which "
                          f"cannot be built on this host (install libaio-dev), or offload to CPU instead")
    nvme_path.mkdir(parents=True, exist_ok=True)


class DeepSpeedBackend:
    name = "deepspeed"

    def __init__(self, model_dir: Path, dtype: torch.dtype, *, nvme_path: Path | None = None) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        load_config(model_dir)
        self.device = pick_device()
        _init_single_rank("nccl" if self.device.type == "cuda" else "gloo")
        if nvme_path is not None:
            _check_nvme(Path(nvme_path))
        config = zero_inference_config(dtype, nvme_path, pin_memory=self.device.type == "cuda")
        # Must stay alive while from_pretrained runs: it is how transformers sees ZeRO-3.
        self._hf_ds_config = HfDeepSpeedConfig(config)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype, attn_implementation="eager", local_files_only=True
            )
        except Exception as e:  # missing/corrupt weights surface as OSError/RuntimeError/ValueError
            raise CheckpointError(f"{model_dir}: cannot load model ({e})") from None
        engine, *_ = deepspeed.initialize(model=model, config_params=config)
        self.model = engine.module.eval()

    @torch.no_grad()  # not inference_mode: ZeRO-3 hooks gather parameters in place
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ForwardOutputs:
        return run_model(self.model, self.device, input_ids, attention_mask)
