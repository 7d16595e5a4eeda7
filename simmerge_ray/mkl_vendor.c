/* Preloaded (LD_PRELOAD) into Ray's worker processes on CPUs whose vendor MKL does not recognise
 * (AMD): these two definitions take the place of MKL's vendor checks inside torch, so MKL picks
 * its kernels by the CPU's instruction sets as it does on Intel's, instead of a generic path.
 * Both are needed: with only the second, MKL falls back to its SSE2 kernels. */
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_intel_cpu(void) { return 1; }
