/* TIES and kin on one chunk, fused: the magnitude histograms and the masked, sign-elected mean
 * in one pass over memory each, instead of twenty torch sweeps.
 *
 * Every intermediate is rounded to the compute dtype exactly where torch's op-by-op arithmetic
 * in that dtype rounds it (torch computes a bf16 op in float32 and rounds the result to nearest
 * even), so the bytes equal the torch path's (task_arithmetic.combine, magnitude_select) and
 * mergekit's. Built with -ffp-contract=off: no fused multiply-adds the torch path does not do.
 * Work goes in blocks of BLOCK elements with branch-free arithmetic, so the compiler vectorises
 * it; only a block where a model still keeps values tied at its threshold takes a scalar loop.
 * dtype: 0 float32, 1 bfloat16.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_MODELS 16
#define BLOCK 512

static inline uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bitsf(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* round to bf16, nearest even, NaN to the canonical quiet NaN (as torch), as a float32 value */
static inline float rnd16(float f) {
    uint32_t u = fbits(f);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return bitsf((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC00000u : r);
}

static inline float rnd(float f, int bf16) { return bf16 ? rnd16(f) : f; }

static inline float load(const void *p, int64_t j, int bf16) {
    return bf16 ? bitsf((uint32_t)((const uint16_t *)p)[j] << 16) : ((const float *)p)[j];
}

static inline __attribute__((always_inline)) void hist_impl(int bf16, int n, const void **xs, const void *base, int64_t k, const int *active,
                             int64_t *hist) {
    uint32_t key[BLOCK];
    for (int i = 0; i < n; i++) {
        if (!active[i]) continue;
        int64_t *h = hist + (int64_t)i * 65536;
        for (int64_t j0 = 0; j0 < k; j0 += BLOCK) {
            int m = k - j0 < BLOCK ? (int)(k - j0) : BLOCK;
            for (int t = 0; t < m; t++)
                key[t] = (fbits(rnd(load(xs[i], j0 + t, bf16) - load(base, j0 + t, bf16), bf16)) & 0x7FFFFFFFu) >> 16;
            for (int t = 0; t < m; t++) h[key[t]]++;
        }
    }
}

/* Histogram pass: for each model i with active[i], the 16-bit key of |round(x_i - base)| (bf16:
 * its bits; float32: its top 16 bits) is counted in hist[i * 65536 + key]. */
void ties_hist(int dtype, int n, const void **xs, const void *base, int64_t k, const int *active, int64_t *hist) {
    if (dtype == 1) hist_impl(1, n, xs, base, k, active, hist);
    else hist_impl(0, n, xs, base, k, active, hist);
}

/* float32's second pass: low 16 bits of |x_i - base| inside model i's bucket bucket[i] (-1: none). */
void ties_hist_low(int n, const float **xs, const float *base, int64_t k, const int *bucket, int64_t *low) {
    for (int i = 0; i < n; i++) {
        if (bucket[i] < 0) continue;
        int64_t *h = low + (int64_t)i * 65536;
        uint32_t want = (uint32_t)bucket[i];
        for (int64_t j = 0; j < k; j++) {
            uint32_t b = fbits(xs[i][j] - base[j]) & 0x7FFFFFFFu;
            if ((b >> 16) == want) h[b & 0xFFFFu]++;
        }
    }
}

static inline __attribute__((always_inline)) void merge_impl(int bf16, int n, const void **xs, const void *base, int64_t k, const int *masked,
                              const float *thr, int64_t *ties_left, const float *w, int consensus, int normalize,
                              float total_w, float lam, void *out) {
    float wd[MAX_MODELS][BLOCK], bb[BLOCK], s[BLOCK], e[BLOCK], total[BLOCK], div[BLOCK];
    for (int64_t j0 = 0; j0 < k; j0 += BLOCK) {
        int m = k - j0 < BLOCK ? (int)(k - j0) : BLOCK;
        for (int t = 0; t < m; t++) bb[t] = load(base, j0 + t, bf16);
        for (int i = 0; i < n; i++) {
            float *d = wd[i];
            for (int t = 0; t < m; t++) d[t] = rnd(load(xs[i], j0 + t, bf16) - bb[t], bf16);
            if (masked[i] && ties_left[i] > 0) {  /* ties at the threshold still kept: index order */
                for (int t = 0; t < m; t++) {
                    float a = fabsf(d[t]);
                    int keep = a > thr[i];
                    if (!keep && a == thr[i] && ties_left[i] > 0) { keep = 1; ties_left[i]--; }
                    d[t] = keep ? d[t] : d[t] * 0.0f;  /* as delta * mask: a dropped negative value is -0 */
                }
            } else if (masked[i]) {
                float th = thr[i];
                for (int t = 0; t < m; t++) d[t] *= (float)(fabsf(d[t]) > th);  /* delta * mask */
            }
            float wi = w[i];
            for (int t = 0; t < m; t++) d[t] = rnd(d[t] * wi, bf16);
            if (i == 0) for (int t = 0; t < m; t++) s[t] = d[t];
            else for (int t = 0; t < m; t++) s[t] += d[t];
        }
        for (int t = 0; t < m; t++) s[t] = rnd(s[t], bf16);
        if (consensus) {
            for (int t = 0; t < m; t++) {
                e[t] = s[t] != s[t] ? s[t] : (s[t] >= 0.0f ? 1.0f : -1.0f);
                total[t] = 0.0f;
                div[t] = 0.0f;
            }
            for (int i = 0; i < n; i++) {
                float wi = w[i];
                const float *d = wd[i];
                for (int t = 0; t < m; t++) {
                    float p = d[t] * e[t];
                    p = p < 0.0f ? 0.0f : p;
                    total[t] += p;
                    div[t] += wi * (p > 0.0f ? 1.0f : 0.0f);
                }
            }
            for (int t = 0; t < m; t++) {
                float mixed = rnd(total[t] * e[t], bf16);
                float dv = rnd(div[t], bf16);
                if (normalize) {
                    dv = dv == 0.0f ? 1.0f : dv;
                    mixed = rnd(mixed / dv, bf16);
                }
                s[t] = mixed;
            }
        } else if (normalize) {
            for (int t = 0; t < m; t++) s[t] = rnd(s[t] / total_w, bf16);
        }
        if (lam != 1.0f)
            for (int t = 0; t < m; t++) s[t] = rnd(s[t] * lam, bf16);
        if (bf16) {
            uint16_t *o = (uint16_t *)out + j0;
            for (int t = 0; t < m; t++) o[t] = (uint16_t)(fbits(rnd16(s[t] + bb[t])) >> 16);
        } else {
            float *o = (float *)out + j0;
            for (int t = 0; t < m; t++) o[t] = s[t] + bb[t];
        }
    }
}

/* The merge pass. Model i keeps |d| > thr[i] plus, in index order, ties_left[i] values equal to it
 * (masked[i] = 0: no mask); then weights w (already rounded to the dtype), the sign election
 * (consensus), the normalisation by the agreeing weights or by total_w, lambda, and the base.
 * Writes the result in the compute dtype to out. Returns 0, or -1 for too many models. */
int ties_merge(int dtype, int n, const void **xs, const void *base, int64_t k, const int *masked,
               const float *thr, int64_t *ties_left, const float *w, int consensus, int normalize,
               float total_w, float lam, void *out) {
    if (n > MAX_MODELS) return -1;
    if (dtype == 1) merge_impl(1, n, xs, base, k, masked, thr, ties_left, w, consensus, normalize, total_w, lam, out);
    else merge_impl(0, n, xs, base, k, masked, thr, ties_left, w, consensus, normalize, total_w, lam, out);
    return 0;
}
