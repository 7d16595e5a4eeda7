/* Fused Gram-pass kernel: one pass over a chunk of R rows (stored dtype) computes the
 * reference-centred Gram columns and the sign-agreement counts of the task vectors.
 *
 * Why a kernel: done as separate torch/numpy steps, the pass converts, centres, multiplies and
 * counts signs in four sweeps over memory, and the skinny (R x k)(k x C) product runs far from
 * peak. Here every value is converted and centred once into an L1-sized block, and the products
 * and sign counts of that block are taken while it is still in cache.
 *
 * Two precisions, chosen per call:
 *  - float64: centred values are differences of stored values formed in float64 (exact for
 *    bf16/f16/f32 inputs), products of bf16 differences are exact, sums are float64.
 *  - float32: values, differences and products in float32, summed in float32 over blocks of
 *    BLK columns and in float64 across blocks (relative error ~1e-7 per entry); twice the
 *    arithmetic throughput.
 * Sign counts are exact integers in both. Portable C with GCC vector extensions; AVX
 * intrinsics only for the sign masks.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F64 = 2 };
enum { BLK = 256, WORDS = BLK / 64, TILE = 3, MAXR = 510 };

typedef double v4d __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef double v4du __attribute__((vector_size(32), aligned(8))); /* tile sums kept in scratch */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- per-precision block helpers, written once ------------------------------------------ */

static inline v4d ld4d(const double *p) { v4d v; memcpy(&v, p, sizeof v); return v; }
static inline v8f ld8f(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline v4d keep4d(v4d v) { return v; }

/* The block's float32 lane sums, widened and folded into float64 lanes. */
static inline v4d widen8f(v8f v) {
    v4f lo = __builtin_shufflevector(v, v, 0, 1, 2, 3), hi = __builtin_shufflevector(v, v, 4, 5, 6, 7);
    return __builtin_convertvector(lo, v4d) + __builtin_convertvector(hi, v4d);
}

/*
 * BLOCK_HELPERS(SUF, T, VT, LANES, LD, WIDEN) defines, for element type T in vectors VT of LANES:
 *  - load_SUF: a row's values of columns [off, off + n) in T, minus the reference row's when
 *    `ref` is given; the tail of the block is padded with zeros (no products, no signs).
 *  - tile_SUF: one 3 x 3 tile of products over the block, acc[3a + b] += <z[ri[a]], z[cj[b]]>
 *    lane-wise (lanes are summed once per call, not once per block). On the diagonal
 *    (ri == cj) the three products below it are skipped: the caller reads the upper triangle.
 */
#define BLOCK_HELPERS(SUF, T, VT, LANES, LD, WIDEN)                                                     \
    static void load_##SUF(void *dst_, const void *src, int dt, int64_t off, int n, const void *ref_) {   \
        T *dst = dst_;                                                                                  \
        const T *ref = ref_;                                                                            \
        int i = 0;                                                                                      \
        if (dt == DT_BF16) {                                                                            \
            const uint16_t *s = (const uint16_t *)src + off;                                            \
            if (ref) for (; i < n; i++) dst[i] = (T)bf16_to_f32(s[i]) - ref[i];                         \
            else for (; i < n; i++) dst[i] = bf16_to_f32(s[i]);                                        \
        } else if (dt == DT_F32) {                                                                      \
            const float *s = (const float *)src + off;                                                  \
            if (ref) for (; i < n; i++) dst[i] = (T)s[i] - ref[i];                                      \
            else for (; i < n; i++) dst[i] = s[i];                                                      \
        } else {                                                                                        \
            const double *s = (const double *)src + off;                                                \
            if (ref) for (; i < n; i++) dst[i] = (T)s[i] - ref[i];                                      \
            else for (; i < n; i++) dst[i] = (T)s[i];                                                   \
        }                                                                                               \
        for (; i < BLK; i++) dst[i] = 0;                                                                \
    }                                                                                                   \
    static inline __attribute__((always_inline)) void tile_##SUF##_in(const T *z, const int *ri,          \
                                                                      const int *cj, v4du *acc,           \
                                                                      const int diag) {                   \
        const T *a0 = z + ri[0] * BLK, *a1 = z + ri[1] * BLK, *a2 = z + ri[2] * BLK;                    \
        const T *b0 = z + cj[0] * BLK, *b1 = z + cj[1] * BLK, *b2 = z + cj[2] * BLK;                    \
        VT s00 = {0}, s01 = {0}, s02 = {0}, s10 = {0}, s11 = {0}, s12 = {0}, s20 = {0}, s21 = {0},       \
           s22 = {0};                                                                                   \
        for (int c = 0; c < BLK; c += LANES) {                                                          \
            VT x0 = LD(a0 + c), x1 = LD(a1 + c), x2 = LD(a2 + c);                                       \
            VT y0 = diag ? x0 : LD(b0 + c), y1 = diag ? x1 : LD(b1 + c), y2 = diag ? x2 : LD(b2 + c);   \
            s00 += x0 * y0; s01 += x0 * y1; s02 += x0 * y2;                                             \
            s11 += x1 * y1; s12 += x1 * y2;                                                             \
            s22 += x2 * y2;                                                                             \
            if (!diag) { s10 += x1 * y0; s20 += x2 * y0; s21 += x2 * y1; }                              \
        }                                                                                               \
        acc[0] += WIDEN(s00); acc[1] += WIDEN(s01); acc[2] += WIDEN(s02);                               \
        acc[4] += WIDEN(s11); acc[5] += WIDEN(s12);                                                     \
        acc[8] += WIDEN(s22);                                                                           \
        if (!diag) { acc[3] += WIDEN(s10); acc[6] += WIDEN(s20); acc[7] += WIDEN(s21); }                \
    }                                                                                                   \
    static void tile_##SUF(const void *z, const int *ri, const int *cj, v4du *acc, int diag) {           \
        if (diag) tile_##SUF##_in(z, ri, cj, acc, 1);                                                   \
        else tile_##SUF##_in(z, ri, cj, acc, 0);                                                        \
    }

