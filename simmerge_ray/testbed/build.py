"""`zoo build`: data files, tokenizer, base pretraining (then its skills stage), expert fine-tunes
(Ray tasks), score matrix.

Output (written to a temporary folder, renamed when complete):
    catalog.yaml            base + experts (task = domain) + tasks (probes, eval)
    checkpoints/<name>/     HF folders (config, model.safetensors, tokenizer)
    data/<task>/probes.jsonl ({"text"}), data/<task>/eval.jsonl ({"prompt", "answer"})
    scores.parquet          model x task: loglik (the score) and accuracy
    manifest.json           config, its digest, per-file digests, training losses, timings (this
                            build's; a cached stage's training time as <stage>_when_cached_s)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import ray
import torch
import transformers
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from simmerge_ray.catalog import Catalog, ModelEntry, TaskEntry
from simmerge_ray.errors import ConfigError
from simmerge_ray.io.atomic import atomic_output_dir, atomic_write_text
from simmerge_ray.placement import check_placeable
from simmerge_ray.resources import ResourceAsk
from simmerge_ray.testbed import pretrain_cache
from simmerge_ray.testbed.domains import Example, get_domain
from simmerge_ray.testbed.domains.general import general_texts
from simmerge_ray.testbed.domains.rewrites import rewritten_texts
from simmerge_ray.testbed.evaluate import EVAL_MAX_LEN, encode, score
from simmerge_ray.testbed.model_factory import init_model, make_config
from simmerge_ray.testbed.tokenizer import EOS, PAD, train_tokenizer
from simmerge_ray.testbed.train import mixed_texts, pack_blocks, train_lm
from simmerge_ray.testbed.zoo_config import TrainConfig, VariantConfig, ZooConfig


def _take(it: Iterator, n: int) -> list:
    return list(itertools.islice(it, n))


def held_out_sets(cfg: ZooConfig) -> tuple[dict[str, list[str]], dict[str, list[Example]]]:
    """Per domain: unlabeled probe prompts and the labeled eval examples."""
    probes, evals = {}, {}
    for name in cfg.domains:
        dom = get_domain(name)
        probes[name] = [e.prompt for e in _take(dom.examples("probe", cfg.data.seed), cfg.data.probe_prompts)]
        evals[name] = _take(dom.examples("eval", cfg.data.seed), cfg.data.eval_examples)
        if len(evals[name]) < cfg.data.eval_examples:
            raise ConfigError(f"data.eval_examples: domain {name!r} has only {len(evals[name])} held-out examples")
    return probes, evals


def _tokenizer_corpus(cfg: ZooConfig) -> Iterator[str]:
    """General text then each domain's training text, `sample_chars` of each, in a fixed order."""
    sources = [general_texts(cfg.tokenizer.seed)] + [get_domain(d).train_texts(cfg.tokenizer.seed) for d in cfg.domains]
    for src in sources:
        size = 0
        for text in src:
            yield text
            size += len(text)
            if size >= cfg.tokenizer.sample_chars:
                break


def _tokenizer_from_json(text: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), eos_token=EOS, pad_token=PAD, bos_token=EOS)


def _mixture(cfg: ZooConfig, tok: PreTrainedTokenizerFast, domain_share: float, seed: int, n_blocks: int,
             rewritten: bool = False) -> torch.Tensor:
    """General text with `domain_share` of documents drawn evenly from the domains (in their
    eval template, or `rewritten` in another surface form)."""
    streams = [general_texts(seed)] + [rewritten_texts(d, seed) if rewritten else get_domain(d).train_texts(seed)
                                       for d in cfg.domains]
    share = domain_share / len(cfg.domains)
    texts = mixed_texts(streams, [1 - domain_share] + [share] * len(cfg.domains), seed)
    return pack_blocks(texts, tok, cfg.data.seq_len, n_blocks)


def _role(cfg: ZooConfig, role: str) -> tuple[TrainConfig, str | None, VariantConfig | None]:
    """(training settings, domain, variant) of 'base', 'skills', 'continued' or an expert's name."""
    stages = {"base": cfg.base, "skills": cfg.skills, "continued": cfg.continued}
    if role in stages:
        assert stages[role] is not None
        return stages[role], None, None
    domain, variant = next((d, v) for d, v in cfg.experts() if v.name == role)
    return variant, domain, variant


def _training_blocks(cfg: ZooConfig, tok: PreTrainedTokenizerFast, role: str) -> torch.Tensor:
    """The token blocks one model trains on: a pretraining mixture, or one variant's domain subset."""
    train, domain, variant = _role(cfg, role)
    if variant is None:
        return _mixture(cfg, tok, train.domain_share, train.seed, train.steps * train.batch_size, role == "skills")
    texts = get_domain(domain).train_texts(variant.seed, variant.subset)
    return pack_blocks(texts, tok, cfg.data.seq_len, variant.steps * variant.batch_size)


