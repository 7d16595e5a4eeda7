"""The zoo config (YAML), validated at the edge: architecture, tokenizer, base budget, experts.

Every seed sits under a key named `seed`; the same config and seeds give byte-identical
checkpoints (runtime settings such as the number of workers do not change any weight).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from simmerge_ray.io.digest_cache import json_digest
from simmerge_ray.errors import ConfigError
from simmerge_ray.yaml_io import check_name, read_yaml
from simmerge_ray.testbed.domains import DOMAINS
from simmerge_ray.testbed.domains.base import BUCKETS as SUBSET_BUCKETS


# Pydantic's lax mode reads `steps: true` as 1, `2.0` or "8" as an int, `head: 1` as True: a typo
# would train another zoo without a word. Numbers and flags take their own YAML type only (an int
# is still a float; the tuple of `subset` still comes from a YAML list, only its items are strict).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
# A seed that reaches torch.manual_seed (the model's initial weights, a fine-tune's batches): torch
# takes [-2**63, 2**64); one past it failed in a Ray task, after the base's pretraining.
TorchSeed = Annotated[int, Strict(), Field(ge=-(2**63), lt=2**64)]
# Tokens one training stage packs (steps x batch_size x seq_len): pack_blocks holds them all, as a
# Python list then an int64 tensor (about 45 GiB at this bound; the large zoo's biggest stage packs
# 5M). `steps: 1e12` was accepted, and hung after every other model had trained.
MAX_STAGE_TOKENS = 2**30
# Held-out examples (and probe prompts) per domain, 40x the shipped 256. A generated domain draws
# distinct items until it has enough: math has some 15,000 per split (10,000 take 4 s), and past
# its supply the draw never ends: 20,000 hung the build, Ray started, in silence.
MAX_HELD_OUT = 10_000
# Accuracy's standard error is at most sqrt(0.25 / n): 0.031 at 256 (the shipped zoos'), the
# 0.03 the labels' gap threshold (two standard errors, docs/testbed.md) is set for. Fewer is
# allowed (the tiny test zoo uses 24) but said.
MIN_EVAL_EXAMPLES = 256


def worst_accuracy_error(n: int) -> float:
    """The largest standard error an accuracy over `n` examples can have (at accuracy 0.5)."""
    return (0.25 / n) ** 0.5


class _FieldError(ValueError):
    """A whole-config check's error that belongs to one field: ZooConfig.load names `path` (not
    `config`, pydantic's location of a model validator)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchitectureConfig(_Strict):
    type: Literal["llama", "qwen2", "mistral", "gpt_neox"] = "llama"
    hidden_size: Int = Field(64, gt=0)
    num_layers: Int = Field(4, gt=0)
    num_heads: Int = Field(4, gt=0)
    intermediate_size: Int = Field(192, gt=0)
    max_position_embeddings: Int = Field(256, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ArchitectureConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        return self


class TokenizerConfig(_Strict):
    vocab_size: Int = Field(1024, ge=300)
    sample_chars: Int = Field(150_000, gt=0, description="characters sampled from each source to train BPE")
    seed: Int = 0


class DataConfig(_Strict):
    seq_len: Int = Field(128, gt=8)
    eval_examples: Int = Field(64, gt=0, le=MAX_HELD_OUT)
    probe_prompts: Int = Field(32, gt=0, le=MAX_HELD_OUT)
    seed: Int = 0


class TrainConfig(_Strict):
    steps: Int = Field(gt=0)
    lr: Float = Field(gt=0, allow_inf_nan=False)
    batch_size: Int = Field(16, gt=0)
    warmup_steps: Int = Field(10, ge=0)
    seed: TorchSeed = 0


class PretrainConfig(TrainConfig):
    """Pretraining on the general mixture; it runs alone, so it may use several intra-op threads
    (part of what shapes the weights: the same thread count gives the same bytes)."""

    domain_share: Float = Field(0.15, ge=0, le=1, description="share of documents drawn from the domains")
    threads: Int = Field(1, ge=1, le=64)


class BaseConfig(PretrainConfig):
    """The base model's pretraining from random weights."""


class ContinuedConfig(PretrainConfig):
    """A continued-pretraining checkpoint: the catalog's base (after the skills stage, where there
    is one) trained further on the pretraining mixture with a larger domain share. Experts may
    start from it instead of the base (as teams fine-tune from mid-training checkpoints); the
    catalog's base stays the original, so their task vectors share the continued-pretraining
    move."""

    domain_share: Float = Field(0.5, ge=0, le=1)


class SkillsConfig(PretrainConfig):
    """The skills stage: the pretrained base trained further on every domain's items rewritten in
    another surface form (domains/rewrites.py), `domain_share` of documents, the rest general
    text. Its result is the catalog's base: a model that knows the skills but not the eval
    format, so that experts are small moves, as supervised fine-tunes of a real LLM are."""

    domain_share: Float = Field(1.0, ge=0, le=1, description="share of rewritten domain documents")


class LoraConfig(_Strict):
    rank: Int = Field(8, gt=0)
    alpha: Float = Field(16.0, gt=0, allow_inf_nan=False)
    head: Bool = Field(False, description="also adapt the output head (lm_head), not only the blocks")


class VariantConfig(TrainConfig):
    name: str
    subset: tuple[Int, Int] | None = Field(None, description="(index, of): train on one hash bucket of the data")
    lora: LoraConfig | None = None
    start: Literal["base", "continued"] = Field("base", description="checkpoint the fine-tune starts from")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return check_name(v)

    @field_validator("subset")
    @classmethod
    def _subset_ok(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (0 < v[1] <= SUBSET_BUCKETS and 0 <= v[0] < v[1]):
            raise ValueError(f"subset is (index, of) with 0 <= index < of <= {SUBSET_BUCKETS} (items fall in "
                             f"{SUBSET_BUCKETS} hash buckets, dealt out by bucket modulo `of`)")
        return v


class DomainConfig(_Strict):
    variants: list[VariantConfig] = Field(min_length=1)


class RuntimeConfig(_Strict):
    """How the build runs; nothing here changes a weight."""

    workers: Int = Field(2, gt=0)


class ZooConfig(_Strict):
    seed: TorchSeed = 0
    architecture: ArchitectureConfig = ArchitectureConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    base: BaseConfig
    skills: SkillsConfig | None = None
    continued: ContinuedConfig | None = None
    domains: dict[str, DomainConfig] = Field(min_length=2)
    runtime: RuntimeConfig = RuntimeConfig()

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, v: dict[str, DomainConfig]) -> dict[str, DomainConfig]:
        unknown = sorted(set(v) - set(DOMAINS))
        if unknown:
            raise ValueError(f"unknown domain(s) {', '.join(unknown)}; known: {', '.join(DOMAINS)}")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> "ZooConfig":
        """Expert names are folders and table keys: each used once, never 'base', and distinct
        ignoring case (on a case-insensitive file system, macOS's or Windows', `Code-A` and
        `code-a` are one checkpoint folder: the second expert's weights replaced the first's, and
        the catalog listed both); an expert that starts from 'continued' needs that section.
        Each error names the variant's field."""
        first: dict[str, tuple[str, str]] = {}
        for d, cfg in self.domains.items():
            for i, v in enumerate(cfg.variants):
                at = f"domains.{d}.variants.{i}"
                if v.name.casefold() == "base":
                    case = "" if v.name == "base" else f"{v.name!r} differs from 'base' only in case, and "
                    raise _FieldError(f"{at}.name", f"{case}'base' is reserved for the base model; expert names "
                                                    f"must be unique and not 'base'")
                if v.name.casefold() in first:
                    other, where = first[v.name.casefold()]
                    same = "" if other == v.name else f" ({other!r}: names that differ only in case share a folder)"
                    raise _FieldError(f"{at}.name", f"{v.name!r} is already the name of {where}{same}; expert "
                                                    f"names must be unique and not 'base'")
                first[v.name.casefold()] = (v.name, at)
                if v.start == "continued" and self.continued is None:
                    raise _FieldError(f"{at}.start", f"expert {v.name} starts from 'continued', but the config has "
                                                     f"no 'continued' section")
        return self

    @model_validator(mode="after")
    def _budgets(self) -> "ZooConfig":
        """Each stage's token budget within MAX_STAGE_TOKENS, named at its `steps` (checked at
        load: a budget past it only failed, or hung, inside its Ray task)."""
        stages = [(k, getattr(self, k)) for k in ("base", "skills", "continued") if getattr(self, k) is not None]
        stages += [(f"domains.{d}.variants.{i}", v) for d, cfg in self.domains.items()
                   for i, v in enumerate(cfg.variants)]
        for at, t in stages:
            tokens = t.steps * t.batch_size * self.data.seq_len
            if tokens > MAX_STAGE_TOKENS:
                raise _FieldError(f"{at}.steps", f"{t.steps} steps x batch_size {t.batch_size} x data.seq_len "
                                                 f"{self.data.seq_len} = {tokens:.3g} tokens, over the "
                                                 f"{MAX_STAGE_TOKENS:.3g} one training stage can hold in memory")
        return self

    def eval_warning(self) -> str | None:
        """Why the eval sets are too small to tell experts apart (accuracy's worst-case standard
        error over 0.03), or None."""
        n = self.data.eval_examples
        if n >= MIN_EVAL_EXAMPLES:
            return None
        return (f"data.eval_examples: {n} examples per domain give accuracies a standard error of up to "
                f"{worst_accuracy_error(n):.3f} (over 0.03, the labels' noise floor); use {MIN_EVAL_EXAMPLES} or more "
                f"for results, fewer only for tests")

    def experts(self) -> list[tuple[str, VariantConfig]]:
        """(domain, variant) in config order: the catalog's model order."""
        return [(d, v) for d, cfg in self.domains.items() for v in cfg.variants]

    def digest(self) -> str:
        """Content digest of everything that shapes the weights (runtime excluded), the order of
        the domains included."""
        payload = self.model_dump(mode="json", exclude={"runtime"})
        payload["domain_order"] = list(self.domains)  # the pretraining mixture's order; sorted keys hide it
        return json_digest(payload, size=12)

    @classmethod
    def load(cls, path: str | Path) -> "ZooConfig":
        path = Path(path)
        raw = read_yaml(path, "zoo config", unique_keys=True)  # a domain listed twice kept only its last block
        if not isinstance(raw, dict):  # pydantic named its class ("a valid dictionary or instance of ZooConfig")
            got = "is empty" if raw is None else f"holds a {type(raw).__name__}, not a mapping of sections"
            raise ConfigError(f"{path}: the zoo config {got} (base, domains, ...: see configs/zoo_tiny.yaml)")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, _FieldError):
                raise ConfigError(f"{path}: {cause.path}: {cause}") from None
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            got = err.get("input")  # a wrong type is clearer with what the YAML held (`true`, `2.0`)
            shown = f" (got {got!r})" if err["type"].endswith("_type") and isinstance(got, (bool, int, float, str)) else ""
            raise ConfigError(f"{path}: {loc}: {err['msg']}{shown}") from None