BLOCK_HELPERS(f64, double, v4d, 4, ld4d, keep4d)
BLOCK_HELPERS(f32, float, v8f, 8, ld8f, widen8f)

/* MASK_HELPERS(SUF, T, P, VEC, LANES) defines masks_SUF: the sign masks of one block row, bit b of
 * word w set where the value is nonzero (nz), and where its sign bit is set (sg; meaningful only
 * where nz). P is the intrinsics' suffix (pd, ps) and VEC their vector type. */
#ifdef __AVX__
#define MASK_WORD(T, P, VEC, LANES)                                                                     \
    const VEC zero = _mm256_setzero_##P();                                                              \
    for (int b = 0; b < 64; b += LANES) {                                                               \
        VEC v = _mm256_loadu_##P(zw + b);                                                               \
        p |= (uint64_t)_mm256_movemask_##P(_mm256_cmp_##P(v, zero, _CMP_NEQ_UQ)) << b;                  \
        q |= (uint64_t)_mm256_movemask_##P(v) << b;                                                     \
    }
#else
#define MASK_WORD(T, P, VEC, LANES)                                                                     \
    for (int b = 0; b < 64; b++) {                                                                      \
        p |= (uint64_t)(zw[b] != 0) << b;                                                               \
        q |= (uint64_t)(zw[b] < 0) << b;                                                                \
    }
#endif
#define MASK_HELPERS(SUF, T, P, VEC, LANES)                                                             \
    static void masks_##SUF(const void *z_, uint64_t *nz, uint64_t *sg) {                               \
        const T *z = z_;                                                                                \
        for (int w = 0; w < WORDS; w++) {                                                               \
            uint64_t p = 0, q = 0;                                                                      \
            const T *zw = z + 64 * w;                                                                   \
            MASK_WORD(T, P, VEC, LANES)                                                                 \
            nz[w] = p;                                                                                  \
            sg[w] = q;                                                                                  \
        }                                                                                               \
    }

