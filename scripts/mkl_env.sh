# Sourced by demo.sh and test.sh after setup.sh: on CPUs whose vendor torch's MKL does not
# recognise (AMD), every process of the run preloads simmerge_ray/mkl_vendor.c, so MKL takes its
# kernels for the CPU's instruction set (see simmerge_ray/mkl_vendor.py; SIMMERGE_MKL_VENDOR=0: not).
mkl_vendor=$(.venv/bin/python -m simmerge_ray.mkl_vendor)
if [ -n "$mkl_vendor" ]; then
  export LD_PRELOAD="$mkl_vendor${LD_PRELOAD:+:$LD_PRELOAD}"
fi
unset mkl_vendor
