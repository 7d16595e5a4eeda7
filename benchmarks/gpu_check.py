"""GPU check: do the inference back-ends and the Ray Data probe stage give the CPU's outputs on CUDA?

The project's GPU paths (the `hf` back-end on CUDA, the `deepspeed` back-end as ZeRO-3 with CPU
parameter offload over a one-rank NCCL group, Ray Data inference actors holding 1 or 0.5 GPU)
are only ever tested on CPU hosts. This is the one short run to do on a lent GPU machine: on a
seeded testbed llama (built here, nothing downloaded) it runs the probes through each path and
compares the per-probe records the cache stores (next-token log-probs, mean-pooled hidden states,
head-averaged attention maps) with those of the `hf` back-end on the CPU.

    python -m benchmarks.gpu_check --out DIR              # every stage; GPU rows skipped without CUDA
    python -m benchmarks.gpu_check --out DIR --stages hf-cpu,hf-cuda

Each stage runs in its own process under its own timeout (fresh CUDA, NCCL and Ray state), and
DIR/gpu_check.json is rewritten after each, so a run cut short still reports what finished.
Tolerances (max |a - b| <= atol + rtol * max |reference|, per field):
  float32, TF32 off: atol 1e-4, rtol 1e-5. cuBLAS and the CPU's BLAS sum in different orders;
      float32 rounding (2^-24 relative) over dot products of a few hundred terms through four
      blocks stays near 1e-6 relative, and 1e-4 is what RunOptions promises across run options.
  TF32 on: atol 1e-3, rtol 1e-2. Matmul inputs are rounded to 10 mantissa bits (2^-11 relative),
      so ~1e-3 relative per matmul; reported to show what enabling TF32 would cost.
Prints a table, writes JSON; exits 1 when a comparison fails or a stage errs or times out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("hf-cpu", "hf-cuda", "deepspeed", "ray")
TIMEOUTS = {"hf-cpu": 60, "hf-cuda": 60, "deepspeed": 150, "ray": 180}  # seconds, each capped by --budget
FIELDS = ("logp", "hidden", "attn")
FP32 = (1e-4, 1e-5)
TF32 = (1e-3, 1e-2)
BATCH = 8
MODEL = {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "vocab_size": 512, "seed": 11}
PROBES = {"n": 48, "seed": 5, "min_words": 3, "max_words": 60, "max_length": 64}


@dataclass(frozen=True)
class Row:
    """One comparison: `variant`'s records against `reference`'s."""

    name: str
    variant: str
    reference: str
    tol: tuple[float, float]
    tol_name: str
    informative: bool = False  # measures a difference (reported) rather than checking a promise


ROWS = (
    Row("hf cuda fp32 (TF32 off) vs hf cpu", "hf-cuda", "hf-cpu", FP32, "fp32"),
    Row("hf cuda TF32 on vs hf cpu", "hf-cuda-tf32", "hf-cpu", TF32, "tf32", informative=True),
    Row("hf cuda TF32 on vs TF32 off", "hf-cuda-tf32", "hf-cuda", TF32, "tf32", informative=True),
    Row("deepspeed cuda vs hf cuda", "ds-cuda", "hf-cuda", FP32, "fp32"),
    Row("deepspeed cuda vs hf cpu", "ds-cuda", "hf-cpu", FP32, "fp32"),
    Row("deepspeed cpu vs hf cpu", "ds-cpu", "hf-cpu", FP32, "fp32"),
    Row("ray 1 GPU x1 actor vs hf cpu", "ray-gpu1", "hf-cpu", FP32, "fp32"),
    Row("ray 1 GPU x1 actor vs hf cuda", "ray-gpu1", "hf-cuda", FP32, "fp32"),
    Row("ray 0.5 GPU x2 actors vs hf cpu", "ray-gpu0.5", "hf-cpu", FP32, "fp32"),
    Row("ray 0.5 GPU x2 actors vs hf cuda", "ray-gpu0.5", "hf-cuda", FP32, "fp32"),
    Row("ray cpu x1 actor vs hf cpu", "ray-cpu", "hf-cpu", FP32, "fp32"),
)
CUDA_ONLY = {"hf-cuda", "hf-cuda-tf32", "ds-cuda", "ray-gpu1", "ray-gpu0.5"}
CPU_ONLY = {"ds-cpu", "ray-cpu"}  # what the deepspeed and ray stages run where there is no CUDA


# ---- comparison -----------------------------------------------------------------------------

def compare_records(got: dict, ref: dict, tol: tuple[float, float]) -> dict:
    """Max |got - ref| and max |ref| per field over all probes, top-1 next-token agreement, and
    whether every field is within atol + rtol * max |ref|. Both map "<probe>/<field>" -> tensor."""
    import torch

    probes = sorted({k.split("/")[0] for k in ref}, key=int)
    missing = sorted({k.split("/")[0] for k in got} ^ set(probes), key=int)
    if missing:
        return {"ok": False, "error": f"probe sets differ (e.g. probe {missing[0]})"}
    out: dict = {"fields": {}}
    for field in FIELDS:
        diff = scale = 0.0
        for p in probes:
            a, b = got[f"{p}/{field}"].double(), ref[f"{p}/{field}"].double()
            if a.shape != b.shape:
                return {"ok": False, "error": f"probe {p} {field}: shape {tuple(a.shape)} vs {tuple(b.shape)}"}
            diff = max(diff, float((a - b).abs().max()))
            scale = max(scale, float(b.abs().max()))
        out["fields"][field] = {"max_abs_diff": diff, "max_abs_ref": scale,
                                "ok": diff <= tol[0] + tol[1] * scale}
    agree = [got[f"{p}/logp"].argmax(-1) == ref[f"{p}/logp"].argmax(-1) for p in probes]
    out["top1_agreement"] = float(torch.cat(agree).float().mean())
    out["bitwise_equal"] = all(torch.equal(got[k], ref[k]) for k in ref)
    out["ok"] = all(f["ok"] for f in out["fields"].values())
    return out


# ---- shared by the stages -------------------------------------------------------------------

def _settings():
    from simmerge_ray.inference.settings import ProbeSettings

    return ProbeSettings(max_length=PROBES["max_length"], attn_max_length=PROBES["max_length"])


def _probes(scratch: Path) -> list[list[int]]:
    return json.loads((scratch / "probes.json").read_text())


def _pipeline_batches(probes: list[list[int]]) -> list[list[int]]:
    """Probe ids in the batches the Ray pipeline forms (longest first, stable; `batch_size` a
    row), so a back-end run here and a Ray actor pad and multiply the same shapes."""
    order = sorted(range(len(probes)), key=lambda i: -len(probes[i]))
    return [order[i:i + BATCH] for i in range(0, len(order), BATCH)]


def _forward_all(backend, probes: list[list[int]]) -> tuple[dict, list[float]]:
    """All probes through `backend` as the pipeline's worker does (pad, forward, extract):
    records as "<probe>/<field>" tensors, and seconds per batch."""
    from simmerge_ray.inference.extract import pad_batch, probe_records

    settings, records, seconds = _settings(), {}, []
    for batch in _pipeline_batches(probes):
        start = time.perf_counter()
        ids, mask = pad_batch([probes[i] for i in batch])
        for pid, rec in zip(batch, probe_records(backend.forward(ids, mask), mask, settings)):
            records.update({f"{pid}/{k}": v for k, v in rec.items()})
        seconds.append(time.perf_counter() - start)  # probe_records copies to the CPU: synchronised
    return records, seconds


def _save(scratch: Path, variant: str, records: dict) -> None:
    from safetensors.torch import save_file

    tmp = scratch / f".{variant}.tmp"
    save_file(records, tmp)
    tmp.rename(scratch / f"{variant}.safetensors")  # whole or absent, also when a stage is killed


def _load(scratch: Path, variant: str) -> dict | None:
    from safetensors.torch import load_file

    path = scratch / f"{variant}.safetensors"
    return load_file(path) if path.exists() else None


def _device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    return info


def _timing(seconds: list[float]) -> dict:
    warm = sorted(seconds[1:]) or seconds
    return {"first_batch_s": seconds[0], "warm_batch_median_s": warm[len(warm) // 2], "batches": len(seconds)}


# ---- stages (each in its own process) -------------------------------------------------------

def stage_hf(scratch: Path, out: Path) -> dict:
    """`hf` back-end on whatever device it picks (hf-cpu runs with CUDA hidden): records of a
    warm pass; on CUDA a second set with TF32 matmuls."""
    import torch

    from simmerge_ray.inference.backend import load_backend

    probes, result = _probes(scratch), {"device_info": _device_info()}
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # as an environment with TF32 on would
    start = time.perf_counter()
    backend = load_backend("hf", scratch / "model")
    result["load_s"] = time.perf_counter() - start
    result["device"] = str(backend.device)
    # The back-end pins IEEE float32 matmuls when it loads, whatever the process asked for before
    # (this stage asked for TF32 first): the first pass checks that pin. The second switches TF32
    # on after loading, to measure what it would change (informative rows).
    passes = [(None, "hf-cpu" if backend.device.type == "cpu" else "hf-cuda")]
    if backend.device.type == "cuda":
        passes.append(("high", "hf-cuda-tf32"))
    for precision, variant in passes:
        if precision is not None:
            torch.set_float32_matmul_precision(precision)  # "high" = TF32 matmuls
        _, cold = _forward_all(backend, probes)
        records, warm = _forward_all(backend, probes)
        _save(scratch, variant, records)
        result[variant] = {"matmul_precision": precision or "pinned by the back-end",
                           "cold": _timing(cold), "warm": _timing(warm)}
    return result


def stage_deepspeed(scratch: Path, out: Path) -> dict:
    """`deepspeed` back-end (ZeRO-3, CPU parameter offload, one-rank NCCL or gloo group): import,
    construction (op builds land in TORCH_EXTENSIONS_DIR), first and warm forward passes."""
    import torch

    result: dict = {"device_info": _device_info(),
                    "env": {k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "TORCH_EXTENSIONS_DIR")}}
    start = time.perf_counter()
    import deepspeed

    from simmerge_ray.inference.backend import load_backend

    result["deepspeed"] = deepspeed.__version__
    result["import_s"] = time.perf_counter() - start
    start = time.perf_counter()
    backend = load_backend("deepspeed", scratch / "model")
    result["init_s"] = time.perf_counter() - start
    result["device"] = str(backend.device)
    result["dist_backend"] = torch.distributed.get_backend()
    probes = _probes(scratch)
    _, first = _forward_all(backend, probes)
    records, warm = _forward_all(backend, probes)
    variant = f"ds-{backend.device.type}"
    _save(scratch, variant, records)
    result[variant] = {"first_pass": _timing(first), "warm": _timing(warm)}
    ext = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    result["ops_built"] = sorted(p.name for p in ext.rglob("*.so")) if ext.exists() else []
    torch.distributed.destroy_process_group()
    return result


class GpuProcesses:
    """Samples, in a thread, which processes hold a CUDA context on GPU 0 (NVML), with their
    command lines: the Ray actors that really use the GPU."""

    def __init__(self, period: float = 0.2) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.seen: dict[int, dict] = {}
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period,), daemon=True)
        self._thread.start()

    def _loop(self, period: float) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                    if p.pid not in self.seen:
                        try:
                            cmd = " ".join(psutil.Process(p.pid).cmdline())[:120]
                        except psutil.Error:
                            cmd = "?"
                        self.seen[p.pid] = {"cmdline": cmd, "gpu_mib": 0}
                    self.seen[p.pid]["gpu_mib"] = max(self.seen[p.pid]["gpu_mib"], (p.usedGpuMemory or 0) >> 20)
            except Exception as e:  # NVML answers per call; a failure is reported, sampling goes on
                self.error = f"{type(e).__name__}: {e}"
            self._stop.wait(period)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        actors = {pid: v for pid, v in self.seen.items() if pid != os.getpid()}
        return {"processes": actors, "ray_actor_processes": sum("ray::" in v["cmdline"] for v in actors.values()),
                "error": self.error}


def _sampler() -> GpuProcesses | dict:
    """A running GpuProcesses, or why NVML could not start one."""
    try:
        return GpuProcesses()
    except Exception as e:  # pynvml missing or NVML refused: the comparison with hf cuda still tells
        return {"processes": {}, "ray_actor_processes": None, "error": f"{type(e).__name__}: {e}"}


def stage_ray(scratch: Path, out: Path) -> dict:
    """The probe stage's Ray Data pipeline (`run_model_probes`), with the inference-actor ask set
    as `--gpus-per-inference-actor` sets it: 1 GPU x 1 actor and 0.5 GPU x 2 actors on CUDA,
    no GPU x 1 actor without. Records are read back from the probe cache the actors wrote."""
    import ray
    import torch

    from simmerge_ray import resources
    from simmerge_ray.ray_session import quiet_ray_data
    from simmerge_ray.inference.cache import ProbeCache
    from simmerge_ray.inference.pipeline import run_model_probes
    from simmerge_ray.inference.settings import RunOptions
    from simmerge_ray.probes.tokenize import TokenizedProbes

    cuda = torch.cuda.is_available()
    runs = [("ray-gpu1", "1", 1), ("ray-gpu0.5", "0.5", 2)] if cuda else [("ray-cpu", "0", 1)]
    result: dict = {"ray": ray.__version__, "device_info": _device_info()}
    start = time.perf_counter()
    ctx = ray.init(num_cpus=min(os.cpu_count() or 1, 8), num_gpus=1 if cuda else 0,
                   object_store_memory=1 << 30, include_dashboard=False, logging_level=logging.WARNING)
    result["init_s"] = time.perf_counter() - start
    result["cluster_resources"] = ray.cluster_resources()
    (scratch / "ray_session.txt").write_text(ctx.address_info["session_dir"])  # for clean-up and logs
    quiet_ray_data()
    ids = _probes(scratch)
    probes = TokenizedProbes(tuple(tuple(p) for p in ids), truncated=0, max_length=PROBES["max_length"])
    try:
        for variant, gpus, actors in runs:
            args = argparse.Namespace(gpus_per_inference_actor=gpus, cpus_per_inference_actor="1")
            resources.export(resources.resources_from_flags(args, env={}))  # what the job entry points do
            ask = resources.inference_ask()
            options = RunOptions(num_actors=actors, batch_size=BATCH, cpus_per_actor=ask.num_cpus,
                                 gpus_per_actor=ask.num_gpus)
            cache = ProbeCache(scratch / f"cache-{variant}")
            cache.write_meta({"num_probes": probes.num_probes})
            sampler = _sampler() if cuda else None
            start = time.perf_counter()
            report = run_model_probes(scratch / "model", probes, _settings(), options, cache)
            seconds = time.perf_counter() - start
            gpu = sampler.stop() if isinstance(sampler, GpuProcesses) else sampler
            _save(scratch, variant, {f"{p}/{k}": v for p in range(probes.num_probes) for k, v in cache.record(p).items()})
            result[variant] = {"gpus_per_actor": ask.num_gpus, "actors": actors, "seconds": seconds,
                               "busy_s": report.busy_seconds, "probes_run": report.probes_run, "gpu_processes": gpu}
    finally:
        ray.shutdown()
    return result


STAGE_FUNCS = {"hf-cpu": stage_hf, "hf-cuda": stage_hf, "deepspeed": stage_deepspeed, "ray": stage_ray}


def run_stage_here(name: str, scratch: Path, out: Path) -> int:
    """Entry point of a stage's process: its result (or its error) as scratch/<name>.json."""
    try:
        result = {"status": "ok", **STAGE_FUNCS[name](scratch, out)}
        code = 0
    except BaseException as e:
        result = {"status": "error", "error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                  "traceback": traceback.format_exc()[-3000:]}
        code = 1
    (scratch / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    return code


# ---- orchestration --------------------------------------------------------------------------

def build_testbed(scratch: Path) -> dict:
    """The seeded llama and its tokenizer (the project's testbed helpers) and the probes."""
    from benchmarks.synthetic_lm import make_corpus, make_tiny_lm, train_tokenizer
    from simmerge_ray.probes.tokenize import load_tokenizer, tokenize_probes

    start = time.perf_counter()
    tok = train_tokenizer(make_corpus(300, seed=1))
    model = make_tiny_lm(scratch / "model", tok, **MODEL)
    texts = make_corpus(PROBES["n"], seed=PROBES["seed"], min_words=PROBES["min_words"], max_words=PROBES["max_words"])
    probes = tokenize_probes(texts, load_tokenizer(model), PROBES["max_length"])
    (scratch / "probes.json").write_text(json.dumps([list(p) for p in probes.ids]))
    return {"status": "ok", "seconds": time.perf_counter() - start, "model": MODEL, "probes": probes.num_probes,
            "tokens": probes.num_tokens, "truncated": probes.truncated}


def launch_stage(name: str, scratch: Path, out: Path, timeout: float) -> dict:
    """Run one stage in a new process (own session, killed as a group on timeout)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if name == "hf-cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if name == "deepspeed":
        env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
        env.setdefault("TORCH_EXTENSIONS_DIR", str(scratch / "torch_extensions"))
    print(f"\n=== stage {name} (timeout {timeout:.0f} s) ===", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--stage", name, "--scratch", str(scratch),
                             "--out", str(out)], cwd=REPO, env=env, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
        seconds = time.perf_counter() - start
        path = scratch / f"{name}.json"
        if path.exists():
            result = {**json.loads(path.read_text()), "seconds": seconds}
        else:
            result = {"status": "error", "error": f"stage {name} exited {proc.returncode} without a result",
                      "seconds": seconds}
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        result = {"status": "timeout", "error": f"stage {name} ran past its {timeout:.0f} s", "seconds": timeout}
    if name == "ray" and (scratch / "ray_session.txt").exists():
        session = Path((scratch / "ray_session.txt").read_text())
        if result["status"] != "ok":
            with tarfile.open(out / "ray_logs.tar.gz", "w:gz") as tar:  # the actors' own errors are here
                tar.add(session / "logs", arcname="logs")
        result["leftover_ray_processes_killed"] = end_session_processes(session.name)
    return result


def end_session_processes(session: str) -> int:
    """Kill what is left of the stage's own Ray session (workers run in their own process
    groups, so a timed-out stage's group kill misses them); matched by the session's name."""
    import psutil

    killed = 0
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid != os.getpid() and any(session in arg for arg in p.info["cmdline"] or ()):
            try:
                p.kill()
                killed += 1
            except psutil.Error:
                pass
    return killed


def comparisons(scratch: Path, cuda: bool) -> list[dict]:
    """Every row of ROWS whose records exist (or why it has none)."""
    rows = []
    for row in ROWS:
        entry = {"check": row.name, "variant": row.variant, "reference": row.reference, "tolerance": row.tol_name,
                 "atol": row.tol[0], "rtol": row.tol[1]}
        needs = {row.variant, row.reference}
        if not cuda and needs & CUDA_ONLY:
            rows.append({**entry, "status": "skipped", "note": "no CUDA device"})
            continue
        if cuda and needs & CPU_ONLY:
            continue  # the CPU-host variant of a stage that ran on the GPU here
        got, ref = _load(scratch, row.variant), _load(scratch, row.reference)
        if got is None or ref is None:
            rows.append({**entry, "status": "not run", "note": f"no {row.variant if got is None else row.reference} records"})
            continue
        cmp = compare_records(got, ref, row.tol)
        status = "pass" if cmp["ok"] else ("info" if row.informative else "FAIL")
        rows.append({**entry, **cmp, "status": status})
    return rows


def notes(name: str, r: dict) -> str:
    """One line of what a stage measured."""
    if r.get("status") != "ok":
        return r.get("error", "")
    if name.startswith("hf"):
        parts = [f"load {r['load_s']:.1f}s"]
        parts += [f"{v}: first batch {r[v]['cold']['first_batch_s'] * 1e3:.0f} ms, warm {r[v]['warm']['warm_batch_median_s'] * 1e3:.1f} ms"
                  for v in ("hf-cpu", "hf-cuda", "hf-cuda-tf32") if v in r]
        return "; ".join(parts)
    if name == "deepspeed":
        v = next(k for k in ("ds-cuda", "ds-cpu") if k in r)
        return (f"{r['dist_backend']} on {r['device']}; import {r['import_s']:.1f}s, init {r['init_s']:.1f}s, "
                f"first batch {r[v]['first_pass']['first_batch_s'] * 1e3:.0f} ms, warm {r[v]['warm']['warm_batch_median_s'] * 1e3:.1f} ms; "
                f"ops built: {', '.join(r['ops_built']) or 'none'}")
    if name == "ray":
        parts = [f"init {r['init_s']:.1f}s"]
        for v in ("ray-gpu1", "ray-gpu0.5", "ray-cpu"):
            if v in r:
                g = r[v]["gpu_processes"]
                seen = "" if g is None else f", {g['ray_actor_processes']} actor(s) seen on the GPU by NVML"
                parts.append(f"{v}: {r[v]['seconds']:.1f}s{seen}")
        return "; ".join(parts)
    return ""


def print_table(result: dict) -> None:
    print(f"\nstages on {result['host']['cuda']}")
    print(f"{'stage':<11}{'status':<9}{'seconds':>8}  notes")
    for name, r in result["stages"].items():
        print(f"{name:<11}{r['status']:<9}{r.get('seconds', 0):>8.1f}  {notes(name, r) if name != 'build' else ''}")
    print(f"\n{'check':<36}{'status':<9}{'tol':<5}{'logp':>10}{'hidden':>10}{'attn':>10}{'top1':>7}{'bitwise':>8}")
    for c in result["comparisons"]:
        if "fields" in c:
            d = [f"{c['fields'][f]['max_abs_diff']:>10.2e}" for f in FIELDS]
            print(f"{c['check']:<36}{c['status']:<9}{c['tolerance']:<5}{''.join(d)}{c['top1_agreement']:>7.3f}"
                  f"{'yes' if c['bitwise_equal'] else 'no':>8}")
        else:
            print(f"{c['check']:<36}{c['status']:<9}{c['tolerance']:<5}  {c.get('note') or c.get('error', '')}")
    print("columns: max |a - b| per field over all probes; top1 = share of positions with the same argmax token")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "gpu_check"), help="folder for gpu_check.json")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for all stages together")
    ap.add_argument("--timeout-factor", type=float, default=1.0,
                    help=f"multiply each stage's timeout ({', '.join(f'{k} {v} s' for k, v in TIMEOUTS.items())}) "
                         f"on a slow or shared host")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage here
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        return run_stage_here(args.stage, Path(args.scratch), out)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := sorted(set(stages) - set(STAGES)):
        ap.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")

    import torch

    deadline = time.monotonic() + args.budget
    cuda = torch.cuda.is_available()
    result: dict = {"host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                             "cuda": torch.cuda.get_device_name(0) if cuda else "a host without CUDA",
                             "torch": torch.__version__},
                    "tolerances": {"fp32": FP32, "tf32": TF32}, "stages": {}, "comparisons": []}
    path = out / "gpu_check.json"

    def write() -> None:
        result["comparisons"] = comparisons(scratch, cuda)
        path.write_text(json.dumps(result, indent=2, default=str))

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        scratch = Path(tmp)
        result["stages"]["build"] = build_testbed(scratch)
        print(f"testbed: llama {MODEL}, {result['stages']['build']['probes']} probes, "
              f"{result['stages']['build']['tokens']} tokens ({result['stages']['build']['seconds']:.1f} s)", flush=True)
        write()
        for name in stages:
            left = deadline - time.monotonic()
            if name == "hf-cuda" and not cuda:
                result["stages"][name] = {"status": "skipped", "error": "no CUDA device"}
            elif left < 10:
                result["stages"][name] = {"status": "timeout", "error": f"no time left of --budget {args.budget:.0f} s"}
            else:
                result["stages"][name] = launch_stage(name, scratch, out, min(TIMEOUTS[name] * args.timeout_factor, left))
            write()
    print_table(result)
    print(f"\nwrote {path}")
    bad = [c for c in result["comparisons"] if c["status"] == "FAIL"]
    bad += [r for r in result["stages"].values() if r["status"] in ("error", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
