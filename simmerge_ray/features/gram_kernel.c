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
 * Sign counts are exact integers in both. Portable C with GCC vector extensions; AVX2
 * intrinsics for the hot case (whole blocks of bf16 rows in float32), the sign masks and their
 * popcounts, with scalar fallbacks. Measured choices (benchmarks/bench_structural.py): diagonal
 * tiles keep two sets of sums (6 FMA chains cannot hide the FMA latency), each row stream is
 * prefetched into L2 four blocks ahead (into L1, the 9+ streams at equal page offsets evict
 * each other), and sign masks are counted 16 blocks at a time.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F64 = 2 };
enum { BLK = 256, WORDS = BLK / 64, TILE = 3, MAXR = 510 };
/* Sign masks of GROUP blocks are kept per row and counted together: the pair loop then runs
 * over GROUP * WORDS words with its counts in registers (byte counters hold up to 31 * 8). */
enum { GROUP = 16, MWORDS = GROUP * WORDS };

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
        if (diag) { /* 6 products: a second set of sums over odd steps keeps 12 FMAs in flight */     \
            VT u00 = {0}, u01 = {0}, u02 = {0}, u11 = {0}, u12 = {0}, u22 = {0};                        \
            for (int c = 0; c < BLK; c += 2 * LANES) {                                                  \
                VT x0 = LD(a0 + c), x1 = LD(a1 + c), x2 = LD(a2 + c);                                   \
                s00 += x0 * x0; s01 += x0 * x1; s02 += x0 * x2;                                         \
                s11 += x1 * x1; s12 += x1 * x2; s22 += x2 * x2;                                         \
                x0 = LD(a0 + c + LANES), x1 = LD(a1 + c + LANES), x2 = LD(a2 + c + LANES);              \
                u00 += x0 * x0; u01 += x0 * x1; u02 += x0 * x2;                                         \
                u11 += x1 * x1; u12 += x1 * x2; u22 += x2 * x2;                                         \
            }                                                                                           \
            s00 += u00; s01 += u01; s02 += u02; s11 += u11; s12 += u12; s22 += u22;                    \
        } else {                                                                                        \
            for (int c = 0; c < BLK; c += LANES) {                                                      \
                VT x0 = LD(a0 + c), x1 = LD(a1 + c), x2 = LD(a2 + c);                                   \
                VT y0 = LD(b0 + c), y1 = LD(b1 + c), y2 = LD(b2 + c);                                   \
                s00 += x0 * y0; s01 += x0 * y1; s02 += x0 * y2;                                         \
                s10 += x1 * y0; s11 += x1 * y1; s12 += x1 * y2;                                         \
                s20 += x2 * y0; s21 += x2 * y1; s22 += x2 * y2;                                         \
            }                                                                                           \
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

/* The hot case, a full block of bf16 rows in float32, with AVX2. A 256-bit load holds 16 bf16
 * values, two per 32-bit lane: shifting each lane left by 16 gives the even ones as float32, masking
 * off the low half the odd ones. The block is stored in that even/odd order, and the sign masks are
 * packed from four such vectors at a time in the order the packs leave them. Both orders are the
 * same for every row of a block, which is all a Gram entry or a sign count depends on; blocks the
 * fast path does not take are stored in natural order throughout. */
#ifdef __AVX2__
#define FAST_BF16 1
static inline void split_bf16(const uint16_t *s, __m256 *even, __m256 *odd) {
    __m256i v = _mm256_loadu_si256((const __m256i *)s);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

/* The reference row: converted, not centred. */
static void load_ref_bf16(float *dst, const uint16_t *s) {
    for (int c = 0; c < BLK; c += 16) {
        __m256 e, o;
        split_bf16(s + c, &e, &o);
        _mm256_storeu_ps(dst + c, e);
        _mm256_storeu_ps(dst + c + 8, o);
    }
}

/* 32 lanes of int32 (their sign bits, or compare results) to 32 mask bits. */
static inline uint32_t pack_bits(__m256i a, __m256i b, __m256i c, __m256i d) {
    return (uint32_t)_mm256_movemask_epi8(_mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d)));
}

/* A centred row, and when `signed_` its nonzero and sign-bit masks (WORDS words). */
static void load_bf16_fast(float *dst, const uint16_t *s, const float *ref, uint64_t *nz, uint64_t *sg, int signed_) {
    const __m256 zero = _mm256_setzero_ps();
    for (int c = 0; c < BLK; c += 32) {
        _mm_prefetch((const char *)(s + c + 4 * BLK), _MM_HINT_T1); /* to L2: a hint, never faults */
        __m256 v[4];
        split_bf16(s + c, &v[0], &v[1]);
        split_bf16(s + c + 16, &v[2], &v[3]);
        for (int q = 0; q < 4; q++) {
            v[q] = _mm256_sub_ps(v[q], _mm256_loadu_ps(ref + c + 8 * q));
            _mm256_storeu_ps(dst + c + 8 * q, v[q]);
        }
        if (!signed_) continue;
        __m256i n[4];
        for (int q = 0; q < 4; q++) n[q] = _mm256_castps_si256(_mm256_cmp_ps(v[q], zero, _CMP_NEQ_UQ));
        const uint32_t nzb = pack_bits(n[0], n[1], n[2], n[3]);
        const uint32_t sgb = pack_bits(_mm256_castps_si256(v[0]), _mm256_castps_si256(v[1]),
                                       _mm256_castps_si256(v[2]), _mm256_castps_si256(v[3]));
        memcpy((char *)nz + c / 8, &nzb, 4); /* 32 bits per 32 values, into the 64-bit words */
        memcpy((char *)sg + c / 8, &sgb, 4);
    }
}

