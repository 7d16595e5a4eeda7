"""C kernels built on first use with the system compiler, cached, and loaded through ctypes.

Each kernel (features/gram_kernel.c, merge/operators/ties_kernel.c and combine_kernel.c) is
compiled for the host CPU once per (source, compiler, flags, CPU) into `SIMMERGE_KERNEL_DIR` (default
~/.cache/simmerge_ray/kernels), written beside its final name and renamed, so concurrent first
uses never load a half-written file. Without a compiler, or when its switch variable is "0",
`load_library` returns None and callers use their torch path, which gives the same numbers.
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


def cpu_vendor() -> str | None:
    """The x86 CPU's vendor string (`GenuineIntel`, `AuthenticAMD`, ...); None on other machines."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


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


def compiler() -> str | None:
    """The C compiler to build with: $CC, else cc or gcc on the PATH; None without one."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_library(source: Path, flags: tuple[str, ...], switch: str, fallback: str) -> Path | None:
    """The compiled `source` (its cached file), or None when `switch` is "0" or it cannot be built
    (logged, naming `fallback`, what runs instead)."""
    if os.environ.get(switch, "1") == "0":
        return None
    cc = compiler()
    if cc is None:
        log.warning("no C compiler found: %s", fallback)
        return None
    try:
        return build(source, flags, cc)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("cannot build %s (%s): %s", source, detail, fallback)
        return None


def load_library(source: Path, flags: tuple[str, ...], switch: str, fallback: str) -> ctypes.CDLL | None:
    """`build_library`'s file loaded, or None (logged) where it is not built or does not load."""
    path = build_library(source, flags, switch, fallback)
    if path is None:
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        log.warning("cannot build %s (%s): %s", source, e, fallback)
        return None
