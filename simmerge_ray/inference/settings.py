"""What a probe run records (part of the cache key) and how it runs (not part of it)."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from simmerge_ray.io.digest_cache import json_digest

BackendName = Literal["hf", "deepspeed"]
# Bumped whenever what a probe run records changes (extract.py, the backends): the cache key holds
# it with the library versions that compute the records, so an upgrade measures again.
PROBE_CACHE_VERSION = "probe-v1"


class ProbeSettings(BaseModel):
    """Settings that change the recorded outputs; their digest is part of every cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_length: int = Field(128, ge=1, description="probes are truncated to this many tokens")
    attn_max_length: int = Field(64, ge=1, description="attention maps cover the first this-many tokens")
    full_vocab_limit: int = Field(8192, ge=1, description="store whole next-token distributions up to this vocab")
    top_k: int = Field(256, ge=1, description="compact form above the limit: top-k log-probs plus tail mass")
    dtype: Literal["float32", "bfloat16"] = "float32"


class RunOptions(BaseModel):
    """How to run: back-end, actor pool, batch size. Outputs do not depend on these (to 1e-4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    backend: BackendName = "hf"
    num_actors: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    memory_per_actor: int | None = Field(None, gt=0, description="bytes reserved per actor (scheduling)")
    nvme_path: Path | None = Field(None, description="deepspeed: offload parameters to NVMe here, not CPU")
    fail_after_batches: int | None = Field(
        None, ge=0, description="testing resumability: each actor raises before its batch number k+1"
    )

    @model_validator(mode="after")
    def _nvme_needs_deepspeed(self) -> "RunOptions":
        if self.nvme_path is not None and self.backend != "deepspeed":
            raise ValueError("nvme_path only applies to the deepspeed backend")
        return self


def cache_key(model_fingerprint: str, probe_digest: str, settings: ProbeSettings) -> str:
    """Folder name of one (model, probe set, settings, code and library versions) output cache."""
    code = [PROBE_CACHE_VERSION, version("torch"), version("transformers")]
    return json_digest([model_fingerprint, probe_digest, settings.model_dump(), code], size=12)