/* Per-byte popcounts (nibble table). */
static inline __m256i popcount_bytes(__m256i v) {
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    return _mm256_add_epi8(_mm256_shuffle_epi8(table, _mm256_and_si256(v, low)),
                           _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low)));
}

static inline int64_t sum_bytes(__m256i v) {
    __m256i s = _mm256_sad_epu8(v, _mm256_setzero_si256());
    return _mm256_extract_epi64(s, 0) + _mm256_extract_epi64(s, 1) + _mm256_extract_epi64(s, 2) +
           _mm256_extract_epi64(s, 3);
}
#else
#define FAST_BF16 0
#endif

/* Over `nw` mask words (a multiple of WORDS, at most MWORDS): the coordinates where both rows
 * are nonzero, and of those, where their signs differ. */
static inline void count_pair(const uint64_t *ni, const uint64_t *si, const uint64_t *nj, const uint64_t *sj,
                              int nw, int64_t *both, int64_t *dis) {
#ifdef __AVX2__
    __m256i cb = _mm256_setzero_si256(), cd = _mm256_setzero_si256();
    for (int w = 0; w < nw; w += 4) {
        __m256i b = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(ni + w)),
                                     _mm256_loadu_si256((const __m256i *)(nj + w)));
        __m256i d = _mm256_and_si256(b, _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(si + w)),
                                                         _mm256_loadu_si256((const __m256i *)(sj + w))));
        cb = _mm256_add_epi8(cb, popcount_bytes(b));
        cd = _mm256_add_epi8(cd, popcount_bytes(d));
    }
    *both = sum_bytes(cb);
    *dis = sum_bytes(cd);
#else
    int64_t nb = 0, nd = 0;
    for (int w = 0; w < nw; w++) {
        uint64_t b = ni[w] & nj[w];
        nb += __builtin_popcountll(b);
        nd += __builtin_popcountll((si[w] ^ sj[w]) & b);
    }
    *both = nb;
    *dis = nd;
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

/* Fold the sign masks of the group's `nw` words into agree/disagree. */
static void count_group(int R, int ref, int C, const int *cols, int all_cols, const uint64_t *nzm,
                        const uint64_t *sgm, int nw, int64_t *agree, int64_t *disagree) {
    for (int i = 0; i < R; i++) {
        if (i == ref) continue;
        const uint64_t *ni = nzm + (int64_t)i * MWORDS, *si = sgm + (int64_t)i * MWORDS;
        for (int c = 0; c < C; c++) {
            int j = cols[c];
            if (j == ref || (all_cols && j < i)) continue;
            int64_t both, dis;
            count_pair(ni, si, nzm + (int64_t)j * MWORDS, sgm + (int64_t)j * MWORDS, nw, &both, &dis);
            agree[(int64_t)i * C + c] += both - dis;
            disagree[(int64_t)i * C + c] += dis;
        }
    }
}

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
 * R_pad and C_pad being R and C rounded up to a multiple of 3; masks: 2 * R * MWORDS uint64.
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
    uint64_t *nzm = masks, *sgm = masks + (int64_t)R * MWORDS;
    memset(z + R * row_bytes, 0, row_bytes * (size_t)(rpad + 1 - R));
    v4du *acc = (v4du *)(z + (rpad + 1) * row_bytes); /* rpad x cpad lane sums, this call */
    memset(acc, 0, sizeof(v4du) * (size_t)rpad * cpad);
#if FAST_BF16
    int fast = f32; /* every row bf16: blocks of one order (see above) */
    for (int i = 0; i < R; i++) fast &= dtypes[i] == DT_BF16;
#endif
    int nb = 0; /* blocks of masks in the current group */

    for (int64_t off = 0; off < k; off += BLK) {
        int n = (int)(k - off < BLK ? k - off : BLK);
        char *zr = z + ref * row_bytes;
#if FAST_BF16
        if (fast && n == BLK) {
            load_ref_bf16((float *)zr, (const uint16_t *)rows[ref] + off);
            for (int i = 0; i < R; i++)
                if (i != ref)
                    load_bf16_fast((float *)(z + i * row_bytes), (const uint16_t *)rows[i] + off, (const float *)zr,
                                   nzm + (int64_t)i * MWORDS + nb * WORDS, sgm + (int64_t)i * MWORDS + nb * WORDS,
                                   signed_);
        } else
#endif
        {
            ops->load(zr, rows[ref], dtypes[ref], off, n, NULL);
            for (int i = 0; i < R; i++) {
                if (i == ref) continue;
                char *zi = z + i * row_bytes;
                ops->load(zi, rows[i], dtypes[i], off, n, zr);
                if (signed_) ops->masks(zi, nzm + (int64_t)i * MWORDS + nb * WORDS, sgm + (int64_t)i * MWORDS + nb * WORDS);
            }
        }
        for (int ti = 0; ti < rpad; ti += TILE) {
            for (int tj = 0; tj < cpad; tj += TILE) {
                if (all_cols && tj < ti) continue; /* mirrored from the upper triangle */
                ops->tile(z, ri_pad + ti, cj_pad + tj, acc + ((int64_t)ti * cpad + tj * TILE), all_cols && ti == tj);
            }
        }
        if (signed_ && (++nb == GROUP || off + BLK >= k)) {
            count_group(R, ref, C, cols, all_cols, nzm, sgm, nb * WORDS, agree, disagree);
            nb = 0;
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
    *words = MWORDS;
    *tile = TILE;
    *max_rows = MAXR;
}
