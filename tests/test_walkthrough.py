"""The README's user walkthrough ("Using it on your checkpoints") runs, as written.

The test makes the layout the section names (`checkpoints/`, `probes/`, `eval/`, beside the
section's `catalog.yaml` and `my-merge.yaml`, which it takes from the README's yaml blocks): a
tiny base and four experts fine-tuned here on three tasks with exact answers, so labels differ.
Then one process runs every `bash` block of the section in order (`simmerge ...` lines through
the CLI's `main`, the other lines through bash), its stdout and stderr captured at the file
descriptors, so Ray's C++ log lines count too. One process, one Ray: a user's shell starts Ray
per command, which would add minutes here; the CLI's own `init_ray` starts it, quiet as a user
gets it. `simmerge serve` runs as the process of its own a user starts in another shell (joined
to that Ray, on a free port for the README's 8000) until its block's commands have run, then is
stopped by its PID (SIGTERM, its own shutdown). The cluster block's `ray job submit` goes to the
session's `ray start --head` (its address for the README's `--address http://HEAD:8265`; the
job's `s3://` output becomes a `file://` one); its `kubectl apply` is not run (no Kubernetes here): the manifest it names is
checked against the KubeRay CRDs instead.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from cluster_processes import RayHead, free_ports

from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.merge.arms import ARM_NAMES
from simmerge_ray.selector.data import load_pair_data

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using it on your checkpoints"
SKIP = re.compile(r"<!-- walkthrough: skip \((.+?)\) -->\s*$")
STOP_SERVER = "STOP_SERVER"  # the driver stops the server it started, after the server's block

# Each task: a prompt word and a shift; the answer is the key word shifted in KEYS.
KEYS = ("cat", "dog", "fish", "bird", "tree", "house")
TASKS = {"code": ("code", 1), "math": ("plus", 2), "rag": ("river", 3)}
EXPERTS = {"code-1": ("code", 1), "code-2": ("code", 2), "math-1": ("math", 1), "rag-1": ("rag", 1)}


def section_blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, body, skip reason or None) of each fenced block of the walkthrough section."""
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    lines = text[start:end if end > 0 else None].splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```") and len(lines[i]) > 3:
            lang = lines[i][3:].strip()
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            prev = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
            m = SKIP.search(prev)
            blocks.append((lang, "\n".join(lines[i + 1:j]), m.group(1) if m else None))
            i = j
        i += 1
    return blocks


def shell_commands(body: str) -> list[str]:
    """Commands of a bash block: continuation lines joined, comment-only lines dropped."""
    joined = body.replace("\\\n", " ")
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _examples(task: str) -> list[dict[str, str]]:
    word, shift = TASKS[task]
    return [{"prompt": f"{word} {k} value", "answer": f" {KEYS[(i + shift) % len(KEYS)]}"} for i, k in enumerate(KEYS)]


def build_workspace(root: Path) -> None:
    """checkpoints/{base,code-1,code-2,math-1,rag-1}, probes/ and eval/ files: a 2-layer llama
    (hidden 32) and experts fine-tuned on their task's answers (30 full-batch steps each)."""
    from transformers import AutoModelForCausalLM

    from benchmarks.synthetic_lm import WORDS, make_tiny_lm, train_tokenizer
    from simmerge_ray.selector.train import one_thread

    texts = [" ".join(WORDS)] + [e["prompt"] + e["answer"] for t in TASKS for e in _examples(t)]
    tok = train_tokenizer(texts, vocab_size=64)
    base = make_tiny_lm(root / "checkpoints" / "base", tok, seed=0, init_std=0.02)
    for d in ("eval", "probes"):
        (root / d).mkdir()
    for task in TASKS:
        examples = _examples(task)
        (root / "eval" / f"{task}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
        probes = [e["prompt"] + e["answer"] for e in examples]
        if task == "code":
            (root / "probes" / "code.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in probes))
        else:
            (root / "probes" / f"{task}.txt").write_text("\n".join(probes) + "\n")
    with one_thread():
        for name, (task, seed) in EXPERTS.items():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(base)
            opt = torch.optim.AdamW(model.parameters(), lr=0.01 * seed)
            enc = tok([e["prompt"] + e["answer"] for e in _examples(task)], return_tensors="pt")
            labels = torch.full_like(enc["input_ids"], -100)
            labels[:, -1] = enc["input_ids"][:, -1]  # the answer word, the last token
            for _ in range(30):
                model(input_ids=enc["input_ids"], labels=labels).loss.backward()
                opt.step()
                opt.zero_grad()
            model.save_pretrained(root / "checkpoints" / name)
            tok.save_pretrained(root / "checkpoints" / name)


DRIVER = textwrap.dedent('''
    import json, os, pty, shlex, signal, subprocess, sys, threading, time
    import ray
    from simmerge_ray.cli import main
    from simmerge_ray.ray_session import init_ray
    # What the README tells a user to set for its cluster block; not for the simmerge lines,
    # which start (or reuse) the local Ray.
    shell_env = {**os.environ, **json.loads(os.environ.pop("WALKTHROUGH_SHELL_ENV"))}
    server, decision = None, None
    # The shell lines read from a terminal, as in a user's shell (Ray's CLI picks its output style
    # from whether stdin is one); their output is captured as before.
    _, terminal = pty.openpty()
    for cmd in sys.argv[1:]:
        if cmd == "RESTART_RAY":
            ray.shutdown()
            continue
        print(f"@@@ {cmd}", flush=True)
        t0 = time.perf_counter()
        if cmd == "STOP_SERVER":  # Ctrl-C in the server's shell: SIGTERM by its PID
            server.send_signal(signal.SIGTERM)
            print(server.communicate(timeout=300)[0], end="")
            rc, server = server.returncode, None
        elif cmd.startswith("simmerge serve "):  # a process of its own, joined to this one's Ray
            init_ray()
            env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
            server = subprocess.Popen(shlex.split(cmd, comments=True), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
            timer = threading.Timer(600, server.kill)  # a server that never comes up fails here
            timer.start()
            while (line := server.stdout.readline()) and not line.startswith("bandit serving on "):
                print(line, end="")
            timer.cancel()
            print(line, end="")
            rc = 0 if line else server.wait()
        elif cmd.startswith("simmerge ") and not any(c in cmd for c in ";>|&"):
            rc = main(shlex.split(cmd, comments=True)[1:])
        else:
            if decision is not None:
                cmd = cmd.replace("<id>", decision)
            res = subprocess.run(["bash", "-c", cmd], env=shell_env, stdin=terminal, stdout=subprocess.PIPE, text=True)
            print(res.stdout, end="" if res.stdout.endswith("\\n") or not res.stdout else "\\n")
            try:
                decision = json.loads(res.stdout).get("decision_id", decision)
            except (ValueError, AttributeError):
                pass
            rc = res.returncode
        sys.stdout.flush(); sys.stderr.flush()
        print(f"@@@ rc={rc} {time.perf_counter() - t0:.1f}s", flush=True)
        if rc:
            if server is not None:
                server.kill()
            sys.exit(rc)
''')


def run_driver(ws: Path, commands: list[str], timeout: float, shell_env: dict[str, str]) -> dict[str, str]:
    """Run `commands` in one process (see the module docstring), the non-simmerge ones with
    `shell_env` added; {command: its output}."""
    env = {**os.environ, "PYTHONPATH": str(README.parent), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "WALKTHROUGH_SHELL_ENV": json.dumps(shell_env)}
    for var in ("RAY_ADDRESS", "RAY_BACKEND_LOG_LEVEL", "RAY_AIR_NEW_OUTPUT"):
        env.pop(var, None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(prefix="rw-", dir="/tmp") as ray_tmp:  # short: socket paths
        env["RAY_TMPDIR"] = ray_tmp  # its own Ray, never one another process started
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, *commands], cwd=ws, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # its local Ray's processes follow their driver
            stdout = proc.communicate()[0] + f"\n@@@ killed after {timeout} s\n"
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    # The whole output, for a failure's reader, and the CPU seconds of the processes reaped.
    (ws.parent / "walkthrough.log").write_text(stdout + f"\n@@@ cpu {cpu:.1f}s\n")
    parts = re.split(r"^@@@ (.*)$\n", stdout, flags=re.M)
    out = {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2) if not parts[i].startswith("rc=")}
    assert proc.returncode == 0, stdout[-4000:]
    return out


def runnable(blocks: list[tuple[str, str, str | None]], ws: Path, port: int, jobs_address: str
             ) -> list[tuple[str, str]]:
    """(README command, command run) of every bash command of the section, in order: the
    server's port, the cluster's job-submission address and the job's object-store output
    substituted, STOP_SERVER after the server's block; `kubectl` lines are left out (see the
    module docstring)."""
    steps = []
    for lang, body, skip in blocks:
        if lang != "bash" or skip is not None:
            continue
        commands = shell_commands(body)
        for c in commands:
            run = c.replace("s3://bucket/merged", f"file://{ws / 'merged-cluster'}").replace(
                "--address http://HEAD:8265", f"--address {jobs_address}")
            if any(c.startswith(p) for p in ("simmerge serve ", "curl ")):
                run = run.replace("--port 8000", f"--port {port}").replace("localhost:8000", f"localhost:{port}")
            if not c.startswith("kubectl "):
                steps.append((c, run))
        if any(c.startswith("simmerge serve ") for c in commands):
            steps.append((STOP_SERVER, STOP_SERVER))
    return steps


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory, ray_head: RayHead) -> dict:
    ws = tmp_path_factory.mktemp("walkthrough")
    blocks = section_blocks(README.read_text())
    for lang, body, _ in blocks:
        first = body.splitlines()[0] if body else ""
        if lang == "yaml" and re.match(r"# [\w.-]+\.ya?ml\b", first):
            (ws / first.split()[1].rstrip(":")).write_text(body + "\n")
    build_workspace(ws)
    commands = [c for lang, body, skip in blocks if lang == "bash" and skip is None for c in shell_commands(body)]
    steps = runnable(blocks, ws, free_ports(1)[0], ray_head.address)
    # After the walkthrough, on a fresh Ray: --verbose brings Ray's INFO lines back.
    verbose = "simmerge merge my-merge.yaml --out merged-verbose/ --ray --workers 1 --verbose"
    shell_env = {"REPO": str(README.parent)}
    out = run_driver(ws, [run for _, run in steps] + ["RESTART_RAY", verbose], timeout=1800, shell_env=shell_env)
    verbose_out = out.pop(verbose)
    assert list(out) == [run for _, run in steps]  # each one ran, in order, exit 0
    return {"ws": ws, "blocks": blocks, "commands": commands, "verbose": verbose_out,
            "out": {readme: out[run] for readme, run in steps}}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint.open(folder)
    return {n: ck.read(n) for n in ck.tensor_names}


def test_every_readme_command_runs_and_writes_its_own_folder(walkthrough: dict) -> None:
    ws, commands, blocks = walkthrough["ws"], walkthrough["commands"], walkthrough["blocks"]
    assert [b for b in blocks if b[2]] == []  # no block is skipped
    # Every command ran, in order, exit 0 (the server until STOP_SERVER), but kubectl's.
    assert [c for c in walkthrough["out"] if c != STOP_SERVER] == [c for c in commands if not c.startswith("kubectl ")]
    assert [c.split()[1] for c in commands if c.startswith("simmerge ")] == [
        "merge", "features", "features", "label", "fit", "evaluate-selector", "plan", "merge", "plan", "merge",
        "merge", "merge", "merge", "fit", "plan", "calibrate", "plan", "bandit-init", "serve"]
    assert [c.split()[0] for c in commands if not c.startswith("simmerge ")] == [
        "python", "curl", "curl", "ray", "kubectl"]
    outs = [shlex.split(c)[shlex.split(c).index("--out") + 1] for c in commands if " --out " in c]
    shared = {o for o in outs if outs.count(o) > 1}
    assert shared == {"feats/"}  # the two feature stages, which own separate files there
    for name in ("merged", "merged-pair", "merged-3way", "merged-3way-multi", "merged-3way-steps", "merged-cluster", "selector",
                 "selector-eval", "selector-aux", "plan-pair", "plan-3way", "plan-3way-both", "calibration",
                 "plan-3way-calibrated", "labels", "bandit"):
        assert (ws / name).is_dir(), name
    # With the auxiliary selector every model of the plan has a predicted retention.
    both = json.loads((ws / "plan-3way-both" / "plan.json").read_text())
    assert both["expert"] == "code-1" and set(both["retention"]) == set(both["models"])
    assert all(r is not None for r in both["retention"].values()) and both["weighting"] in ("half", "equal", "anchor")
    # Calibrated on the labels' own 3-way merges (two subsets here): the plan carries its calibrated values.
    multiway = json.loads((ws / "calibration" / "multiway.json").read_text())
    assert multiway["3way"]["subsets"] == 2 and "4way" not in multiway
    calibrated = json.loads((ws / "plan-3way-calibrated" / "plan.json").read_text())["calibrated"]
    assert set(calibrated) >= {"expert_retention", "others_retention", "score"}
    # Not merging is also compared on the calibrated scale (the expert's side), where it keeps +0%.
    top = calibrated.get("top_plan", {})
    e = top["expert_retention"] if top.get("available") else calibrated["expert_retention"]
    said = next(v for c, v in walkthrough["out"].items() if c.startswith("simmerge plan ") and "--calibration" in c)
    assert (f"calibrated, the expert's side: the best plan changes code-1's score on code by {100 * e:+.1f}% "
            f"({'as the top plan' if top.get('available') else 'calibrated'}), not merging by +0.0%") in said, said
    # No work folder of Ray Tune/Train or of a killed run beside the outputs.
    assert sorted(p.name for p in ws.iterdir() if p.name.startswith(".")) == []
    lab = json.loads((ws / "labels" / "label_summary.json").read_text())
    assert lab["labels_2way"] > 0 and lab["labels_3way"] > 0 and lab["labels_4way"] == 0


def test_plan_steps_run_from_any_folder_and_match_the_plan_merge(walkthrough: dict) -> None:
    ws = walkthrough["ws"]
    step2 = yaml.safe_load((ws / "plan-3way" / "step-2.yaml").read_text())
    refs = [m["model"] for m in step2["models"]] + [step2.get("base_model")]
    assert str((ws / "plan-3way" / "step-1").resolve()) in refs
    got, want = _tensors(ws / "merged-3way-steps"), _tensors(ws / "merged-3way")
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    # plan.mergekit.yaml runs the same steps (a plan folded into one linear merge: float32 rounding apart)
    multi = _tensors(ws / "merged-3way-multi")
    assert multi.keys() == want.keys() and all(torch.allclose(multi[n], want[n], rtol=1e-5, atol=1e-6) for n in want)
    header = (ws / "plan-3way" / "step-2.yaml").read_text().splitlines()[1]
    assert header == f"#   simmerge merge {(ws / 'plan-3way' / 'step-2.yaml').resolve()} --out MERGED"
    # Model cards name what the user knows: `merge --plan`'s the catalog models and the plan's
    # steps (the config as run names a step `step-<j>`, never the deleted work folder); the step
    # files' the plan folder.
    plan = json.loads((ws / "plan-3way" / "plan.json").read_text())
    card = (ws / "merged-3way" / "README.md").read_text()
    prose = card[:card.index("### Configuration")]
    chain = plan["models"][0] + "".join(f" -{op}-> {m}" for op, m in zip(plan["operators"], plan["models"][1:]))
    if set(plan["operators"]) == {"linear"}:  # one folded merge: no step, no intermediate folder
        assert f"The plan `plan-3way/plan.json` for task `code`, {chain}, folded into one linear combination" in prose
        return
    assert "plan-" not in prose.replace("plan-3way/plan.json", "") and ".merged-3way.plan-" not in card
    assert f"Step 2 of 2 of the plan `plan-3way/plan.json` for task `code`: {chain}." in prose
    assert f"* `plan step 1: {chain.rsplit(' -', 1)[0]}` (an intermediate output, not kept)" in prose
    last = plan["models"][-1]
    assert f"* `{last}` ({(ws / 'checkpoints' / last).resolve()})" in prose
    steps_card = (ws / "merged-3way-steps" / "README.md").read_text()
    assert f"* `{(ws / 'plan-3way' / 'step-1').resolve()}`" in steps_card


def test_merge_output_carries_card_config_and_parameters(walkthrough: dict) -> None:
    from simmerge_ray import __version__

    merged = walkthrough["ws"] / "merged"
    given = yaml.safe_load((walkthrough["ws"] / "my-merge.yaml").read_text())
    assert yaml.safe_load((merged / "mergekit_config.yml").read_text()) == given
    info = json.loads((merged / "simmerge_merge.json").read_text())
    assert info["merge_method"] == "ties" and info["tool"] == f"simmerge {__version__}"
    assert info["models"] == ["checkpoints/code-1", "checkpoints/math-1", "checkpoints/base"]
    sources = info["parameters"]["slices"][0]["sources"]
    assert [(s["model"], s["parameters"]) for s in sources] == [
        ("checkpoints/code-1", {"weight": 0.5, "density": 0.5}), ("checkpoints/math-1", {"weight": 0.5, "density": 0.5}),
        ("checkpoints/base", {})]
    card = (merged / "README.md").read_text()
    assert card.startswith("---\nbase_model:\n") and f"simmerge {__version__}" in card
    assert "`ties` with `checkpoints/base` as the base model" in card
    assert '* `checkpoints/code-1`: `{"weight": 0.5, "density": 0.5}`' in card
    assert (merged / "mergekit_config.yml").read_text().strip() in card
    assert (merged / ".simmerge-output.json").is_file()  # still an output simmerge owns


def test_output_is_quiet_readable_and_has_verdicts(walkthrough: dict) -> None:
    out = walkthrough["out"]
    # simmerge's output, the server's, and the job's own output that `ray job submit` tails (from
    # "Running entrypoint"); before that the submitting CLI logs its packaging at INFO, Ray's by design.
    text = "".join(v.split("Running entrypoint for job", 1)[-1] if c.startswith("ray job submit ") else v
                   for c, v in out.items())
    ray_info = [ln for ln in text.splitlines()  # Python's INFO lines and the C++ ones ("[date I pid tid]")
                if re.search(r"\tINFO |\bINFO \w+\.py:\d+ --|^\[[^\]]* I \d+ \d+\] ", ln)]
    assert ray_info == [] and "core_worker" not in text and "Traceback" not in text
    merge = out["simmerge merge my-merge.yaml --out merged/"]
    assert re.search(r"read \d+(\.\d+)? KiB, wrote \d+(\.\d+)? KiB in [\d.]+ s \([\d.]+ [KMG]iB/s input; \d+ threads?\)", merge), merge
    assert "GB" not in merge
    fit = next(v for k, v in out.items() if k.startswith("simmerge fit "))
    n = len(load_pair_data(walkthrough["ws"] / "feats", walkthrough["ws"] / "labels" / "labels.parquet"))
    assert f"simmerge fit: warning: only {n} labelled pairs (fewer than 50)" in fit
    ev = next(v for k, v in out.items() if k.startswith("simmerge evaluate-selector "))
    assert re.search(r"^verdict: SimMerge (beats|does not beat|ties with) the best fixed arm \(\w+\)", ev, re.M), ev
    label = next(v for k, v in out.items() if k.startswith("simmerge label "))
    assert ("4-way: none (4-way plans need experts of 4 distinct tasks; the catalog's experts cover 3 "
            "(code, math, rag))") in label
    # --verbose restores Ray's INFO lines.
    assert re.search(r"INFO worker\.py:\d+ -- Started a local Ray instance", walkthrough["verbose"])


def test_the_server_answers_the_readme_queries_and_stops_cleanly(walkthrough: dict) -> None:
    out = walkthrough["out"]
    serve = next(c for c in out if c.startswith("simmerge serve "))
    decide = next(c for c in out if c.startswith("curl -s localhost:8000/decide"))
    feedback = next(c for c in out if c.startswith("curl -s localhost:8000/feedback"))
    d = json.loads(out[decide])
    assert d["pair"] == {"a": "code-1", "b": "math-1", "task": "code"}
    assert d["operator"] == max(d["scores"], key=d["scores"].get)
    assert set(d["scores"]) == set(ARM_NAMES)  # bandit-init's warm start from the labels of every arm
    fb = json.loads(out[feedback])  # the <id> of the reply above, counted once
    assert (fb["status"], fb["operator"], fb["reward"]) == ("counted", d["operator"], 0.62)
    assert out[serve].splitlines()[-1].startswith("bandit serving on http://127.0.0.1:")
    # Its own shutdown, on SIGTERM: Serve, the actor, Ray, in order, and no raylet line about a
    # task that failed on the way (serve.shutdown()'s graceful_shutdown retry message).
    stop = out[STOP_SERVER]
    assert stop.splitlines()[-2:] == ["stopping", "stopped"], stop
    assert "(raylet)" not in out[serve] + stop and "failed" not in stop and "Traceback" not in stop, stop


def test_the_cluster_block_runs_on_a_ray_head(walkthrough: dict, repo_root: Path) -> None:
    from simmerge_ray import kuberay

    ws, out = walkthrough["ws"], walkthrough["out"]
    submit = next(c for c in out if c.startswith("ray job submit "))
    assert "succeeded" in out[submit].lower(), out[submit]
    assert (ws / "merged-cluster" / "_SUCCESS").is_file()  # published to the URI when complete
    got, want = _tensors(ws / "merged-cluster"), _tensors(ws / "merged")
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)  # same bytes as locally
    # kubectl apply: the manifest it names, against the KubeRay CRDs (as tests/test_cluster_manifests.py).
    (kubectl,) = [c for c in walkthrough["commands"] if c.startswith("kubectl ")]
    manifest = Path(shlex.split(kubectl.replace("$REPO", str(repo_root)))[-1])
    places = (repo_root.parent / "shared" / "kuberay", repo_root / "shared" / "kuberay")
    crds = next((d for d in places if (d / "ray.io_rayjobs.yaml").exists()), None)
    assert crds is not None, f"no KubeRay CRDs in {' or '.join(map(str, places))}: the clone sits beside shared/"
    standing = [yaml.safe_load((repo_root / "cluster" / "raycluster.yaml").read_text())["spec"]]
    assert kuberay.manifest_problems(yaml.safe_load(manifest.read_text()), crds, standing) == []
