/* A fixed linear combination of one chunk: out = round(sum_i c_i x_i / d), one pass over memory.
 *
 * The executor's linear and task-arithmetic merges (UnitMerger._merge_combination) are this sum.
 * The kernel runs it without torch, so a linear merge never imports torch (3-4 s here), and
 * gives the torch path's bytes: inputs are rounded to the compute dtype first, the first term
 * is a rounded product, every later one a fused multiply-add (torch's add(alpha=c) is an FMA on
 * CPUs that have one; without one both sides round the product), the float32 sum is divided by d
 * when d is not 1 (linear's normalisation, as mergekit's div_), rounded to the compute dtype,
 * then converted to the output dtype (nearest even; NaN to the canonical quiet NaN, as torch).
 * dtype codes: 0 float32, 1 bfloat16, 2 float16.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_INPUTS 64

static inline uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bitsf(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* branch-free, so loops over it vectorise */
static inline uint16_t to_bf16(float f) {
    uint32_t u = fbits(f);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : r);
}

static inline float round_bf16(float f) { return bitsf((uint32_t)to_bf16(f) << 16); }

static inline int is_finite(float f) { return (fbits(f) & 0x7F800000u) != 0x7F800000u; }

/* f rounded to fp16, as a float32 value */
static inline float round_f16(float f) { return (float)(_Float16)f; }

static inline float mul_add(float x, float c, float acc) {
#ifdef __FMA__
    return fmaf(x, c, acc);
#else
    return acc + x * c;
#endif
}

/* acc[b] = x[b] * c (first) or fma(x[b], c, acc[b]) over one block, x rounded to `compute`
 * first when `rnd`. Every branch sits outside its element loop, so each loop vectorises. */
#define TERM_LOOPS(LOAD)                                                                          \
    if (rnd == 1 && first) for (int64_t b = 0; b < m; b++) acc[b] = round_bf16(LOAD) * c;         \
    else if (rnd == 1) for (int64_t b = 0; b < m; b++) acc[b] = mul_add(round_bf16(LOAD), c, acc[b]); \
    else if (rnd == 2 && first) for (int64_t b = 0; b < m; b++) acc[b] = round_f16(LOAD) * c;     \
    else if (rnd == 2) for (int64_t b = 0; b < m; b++) acc[b] = mul_add(round_f16(LOAD), c, acc[b]); \
    else if (first) for (int64_t b = 0; b < m; b++) acc[b] = (LOAD) * c;                          \
    else for (int64_t b = 0; b < m; b++) acc[b] = mul_add(LOAD, c, acc[b]);

/* rnd: 0 none, else the compute dtype the input is rounded to */
static void term(float *restrict acc, const void *x, int64_t m, int dtype, float c, int first, int rnd) {
    if (dtype == 1) { const uint16_t *restrict p = x; TERM_LOOPS(bitsf((uint32_t)p[b] << 16)) }
    else if (dtype == 2) { const _Float16 *restrict p = x; TERM_LOOPS((float)p[b]) }
    else { const float *restrict p = x; TERM_LOOPS(p[b]) }
}

/* out[b] = acc[b] / divisor rounded to `compute`, then converted to `out_dtype`; acc[b] = what
 * was written */
static void store(float *restrict acc, void *out, int64_t m, float divisor, int compute, int out_dtype) {
    if (divisor != 1.0f)
        for (int64_t b = 0; b < m; b++) acc[b] = acc[b] / divisor;
    if (compute == 1)
        for (int64_t b = 0; b < m; b++) acc[b] = round_bf16(acc[b]);
    else if (compute == 2)
        for (int64_t b = 0; b < m; b++) acc[b] = round_f16(acc[b]);
    if (out_dtype == 1) {
        uint16_t *restrict o = out;
        for (int64_t b = 0; b < m; b++) { o[b] = to_bf16(acc[b]); acc[b] = bitsf((uint32_t)o[b] << 16); }
    } else if (out_dtype == 2) {
        _Float16 *restrict o = out;
        for (int64_t b = 0; b < m; b++) { o[b] = (_Float16)acc[b]; acc[b] = (float)o[b]; }
    } else {
        memcpy(out, acc, (size_t)m * 4);
    }
}

#define BLOCK 1024

static inline const void *at(const void *p, int dtype, int64_t j) {
    return (const char *)p + j * (dtype == 0 ? 4 : 2);
}

/* Returns the number of non-finite output values (0 when check is 0), or -1 for a bad call;
 * *first gets the index of the first one. in_round: round each input to `compute` before use
 * when its stored dtype is another (compute is a half-precision dtype). */
int64_t combine(int n, const int *in_dtypes, const void *const *xs, const float *coeffs, float divisor, int64_t k,
                int compute, int in_round, int out_dtype, void *out, int check, int64_t *first) {
    if (n < 1 || n > MAX_INPUTS) return -1;
    float acc[BLOCK] __attribute__((aligned(64)));
    int64_t bad = 0;
    *first = -1;
    for (int64_t j0 = 0; j0 < k; j0 += BLOCK) {
        int64_t m = k - j0 < BLOCK ? k - j0 : BLOCK;
        for (int i = 0; i < n; i++)
            term(acc, at(xs[i], in_dtypes[i], j0), m, in_dtypes[i], coeffs[i], i == 0,
                 in_round && in_dtypes[i] != compute ? compute : 0);
        store(acc, (char *)out + j0 * (out_dtype == 0 ? 4 : 2), m, divisor, compute, out_dtype);
        if (check) {
            int64_t block_bad = 0;
            for (int64_t b = 0; b < m; b++) block_bad += !is_finite(acc[b]);
            if (block_bad && bad == 0)
                for (int64_t b = 0; b < m; b++)
                    if (!is_finite(acc[b])) { *first = j0 + b; break; }
            bad += block_bad;
        }
    }
    return bad;
}