@ray.remote(num_cpus=1)
def _train_remote(cfg_json: str, tok_json: str, role: str, start_state: dict | None,
                  evals: dict[str, list[Example]]) -> dict:
    """Train the base, its skills stage, the continued-pretraining checkpoint or one expert from
    `start_state`; score it on every domain."""
    cfg = ZooConfig.model_validate_json(cfg_json)
    train, _, variant = _role(cfg, role)
    torch.set_num_threads(getattr(train, "threads", 1))
    torch.use_deterministic_algorithms(True)
    tok = _tokenizer_from_json(tok_json)
    model = init_model(cfg.architecture, len(tok), tok.eos_token_id, tok.pad_token_id, cfg.seed)
    if start_state is not None:
        model.load_state_dict(start_state)
    t0, c0 = time.perf_counter(), time.process_time()
    blocks = _training_blocks(cfg, tok, role)
    losses = train_lm(model, blocks, train, variant.lora if variant else None)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    scores = {t: score(model, encode(ex, tok, EVAL_MAX_LEN)) for t, ex in evals.items()}
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return {"state": state, "losses": losses, "seconds": seconds, "cpu_seconds": cpu_seconds, "scores": scores,
            "tokens": int(blocks.numel())}


def task_vector_table(base: dict[str, torch.Tensor], experts: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Per expert |tau| / |theta_0| (tau = expert - base, over every tensor), and the matrix of
    task-vector cosines: how far each fine-tune moved, and how alike the moves are."""
    names = list(experts)
    flat0 = torch.cat([t.reshape(-1).double() for t in base.values()])
    taus = torch.stack([torch.cat([(sd[k].double() - base[k].double()).reshape(-1) for k in base])
                        for sd in experts.values()])
    norms = taus.norm(dim=1)
    cos = (taus @ taus.T) / torch.outer(norms, norms).clamp_min(1e-30)
    return {"relative_norm": {n: float(norms[i] / flat0.norm()) for i, n in enumerate(names)},
            "cosine": {n: {m: round(float(cos[i, j]), 4) for j, m in enumerate(names)} for i, n in enumerate(names)}}


def pretrain_parts(cfg: ZooConfig, tok_json: str, role: str) -> dict:
    """What shapes the base, skills or continued checkpoint: the config parts it trains from, the
    domains in config order (the pretraining mixture draws its streams in that order), the
    tokenizer and Python (whose standard library is training text)."""
    part = cfg.model_dump(mode="json", include={"seed", "architecture", "tokenizer", "data", "base"})
    part["domains"] = list(cfg.domains)
    part["tokenizer_digest"] = hashlib.blake2b(tok_json.encode(), digest_size=16).hexdigest()
    part["python"] = sys.version
    if role in ("skills", "continued") and cfg.skills is not None:
        part["skills"] = cfg.model_dump(mode="json", include={"skills"})
    if role == "continued":
        part["continued"] = cfg.model_dump(mode="json", include={"continued"})
    return part


def _role_field(cfg: ZooConfig, role: str) -> str:
    """The config path of a stage's or expert's settings ('base', 'domains.math.variants.1')."""
    if role in ("base", "skills", "continued"):
        return role
    return next(f"domains.{d}.variants.{i}" for d, c in cfg.domains.items() for i, v in enumerate(c.variants)
                if v.name == role)


def check_finite(cfg: ZooConfig, role: str, result: dict, source: str) -> None:
    """Refuse a training result whose loss or weights are not finite (a learning rate that
    diverged): such a model was saved, scored NaN and published in the zoo without a word, and
    every merge and label built on it was NaN too. Names the stage's `lr` in the config."""
    losses = result["losses"]
    step = next((i for i, x in enumerate(losses) if not math.isfinite(x)), None)
    if step is None and all(bool(torch.isfinite(t).all()) for t in result["state"].values() if t.is_floating_point()):
        return
    train, _, _ = _role(cfg, role)
    what = (f"loss {losses[step]} at step {step + 1} of {len(losses)}" if step is not None
            else "its weights hold non-finite values after training")
    raise ConfigError(f"{source}: {_role_field(cfg, role)}.lr: {role} diverged ({what}); lower the learning "
                      f"rate ({train.lr:g}); nothing was written")


def _check_stage_placeable(cfg: ZooConfig, role: str, source: str) -> None:
    check_placeable(f"{source}: {role}.threads: the {role} pretraining task",
                    ResourceAsk(num_cpus=float(getattr(cfg, role).threads)))


def check_stages_placeable(cfg: ZooConfig, tok_json: str, source: str) -> None:
    """Every pretraining stage the cache lacks, checked before the first trains: a `continued`
    stage no node can hold was refused only after the base and skills stages had trained."""
    for role in ("base", "skills", "continued"):
        if getattr(cfg, role) is not None and not pretrain_cache.present(
                pretrain_cache.pretrain_key(pretrain_parts(cfg, tok_json, role), role)):
            _check_stage_placeable(cfg, role, source)


def _pretrained(cfg: ZooConfig, tok_json: str, role: str, train: Callable[[], ray.ObjectRef],
                log: Callable[[str], None], source: str = "zoo config") -> dict:
    """The base, skills or continued checkpoint's training result, from the per-machine cache when an
    entry for the same config, tokenizer and Python (whose standard library is training text)
    exists (pretrain_cache), else trained now and cached.

    Training is one Ray task asking for the stage's `threads` CPUs: one no node can hold is never
    scheduled and the build would wait in silence, so a miss checks it first (naming the field of
    `source`, the config); a hit needs no CPUs, so a cached stage builds on a smaller cluster."""
    key = pretrain_cache.pretrain_key(pretrain_parts(cfg, tok_json, role), role)
    hit = pretrain_cache.load(key, log)
    if hit is not None:
        check_finite(cfg, role, hit, source)
        log(f"{role}: reused from the pretrain cache ({key[:12]})")
        return hit
    _check_stage_placeable(cfg, role, source)  # again: an entry found corrupt is a miss too
    result = ray.get(train())
    check_finite(cfg, role, result, source)  # before the cache keeps it
    pretrain_cache.store(key, result)
    return result


def _took(result: dict, cpu: bool = False) -> str:
    """How long a stage's training took: now, or (a stage reused from the pretrain cache) when the
    cache entry was made, said as such rather than as this build's time."""
    if result.get("cached"):
        return f"(trained in {result['seconds']:.0f}s when cached)"
    return f"in {result['seconds']:.0f}s" + (f" ({result['cpu_seconds']:.0f} CPU s)" if cpu else "")


def _record_time(timings: dict[str, float], stage: str, result: dict, started: float) -> None:
    """The manifest's `<stage>_s`: this build's training time, or, for a stage reused from the
    pretrain cache, this build's time to load it, beside the training time the entry records
    (`<stage>_when_cached_s`): a cached build's timings are its own, not a past one's."""
    if result.get("cached"):
        timings[f"{stage}_s"] = time.perf_counter() - started
        timings[f"{stage}_when_cached_s"] = result["seconds"]
    else:
        timings[f"{stage}_s"] = result["seconds"]


CPU_ACCELERATOR_NOTICE = "Setting accelerator to CPU."  # DeepSpeed's, where it finds no GPU


class _NoCpuAcceleratorNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(CPU_ACCELERATOR_NOTICE)


@contextmanager
def without_cpu_accelerator_notice() -> Iterator[None]:
    """Leave out DeepSpeed's "[WARNING] [real_accelerator.py:...] Setting accelerator to CPU" line,
    which save_pretrained's import of DeepSpeed prints on a machine without a GPU (the testbed
    trains on CPUs by design); every other DeepSpeed line is kept. The "DeepSpeed" logger is the
    one DeepSpeed creates on import (logging.getLogger gives the same object, filters and all)."""
    logger, notice = logging.getLogger("DeepSpeed"), _NoCpuAcceleratorNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _save_checkpoint(cfg: ZooConfig, tok: PreTrainedTokenizerFast, state: dict, path: Path) -> None:
    config = make_config(cfg.architecture, len(tok), tok.eos_token_id, tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state)
    transformers.utils.logging.disable_progress_bar()
    with without_cpu_accelerator_notice():
        model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))