MASK_HELPERS(f64, double, pd, __m256d, 4)
MASK_HELPERS(f32, float, ps, __m256, 8)

/* The hot case fused: a full block of bf16 values, centred in float32, and its sign masks taken
 * while the values are in registers (instead of a second sweep through masks_f32). */
static int load_masks_bf16_f32(float *dst, const void *src, int64_t off, const float *ref, uint64_t *nz,
                               uint64_t *sg) {
#ifdef __AVX2__
    const uint16_t *s = (const uint16_t *)src + off;
    const __m256 zero = _mm256_setzero_ps();
    for (int w = 0; w < WORDS; w++) {
        uint64_t p = 0, q = 0;
        for (int b = 0; b < 64; b += 8) {
            const int c = 64 * w + b;
            __m128i h = _mm_loadu_si128((const __m128i *)(s + c));
            __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            __m256 zv = _mm256_sub_ps(v, _mm256_loadu_ps(ref + c));
            _mm256_storeu_ps(dst + c, zv);
            p |= (uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(zv, zero, _CMP_NEQ_UQ)) << b;
            q |= (uint64_t)_mm256_movemask_ps(zv) << b;
        }
        nz[w] = p;
        sg[w] = q;
    }
    return 1;
#else
    (void)dst; (void)src; (void)off; (void)ref; (void)nz; (void)sg;
    return 0;
#endif
}

/* ---- the pass over one chunk -------------------------------------------------------------- */

typedef struct {
    size_t esize;
    void (*load)(void *, const void *, int, int64_t, int, const void *);
    void (*tile)(const void *, const int *, const int *, v4du *, int);
    void (*masks)(const void *, uint64_t *, uint64_t *);
} block_ops;

static const block_ops OPS_F64 = {sizeof(double), load_f64, tile_f64, masks_f64};
static const block_ops OPS_F32 = {sizeof(float), load_f32, tile_f32, masks_f32};

/*
 * rows[R]: pointers to each row's data, dtypes[R] their DT_* codes, k values each.
 * ref: the reference row (kept raw; every other row is centred on it).
 * cols[C]: the Gram columns wanted; all_cols says cols == 0..R-1, and then only entries on or
 * above the diagonal are maintained (the caller mirrors them). gram (R x C, row-major) is
 * accumulated into (+=).
 * When signed_ != 0, agree/disagree (R x C int64) accumulate the coordinates where the task
 * vectors of rows i and cols[c] have the same / opposite strict sign (the reference row has
 * no task vector and counts nothing).
 * f32: nonzero for the float32 precision. scratch: (R_pad + 1) * BLK + 4 * R_pad * C_pad doubles,
 * R_pad and C_pad being R and C rounded up to a multiple of 3; masks: 2 * R * WORDS uint64.
 * Returns 0, or -1 on a bad layout.
 */
