"""C kernels built on first use with the system compiler, cached, and loaded through ctypes.

Each kernel (features/gram_kernel.c, merge/operators/ties_kernel.c and combine_kernel.c) is
compiled for the host CPU once per (source, compiler, flags, CPU) into `SIMMERGE_KERNEL_DIR` (default
~/.cache/simmerge_ray/kernels), written beside its final name and renamed, so concurrent first
uses never load a half-written file. Without a compiler, or when its switch variable is "0",
`load_library` returns None and callers use their torch path, which gives the same numbers.

One library is not a kernel: mkl_vendor.c, preloaded into a local Ray's processes on CPUs whose
vendor MKL's dispatch does not recognise (`mkl_vendor_preload`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def kernel_dir() -> Path:
    if os.environ.get("SIMMERGE_KERNEL_DIR"):
        return Path(os.environ["SIMMERGE_KERNEL_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "simmerge_ray" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(source: Path, flags: tuple[str, ...], cc: str) -> Path:
    """Compile `source` into the cache, keyed by everything the binary depends on."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.blake2b("\0".join([source.read_text(), cc, version, " ".join(flags), platform.machine(),
                                     _cpu_flags()]).encode(), digest_size=12).hexdigest()
    target = kernel_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(source), "-o", tmp], capture_output=True, text=True, check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library(source: Path, flags: tuple[str, ...], switch: str, fallback: str) -> ctypes.CDLL | None:
    """The compiled `source`, or None when `switch` is "0" or it cannot be built (logged, naming
    `fallback`, what runs instead)."""
    if os.environ.get(switch, "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler found: %s", fallback)
        return None
    try:
        return ctypes.CDLL(str(build(source, flags, cc)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("cannot build %s (%s): %s", source, detail, fallback)
        return None


MKL_VENDOR_SOURCE = Path(__file__).with_name("mkl_vendor.c")
MKL_VENDOR_SWITCH = "SIMMERGE_MKL_VENDOR"


def mkl_vendor_preload() -> str | None:
    """The library to put in LD_PRELOAD so that torch's MKL dispatches by instruction set on this
    CPU, or None where it would change nothing (MKL already recognises the CPU, torch's BLAS is
    not MKL, no compiler) or SIMMERGE_MKL_VENDOR is "0".

    torch's CPU wheels link MKL, which runs a generic path on CPUs it does not take for Intel's:
    on the 2-core AMD EPYC machines (AVX-512) the default zoo's llama trained 10-19% and ran
    inference 12% faster with the library preloaded (MKL's AVX-512 kernels; numbers in README,
    Performance). The bytes a training gives change with the kernels (as they differ between
    Intel CPUs of different instruction sets), not its accuracy."""
    if os.environ.get(MKL_VENDOR_SWITCH, "1") == "0":
        return None
    import torch

    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        check = lib.mkl_serv_intel_cpu_true
    except (OSError, AttributeError):  # not MKL, or not linked this way: nothing to do
        return None
    if check() == 1:
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler found: MKL keeps its generic kernels on this CPU")
        return None
    try:
        return str(build(MKL_VENDOR_SOURCE, ("-shared", "-fPIC", "-O2"), cc))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("cannot build %s (%s): MKL keeps its generic kernels on this CPU", MKL_VENDOR_SOURCE,
                    getattr(e, "stderr", "") or e)
        return None


@contextmanager
def mkl_vendor_preloaded() -> Iterator[None]:
    """Inside, `mkl_vendor_preload()` comes first in LD_PRELOAD: the processes started there (a
    local Ray's node, whose workers it starts later with its own environment, and they run the
    training and inference) load it. This process, whose torch is already loaded, and what it
    starts afterwards are unchanged."""
    path = mkl_vendor_preload()
    before = os.environ.get("LD_PRELOAD")
    if path and path not in (before or "").split(":"):
        os.environ["LD_PRELOAD"] = f"{path}:{before}" if before else path
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = before
