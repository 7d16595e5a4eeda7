"""Can the testbed reach the real fine-tuning regime (issue 17)? A base that knows the skills.

A real base has seen arithmetic, code and translation in its pretraining text; supervised
fine-tuning mostly teaches it a prompt format, so task vectors are small (|tau|/|theta_0| about
0.01) and merges keep most of each expert. This study pretrains a finished run's base further on
general text mixed with every domain's training items rewritten in another surface form
(testbed/domains/rewrites.py), fine-tunes one expert per domain on the eval format at a few (lr, steps) regimes,
and measures per regime: |tau|/|theta_0|, each expert's own-domain accuracy, and the mean
retention (s_merge / s_expert - 1 on each model's own task) of equal-weight linear merges of 2
(every pair), 3 (code + instruct + math) and 5 experts. Prints a table and writes JSON.

    python -m benchmarks.skill_base --run runs/demo --steps 3000 --share 0.6 --out runs/skill-base

The measured results are in docs/testbed.md ("A base that knows the skills in another surface
form").
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.testbed.build import task_vector_table
from simmerge_ray.testbed.domains import get_domain
from simmerge_ray.testbed.domains.base import Example
from simmerge_ray.testbed.domains.general import general_texts
from simmerge_ray.testbed.domains.rewrites import REWRITES, rewritten_example, rewritten_texts
from simmerge_ray.testbed.evaluate import EVAL_MAX_LEN, EncodedEvalSet, encode, load_examples, score
from simmerge_ray.testbed.merging import merge_state_dicts
from simmerge_ray.testbed.tokenizer import load_tokenizer
from simmerge_ray.testbed.train import mixed_texts, pack_blocks, train_lm
from simmerge_ray.testbed.zoo_config import TrainConfig

DOMAINS = tuple(REWRITES)
REGIMES = ((1e-4, 150), (3e-4, 300))  # expert (lr, steps), batch 8


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def accuracies(model: torch.nn.Module, evals: dict[str, EncodedEvalSet]) -> dict[str, float]:
    return {d: score(model, e)["accuracy"] for d, e in evals.items()}


def merge_retention(model: torch.nn.Module, experts: dict[str, dict], base: dict, own: dict[str, float],
                    evals: dict[str, EncodedEvalSet], domains: tuple[str, ...]) -> float:
    """Mean retention of the equal-weight linear merge of `domains`' experts."""
    merged = merge_state_dicts("linear", [experts[d] for d in domains], base,
                               {"weight": [1.0] * len(domains), "normalize": True})
    model.load_state_dict(merged)
    return sum(score(model, evals[d])["accuracy"] / own[d] - 1 for d in domains) / len(domains)


def load_run(run: Path) -> tuple[PreTrainedTokenizerFast, dict[str, list[Example]], PreTrainedModel]:
    """A finished run's tokenizer, eval examples per domain and base model."""
    zoo = run / "zoo"
    tok = load_tokenizer(zoo / "checkpoints" / "base")
    examples = {d: load_examples(zoo / "data" / d / "eval.jsonl") for d in DOMAINS}
    model = AutoModelForCausalLM.from_pretrained(str(zoo / "checkpoints" / "base"), attn_implementation="eager",
                                                 dtype=torch.float32, local_files_only=True)
    return tok, examples, model


def pretrain_skills(model: PreTrainedModel, tok: PreTrainedTokenizerFast, steps: int, share: float) -> None:
    """Pretrain further, in place: general text with `share` of rewritten domain documents."""
    streams = [general_texts(7)] + [rewritten_texts(d, 7) for d in DOMAINS]
    weights = [1 - share] + [share / len(DOMAINS)] * len(DOMAINS)
    blocks = pack_blocks(mixed_texts(streams, weights, 7), tok, 128, steps * 16)
    train_lm(model, blocks, TrainConfig(steps=steps, lr=1e-3, batch_size=16, warmup_steps=20, seed=7))


def train_expert(model: PreTrainedModel, base: dict[str, torch.Tensor], tok: PreTrainedTokenizerFast, domain: str,
                 lr: float, steps: int) -> dict[str, torch.Tensor]:
    """One expert fine-tuned from `base` on the domain's eval format (batch 8); its weights."""
    i = DOMAINS.index(domain)
    model.load_state_dict(base)
    blocks = pack_blocks(get_domain(domain).train_texts(100 + i), tok, 128, steps * 8)
    train_lm(model, blocks, TrainConfig(steps=steps, lr=lr, batch_size=8, warmup_steps=10, seed=100 + i))
    return _state(model)


def study_args(doc: str, out: str) -> argparse.ArgumentParser:
    """The options both skill-base studies take."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished pipeline run (its zoo's base and eval sets)")
    ap.add_argument("--steps", type=int, default=3000, help="further pretraining steps of batch 16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(out))
    return ap


def main() -> None:
    ap = study_args(__doc__, "runs/skill-base")
    ap.add_argument("--share", type=float, default=0.6, help="share of rewritten domain documents in that pretraining")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok, examples, model = load_run(args.run)
    evals = {d: encode(ex, tok, EVAL_MAX_LEN) for d, ex in examples.items()}
    rewritten = {d: encode([rewritten_example(d, e.text) for e in ex], tok, EVAL_MAX_LEN) for d, ex in examples.items()}
    result: dict = {"run": str(args.run), "steps": args.steps, "share": args.share,
                    "start": {"eval": accuracies(model, evals), "rewritten": accuracies(model, rewritten)}}
    start = _state(model)
    t0 = time.perf_counter()
    pretrain_skills(model, tok, args.steps, args.share)
    base = _state(model)
    result["base"] = {"seconds": time.perf_counter() - t0, "eval": accuracies(model, evals),
                      "rewritten": accuracies(model, rewritten),
                      "move_from_start": task_vector_table(start, {"base": base})["relative_norm"]["base"]}
    print(f"base: {result['base']['seconds']:.0f} s; eval-format accuracy "
          f"{ {d: round(a, 3) for d, a in result['base']['eval'].items()} }, rewritten "
          f"{ {d: round(a, 3) for d, a in result['base']['rewritten'].items()} }")
    result["regimes"] = []
    print("| lr x steps | |tau|/|theta_0| | own accuracy (" + " / ".join(DOMAINS) + ") | 2-way | 3-way | 5-way |")
    for lr, steps in REGIMES:
        experts, own = {}, {}
        for d in DOMAINS:
            experts[d] = train_expert(model, base, tok, d, lr, steps)
            own[d] = score(model, evals[d])["accuracy"]
        rel = task_vector_table(base, experts)["relative_norm"]
        pairs = [merge_retention(model, experts, base, own, evals, p) for p in itertools.combinations(DOMAINS, 2)]
        row = {"lr": lr, "steps": steps, "relative_norm": rel, "accuracy": own,
               "retention": {"2way": sum(pairs) / len(pairs),
                             "3way": merge_retention(model, experts, base, own, evals, DOMAINS[:3]),
                             "5way": merge_retention(model, experts, base, own, evals, DOMAINS)}}
        result["regimes"].append(row)
        r = row["retention"]
        print(f"| {lr:g} x {steps} | {min(rel.values()):.3f}-{max(rel.values()):.3f} | "
              + " / ".join(f"{own[d]:.2f}" for d in DOMAINS)
              + f" | {100 * r['2way']:.1f} | {100 * r['3way']:.1f} | {100 * r['5way']:.1f} |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "skill_base.json", json.dumps(result, indent=2))
    print(f"wrote {args.out / 'skill_base.json'}")


if __name__ == "__main__":
    main()