static inline __attribute__((always_inline)) int gram_chunk_in(
        int R, const void *const *rows, const int *dtypes, int64_t k, int ref, int C, const int *cols,
        int all_cols, int signed_, const int f32, double *gram, int64_t *agree, int64_t *disagree,
        void *scratch, uint64_t *masks) {
    const block_ops *ops = f32 ? &OPS_F32 : &OPS_F64; /* a constant in each caller: calls inline */
    const size_t row_bytes = ops->esize * BLK;
    char *z = scratch;
    const int rpad = (R + TILE - 1) / TILE * TILE;
    const int zero_row = rpad; /* an all-zero row pads tiles at the edges */
    const int cpad = (C + TILE - 1) / TILE * TILE;
    int ri_pad[MAXR + TILE], cj_pad[MAXR + TILE];
    for (int i = 0; i < rpad; i++) ri_pad[i] = i < R ? i : zero_row;
    for (int c = 0; c < cpad; c++) cj_pad[c] = c < C ? cols[c] : zero_row;
    uint64_t *nzm = masks, *sgm = masks + (int64_t)R * WORDS;
    memset(z + R * row_bytes, 0, row_bytes * (size_t)(rpad + 1 - R));
    v4du *acc = (v4du *)(z + (rpad + 1) * row_bytes); /* rpad x cpad lane sums, this call */
    memset(acc, 0, sizeof(v4du) * (size_t)rpad * cpad);

    for (int64_t off = 0; off < k; off += BLK) {
        int n = (int)(k - off < BLK ? k - off : BLK);
        char *zr = z + ref * row_bytes;
        ops->load(zr, rows[ref], dtypes[ref], off, n, NULL);
        for (int i = 0; i < R; i++) {
            if (i == ref) continue;
            char *zi = z + i * row_bytes;
            int fused = f32 && signed_ && n == BLK && dtypes[i] == DT_BF16 &&
                        load_masks_bf16_f32((float *)zi, rows[i], off, (const float *)zr, nzm + i * WORDS,
                                            sgm + i * WORDS);
            if (!fused) {
                ops->load(zi, rows[i], dtypes[i], off, n, zr);
                if (signed_) ops->masks(zi, nzm + i * WORDS, sgm + i * WORDS);
            }
        }
        for (int ti = 0; ti < rpad; ti += TILE) {
            for (int tj = 0; tj < cpad; tj += TILE) {
                if (all_cols && tj < ti) continue; /* mirrored from the upper triangle */
                ops->tile(z, ri_pad + ti, cj_pad + tj, acc + ((int64_t)ti * cpad + tj * TILE), all_cols && ti == tj);
            }
        }
        if (!signed_) continue;
        for (int i = 0; i < R; i++) {
            if (i == ref) continue;
            const uint64_t *ni = nzm + i * WORDS, *si = sgm + i * WORDS;
            for (int c = 0; c < C; c++) {
                int j = cols[c];
                if (j == ref || (all_cols && j < i)) continue;
                const uint64_t *nj = nzm + j * WORDS, *sj = sgm + j * WORDS;
                int64_t both = 0, dis = 0;
                for (int w = 0; w < WORDS; w++) {
                    uint64_t b = ni[w] & nj[w];
                    both += __builtin_popcountll(b);
                    dis += __builtin_popcountll((si[w] ^ sj[w]) & b);
                }
                agree[(int64_t)i * C + c] += both - dis;
                disagree[(int64_t)i * C + c] += dis;
            }
        }
    }
    /* Tile (ti, tj) entry (a, b) sits at acc[ti * cpad + tj * TILE + TILE * a + b]. */
    for (int ti = 0; ti < rpad; ti += TILE)
        for (int tj = 0; tj < cpad; tj += TILE) {
            if (all_cols && tj < ti) continue;
            const v4du *t = acc + ((int64_t)ti * cpad + tj * TILE);
            for (int a = 0; a < TILE && ti + a < R; a++)
                for (int b = (all_cols && ti == tj) ? a : 0; b < TILE && tj + b < C; b++) {
                    v4d v = t[TILE * a + b];
                    gram[(int64_t)(ti + a) * C + tj + b] += (v[0] + v[1]) + (v[2] + v[3]);
                }
        }
    return 0;
}

int gram_chunk(int R, const void *const *rows, const int *dtypes, int64_t k, int ref,
               int C, const int *cols, int all_cols, int signed_, int f32,
               double *gram, int64_t *agree, int64_t *disagree, void *scratch, uint64_t *masks) {
    if (R < 1 || R > MAXR || ref < 0 || ref >= R || C < 1 || C > R) return -1;
    if (f32) return gram_chunk_in(R, rows, dtypes, k, ref, C, cols, all_cols, signed_, 1, gram, agree, disagree,
                                  scratch, masks);
    return gram_chunk_in(R, rows, dtypes, k, ref, C, cols, all_cols, signed_, 0, gram, agree, disagree, scratch,
                         masks);
}

/* The block layout, so the caller sizes scratch and masks from the binary it loaded. */
void gram_kernel_layout(int *blk, int *words, int *tile, int *max_rows) {
    *blk = BLK;
    *words = WORDS;
    *tile = TILE;
    *max_rows = MAXR;
}