def _digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def build_zoo(cfg: ZooConfig, out: Path, *, overwrite: bool = False,
              log: Callable[[str], None] = print, source: str | Path = "zoo config") -> Path:
    """Build the whole zoo into `out` (Ray must be initialised); returns the catalog path.
    `source` names the config in errors (its path)."""
    t_start = time.perf_counter()
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        probes, evals = held_out_sets(cfg)
        tasks = {}
        for name in cfg.domains:
            _write_jsonl(tmp / "data" / name / "probes.jsonl", [{"text": p} for p in probes[name]])
            _write_jsonl(tmp / "data" / name / "eval.jsonl", [{"prompt": e.prompt, "answer": e.answer} for e in evals[name]])
            tasks[name] = TaskEntry(probes=Path(f"data/{name}/probes.jsonl"), eval=Path(f"data/{name}/eval.jsonl"))

        t0 = time.perf_counter()
        tok = train_tokenizer(_tokenizer_corpus(cfg), cfg.tokenizer.vocab_size)
        tok_json = tok.backend_tokenizer.to_str()
        timings = {"tokenizer_s": time.perf_counter() - t0}
        log(f"tokenizer: {len(tok)} tokens in {timings['tokenizer_s']:.1f}s")

        check_stages_placeable(cfg, tok_json, str(source))
        cfg_json = cfg.model_dump_json()
        evals_ref = ray.put(evals)
        t0 = time.perf_counter()
        base = _pretrained(cfg, tok_json, "base", lambda: _train_remote.options(num_cpus=cfg.base.threads).remote(
            cfg_json, tok_json, "base", None, evals_ref), log, str(source))
        _record_time(timings, "base", base, t0)
        log(f"base: {base['tokens']} tokens {_took(base, cpu=True)}, final loss {base['losses'][-1]:.3f}")
        results: dict[str, dict] = {}
        if cfg.skills is not None:
            results["pretrained"] = base
            start = ray.put(base["state"])
            t0 = time.perf_counter()
            base = _pretrained(cfg, tok_json, "skills", lambda: _train_remote.options(num_cpus=cfg.skills.threads).remote(
                cfg_json, tok_json, "skills", start, evals_ref), log, str(source))
            _record_time(timings, "skills", base, t0)
            log(f"skills stage: {base['tokens']} tokens {_took(base)}, final loss {base['losses'][-1]:.3f}")
        _save_checkpoint(cfg, tok, base["state"], tmp / "checkpoints" / "base")
        starts = {"base": ray.put(base["state"])}
        results["base"] = base
        if cfg.continued is not None:
            results["continued"] = _pretrained(
                cfg, tok_json, "continued", lambda: _train_remote.options(num_cpus=cfg.continued.threads).remote(
                    cfg_json, tok_json, "continued", starts["base"], evals_ref), log, str(source))
            starts["continued"] = ray.put(results["continued"]["state"])
            log(f"continued pretraining: {_took(results['continued'])}, "
                f"final loss {results['continued']['losses'][-1]:.3f}")
        pending: dict = {}
        # Longest first (steps x batch, what a run's time follows): the two workers then finish
        # together instead of one waiting on a long expert started last (about 25 s of the demo's
        # 490 s). Each expert has its own seed, so the order changes no weight.
        queue = sorted(cfg.experts(), key=lambda dv: -dv[1].steps * dv[1].batch_size)
        t0 = time.perf_counter()
        while queue or pending:
            while queue and len(pending) < cfg.runtime.workers:
                _, v = queue.pop(0)
                pending[_train_remote.remote(cfg_json, tok_json, v.name, starts[v.start], evals_ref)] = v.name
            done, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done[0])
            results[name] = ray.get(done[0])
            try:
                check_finite(cfg, name, results[name], str(source))
            except ConfigError:
                for ref in pending:  # the other experts' work is lost with this zoo: stop it now
                    ray.cancel(ref)
                raise
            _save_checkpoint(cfg, tok, results[name]["state"], tmp / "checkpoints" / name)
            r = results[name]
            log(f"expert {name}: {r['seconds']:.0f}s ({r['cpu_seconds']:.0f} CPU s), final loss {r['losses'][-1]:.3f}")
        timings["experts_wall_s"] = time.perf_counter() - t0

        catalog = Catalog(
            base=Path("checkpoints/base"),
            models=[ModelEntry(name=v.name, path=Path(f"checkpoints/{v.name}"), task=d) for d, v in cfg.experts()],
            tasks=tasks,
        )
        atomic_write_text(tmp / "catalog.yaml", catalog.to_yaml())
        rows = [
            {"model": m, "model_task": (None if m == "base" else d), "task": t, "score": s["score"], "loglik": s["loglik"], "accuracy": s["accuracy"]}
            for m, d in [("base", None), *((v.name, d) for d, v in cfg.experts())]
            for t, s in results[m]["scores"].items()
        ]
        pl.DataFrame(rows).write_parquet(tmp / "scores.parquet")
        timings["total_s"] = time.perf_counter() - t_start
        manifest = {
            "config": cfg.model_dump(mode="json"),
            "config_digest": cfg.digest(),
            "timings": timings,
            "digests": {p.relative_to(tmp).as_posix(): _digest(p) for p in sorted((tmp / "checkpoints").rglob("*")) if p.is_file()},
            "losses": {m: [r["losses"][0], r["losses"][-1]] for m, r in results.items()},
            "tokens": {m: r["tokens"] for m, r in results.items()},
            "train_seconds": {m: [round(r["seconds"], 2), round(r["cpu_seconds"], 2)] for m, r in results.items()},
            "task_vectors": task_vector_table(base["state"], {v.name: results[v.name]["state"] for _, v in cfg.experts()}),
        }
        if cfg.skills is not None:  # the base before its skills stage, and how far that stage moved it
            manifest["pretrained"] = {
                "scores": results["pretrained"]["scores"],
                "skills_move": task_vector_table(results["pretrained"]["state"], {"base": base["state"]})[
                    "relative_norm"]["base"]}
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1))
    return Path(out) / "catalog.yaml"
