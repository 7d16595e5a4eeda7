# Sourced by demo.sh and test.sh after setup.sh (or by you, from any folder, before Python that
# uses simmerge_ray as a library, or `ray start`): on CPUs whose vendor torch's MKL does not recognise (AMD),
# every process started from this shell preloads simmerge_ray/mkl_vendor.c, so MKL takes its
# kernels for the CPU's instruction set (see simmerge_ray/mkl_vendor.py; SIMMERGE_MKL_VENDOR=0: not).
# It asks the repository's .venv python (else ${PYTHON:-python3}), and keeps
# what LD_PRELOAD held.
mkl_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkl_python="$mkl_repo/.venv/bin/python"
[ -x "$mkl_python" ] || mkl_python=${PYTHON:-python3}
mkl_vendor=$(cd "$mkl_repo" && "$mkl_python" -m simmerge_ray.mkl_vendor)
if [ -n "$mkl_vendor" ] && [[ ":${LD_PRELOAD:-}:" != *":$mkl_vendor:"* ]]; then
  export LD_PRELOAD="$mkl_vendor${LD_PRELOAD:+:$LD_PRELOAD}"
fi
unset mkl_repo mkl_python mkl_vendor
