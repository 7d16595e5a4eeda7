"""MKL's vendor check, taken out of the way on CPUs it does not take for Intel's.

torch's CPU wheels link MKL, which runs a generic path on CPUs it does not recognise (AMD's). A
process that has mkl_vendor.c in its global symbol scope before torch loads gets MKL's kernels for
its instruction set instead: on a 2-core AMD EPYC with AVX-512 the default zoo's llama trained
14-20% and scored 24% faster (benchmarks/bench_mkl_vendor.py; README, Performance). Every process
of a run must have it or none (a Ray worker and its driver must compute the same bytes), so it
goes to whole process trees: `scripts/mkl_env.sh` (sourced by the demo and test scripts) exports
it in LD_PRELOAD; `simmerge` takes it for itself when started without (`activate`), exports it to
the processes it starts (a local Ray's workers), and has the workers of a cluster it joins take it
too (`worker_runtime_env`), so that nodes started without it compute as their driver does.
Results change in their last bits with the kernels, as they do between Intel CPUs of different
instruction sets.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

from simmerge_ray.native import build_library, cpu_vendor

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("mkl_vendor.c")
SWITCH = "SIMMERGE_MKL_VENDOR"  # "0": no preload
# What a worker of a cluster runs as it starts, before any task: Ray's worker_process_setup_hook,
# named through the variable Ray sets for it (tests check the name), since Ray drops the
# runtime_env field for Ray Client drivers (ray://).
WORKER_HOOK = f"{__name__}.activate_worker"
HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"


def mkl_vendor_preload() -> str | None:
    """The absolute path of the library to preload, or None where it would change nothing (an
    Intel CPU, or not x86), cannot be built (no compiler), could not be preloaded (a path with a
    space or a colon, which LD_PRELOAD separates on) or SWITCH is "0". Where torch's BLAS is not
    MKL the library is offered but answers nobody. Never raises: it is an optimisation. Does not
    import torch (which must load after the library to see it)."""
    if os.environ.get(SWITCH, "1") == "0" or cpu_vendor() in (None, "GenuineIntel"):
        return None
    try:
        return _build()
    except Exception as e:  # noqa: BLE001 - whatever fails here, the run goes on without it
        log.warning("MKL keeps its generic kernels on this CPU (%s: %s)", type(e).__name__, e)
        return None


def active() -> bool:
    """Whether this process has the library loaded (preloaded, or through `activate`)."""
    try:
        return f"/{SOURCE.stem}-" in Path("/proc/self/maps").read_text()  # the cached mkl_vendor-<key>.so
    except OSError:
        return False


def activate() -> str | None:
    """Load the library into this process's global symbol scope, where it answers MKL's vendor
    check as a preload does, and export it in LD_PRELOAD for the processes this one starts. Must
    run before torch loads (MKL binds its check then): `simmerge` calls it first thing, and a
    cluster's workers as they start (WORKER_HOOK). Returns the path, or None where nothing was
    done: already active, torch already imported (logged), or `mkl_vendor_preload` offers
    nothing. Never raises."""
    if active():
        return None
    path = mkl_vendor_preload()
    if path is None:
        return None
    if "torch" in sys.modules:
        log.debug("torch was imported before simmerge_ray.mkl_vendor.activate: MKL keeps its generic kernels "
                  "in this process")
        return None
    try:
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    except OSError as e:
        log.warning("cannot load %s (%s): MKL keeps its generic kernels on this CPU", path, e)
        return None
    before = os.environ.get("LD_PRELOAD")
    os.environ["LD_PRELOAD"] = f"{path}:{before}" if before else path
    return path


def activate_worker() -> None:
    """WORKER_HOOK: `activate` in a Ray worker as it starts; one line (streamed to the driver)
    where it cannot, on a CPU where its driver dispatches by instruction set."""
    activate()
    if cpu_vendor() in (None, "GenuineIntel") or active():
        return
    why = ("torch was imported before the hook" if "torch" in sys.modules
           else f"{SWITCH}=0 on this node" if os.environ.get(SWITCH) == "0"
           else "the library was not built or loaded (the line above says why)")
    log.warning("this Ray worker (pid %d) keeps MKL's generic kernels: %s; its driver uses its instruction set's, "
                "so their results differ in the last bits", os.getpid(), why)


def worker_runtime_env() -> dict[str, dict[str, str]] | None:
    """The runtime_env with which a driver joins a cluster, so that workers on nodes started
    without the library take it as they start, as this process did or as MKL does on an Intel
    CPU (None: SWITCH is "0", MKL keeps its generic kernels here, or the job already names a
    setup hook, which Ray would refuse to merge with ours: said in one line)."""
    if os.environ.get(SWITCH, "1") == "0" or not (active() or cpu_vendor() == "GenuineIntel"):
        return None
    if "worker_process_setup_hook" in os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "").lower():
        log.warning("the job names its own worker setup hook: its workers keep the MKL kernels their nodes were "
                    "started with (source scripts/mkl_env.sh before `ray start` on AMD nodes)")
        return None
    return {"env_vars": {HOOK_ENV: WORKER_HOOK}}


def libtorch_cpu() -> ctypes.CDLL:
    """torch's CPU library, where MKL is linked (its dispatch: `mkl_serv_cpu_detect()`, 0 for the
    generic path). Raises OSError where it is not there, AttributeError on a missing function."""
    import torch

    return ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))


def _build() -> str | None:
    path = build_library(SOURCE, ("-shared", "-fPIC", "-O2"), SWITCH, "MKL keeps its generic kernels on this CPU")
    if path is None:
        return None
    path = path.resolve()
    if any(c in str(path) for c in " :"):
        log.warning("%s: LD_PRELOAD cannot name a path with a space or a colon; MKL keeps its generic kernels "
                    "(set SIMMERGE_KERNEL_DIR to another folder)", path)
        return None
    return str(path)


if __name__ == "__main__":
    print(mkl_vendor_preload() or "")
