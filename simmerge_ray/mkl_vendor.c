/* Preloaded (LD_PRELOAD) into every process of the demo and the tests on CPUs whose vendor MKL
 * does not recognise (AMD): these definitions take the place of MKL's vendor checks inside torch,
 * so MKL picks its kernels by the CPU's instruction sets, as on Intel's, instead of its generic
 * path. The second alone is worse than neither (MKL then takes its SSE2 kernels); the two
 * together give the instruction set's. */
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_intel_cpu(void) { return 1; }
