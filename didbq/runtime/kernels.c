/* didbq's binary kernels: packed sign bits, XOR/AND + popcount, float epilogue.
 *
 * Built on first use by didbq/runtime/build.py with `cc -O3 -shared -fPIC -ffp-contract=off [-fopenmp]`; no torch
 * headers, loaded with ctypes. Each kernel has a portable C body and, on x86-64, AVX2 and AVX-512 (VPOPCNTDQ)
 * bodies compiled with target attributes and chosen at run time (`isa`: 0 portable, 1 avx2, 2 avx512).
 *
 * Bits: element k of a row is bit k % 64 of 64-bit word k / 64; bit 1 is +1 (the value was >= 0), bit 0 is -1;
 * padding bits are 0 in both operands, so XOR leaves them 0 and they never count.
 * -ffp-contract=off keeps `dot * alpha` and `+ bias` two roundings, as torch's mul_ and add_ are, so the packed
 * layer equals BinaryLinear's float path to the last bit.
 */
#include <stdint.h>
#include <stdlib.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define DIDBQ_X86 1
#endif

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
#define PANEL 8 /* weight columns per panel: one 512-bit vector of 64-bit words */

#define AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx512vpopcntdq,popcnt")))
#define AVX2 __attribute__((target("avx2,popcnt")))
#define INLINE static inline __attribute__((always_inline))

int didbq_best_isa(void) {
#ifdef DIDBQ_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vpopcntdq"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) return ISA_AVX2;
#endif
    return ISA_PORTABLE;
}

int didbq_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- packing: bit = (x + shift >= 0) */

static void pack_row_portable(const float *x, const float *shift, int64_t K, uint64_t *bits) {
    int64_t words = (K + 63) / 64;
    for (int64_t w = 0; w < words; w++) {
        uint64_t word = 0;
        int64_t end = (w + 1) * 64 < K ? (w + 1) * 64 : K;
        for (int64_t k = w * 64; k < end; k++) {
            float v = shift ? x[k] + shift[k] : x[k];
            word |= (uint64_t)(v >= 0.0f) << (k & 63);
        }
        bits[w] = word;
    }
}

#ifdef DIDBQ_X86
AVX512 static void pack_row_avx512(const float *x, const float *shift, int64_t K, uint64_t *bits) {
    int64_t words = (K + 63) / 64;
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t w = 0; w < words; w++) {
        uint64_t word = 0;
        for (int q = 0; q < 4; q++) {
            int64_t k = w * 64 + q * 16;
            if (k >= K) break;
            __mmask16 valid = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            __m512 v = _mm512_maskz_loadu_ps(valid, x + k);
            if (shift) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(valid, shift + k));
            word |= (uint64_t)_mm512_mask_cmp_ps_mask(valid, v, zero, _CMP_GE_OQ) << (q * 16);
        }
        bits[w] = word;
    }
}

AVX2 static void pack_row_avx2(const float *x, const float *shift, int64_t K, uint64_t *bits) {
    int64_t full = K / 8 * 8;
    memset(bits, 0, sizeof(uint64_t) * ((K + 63) / 64));
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t k = 0; k < full; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        if (shift) v = _mm256_add_ps(v, _mm256_loadu_ps(shift + k));
        uint64_t mask = (uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GE_OQ));
        bits[k / 64] |= mask << (k & 63);
    }
    for (int64_t k = full; k < K; k++) {
        float v = shift ? x[k] + shift[k] : x[k];
        bits[k / 64] |= (uint64_t)(v >= 0.0f) << (k & 63);
    }
}
#endif

static void pack_row(int isa, const float *x, const float *shift, int64_t K, uint64_t *bits) {
#ifdef DIDBQ_X86
    if (isa == ISA_AVX512) return pack_row_avx512(x, shift, K, bits);
    if (isa == ISA_AVX2) return pack_row_avx2(x, shift, K, bits);
#endif
    pack_row_portable(x, shift, K, bits);
}

/* Sign bits of M rows of K floats (+ shift per column, if given): bits[M][ceil(K / 64)]. */
void didbq_pack_rows(const float *x, const float *shift, int64_t M, int64_t K, uint64_t *bits, int isa,
                     int threads) {
    int64_t words = (K + 63) / 64;
#pragma omp parallel for num_threads(threads) if (threads > 1 && M > 1) schedule(static)
    for (int64_t m = 0; m < M; m++) pack_row(isa, x + m * K, shift, K, bits + m * words);
}

/* ---------------------------------------------------------------- binary GEMM
 * a: [M][KW] activation bits; panels: [P][KW][8] weight bits, column n in lane n % 8 of panel n / 8, P = N rounded
 * up to 48 columns (the AVX-512 tile reads 6 panels at once; padding columns are zero and never stored);
 * y[m][n] = (K - 2 popcount(a[m] ^ w[n])) * alpha[n] (+ bias[n]). */

static void gemm_portable(const uint64_t *a, const uint64_t *panels, int64_t m0, int64_t m1, int64_t n0,
                          int64_t n1, int64_t KW, int64_t K, const float *alpha, const float *bias, float *y,
                          int64_t N) {
    for (int64_t m = m0; m < m1; m++)
        for (int64_t n = n0; n < n1; n++) {
            const uint64_t *w = panels + (n / PANEL) * KW * PANEL + n % PANEL;
            int64_t count = 0;
            for (int64_t k = 0; k < KW; k++) count += __builtin_popcountll(a[m * KW + k] ^ w[k * PANEL]);
            float value = (float)(K - 2 * count) * alpha[n];
            y[m * N + n] = bias ? value + bias[n] : value;
        }
}

#ifdef DIDBQ_X86
/* One tile of ROWS x (PANELS * 8) outputs in registers (always inlined with constant sizes, so the accumulators
 * stay in zmm registers: 4 x 6 = 24 of 32). */
AVX512 INLINE void tile_avx512(const int ROWS, const int PANELS, const uint64_t *a, const uint64_t *panel,
                               int64_t KW, int64_t K, const float *alpha, const float *bias, float *y, int64_t N,
                               int64_t n0, int64_t columns) {
    __m512i acc[4][6];
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < PANELS; j++) acc[r][j] = _mm512_setzero_si512();
    for (int64_t k = 0; k < KW; k++) {
        __m512i w[6];
        for (int j = 0; j < PANELS; j++) w[j] = _mm512_loadu_si512(panel + (j * KW + k) * PANEL);
        for (int r = 0; r < ROWS; r++) {
            __m512i x = _mm512_set1_epi64((long long)a[r * KW + k]);
            for (int j = 0; j < PANELS; j++)
                acc[r][j] = _mm512_add_epi64(acc[r][j], _mm512_popcnt_epi64(_mm512_xor_si512(x, w[j])));
        }
    }
    const __m512i k_all = _mm512_set1_epi64(K);
    for (int j = 0; j < PANELS; j++) {
        int64_t n = n0 + j * PANEL, left = columns - j * PANEL;
        if (left <= 0) break;
        __mmask8 lanes = left >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << left) - 1);
        __m256 scale = _mm256_maskz_loadu_ps(lanes, alpha + n);
        __m256 shift = bias ? _mm256_maskz_loadu_ps(lanes, bias + n) : _mm256_setzero_ps();
        for (int r = 0; r < ROWS; r++) {
            __m512i dot = _mm512_sub_epi64(k_all, _mm512_slli_epi64(acc[r][j], 1));
            __m256 value = _mm256_mul_ps(_mm512_cvtepi64_ps(dot), scale);
            if (bias) value = _mm256_add_ps(value, shift);
            _mm256_mask_storeu_ps(y + r * N + n, lanes, value);
        }
    }
}

AVX512 static void gemm_avx512(const uint64_t *a, const uint64_t *panels, int64_t m0, int64_t m1, int64_t n0,
                               int64_t n1, int64_t KW, int64_t K, const float *alpha, const float *bias, float *y,
                               int64_t N) {
    for (int64_t n = n0; n < n1; n += 6 * PANEL) {
        const uint64_t *panel = panels + (n / PANEL) * KW * PANEL;
        int64_t columns = n1 - n < 6 * PANEL ? n1 - n : 6 * PANEL;
        int64_t m = m0;
        for (; m + 4 <= m1; m += 4) tile_avx512(4, 6, a + m * KW, panel, KW, K, alpha, bias, y + m * N, N, n, columns);
        for (; m < m1; m++) tile_avx512(1, 6, a + m * KW, panel, KW, K, alpha, bias, y + m * N, N, n, columns);
    }
}

AVX2 INLINE __m256i popcount_avx2(__m256i v) {
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i counts = _mm256_add_epi8(_mm256_shuffle_epi8(table, _mm256_and_si256(v, low)),
                                     _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low)));
    return _mm256_sad_epu8(counts, _mm256_setzero_si256()); /* 4 x u64 */
}

/* ROWS x 8 outputs: one panel as two 256-bit halves. */
AVX2 INLINE void tile_avx2(const int ROWS, const uint64_t *a, const uint64_t *panel, int64_t KW, int64_t K,
                           const float *alpha, const float *bias, float *y, int64_t N, int64_t n0, int64_t columns) {
    __m256i acc[4][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t k = 0; k < KW; k++) {
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(panel + k * PANEL));
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(panel + k * PANEL + 4));
        for (int r = 0; r < ROWS; r++) {
            __m256i x = _mm256_set1_epi64x((long long)a[r * KW + k]);
            acc[r][0] = _mm256_add_epi64(acc[r][0], popcount_avx2(_mm256_xor_si256(x, w0)));
            acc[r][1] = _mm256_add_epi64(acc[r][1], popcount_avx2(_mm256_xor_si256(x, w1)));
        }
    }
    for (int r = 0; r < ROWS; r++) {
        int64_t counts[8];
        _mm256_storeu_si256((__m256i *)counts, acc[r][0]);
        _mm256_storeu_si256((__m256i *)(counts + 4), acc[r][1]);
        for (int64_t c = 0; c < columns; c++) {
            float value = (float)(K - 2 * counts[c]) * alpha[n0 + c];
            y[r * N + n0 + c] = bias ? value + bias[n0 + c] : value;
        }
    }
}

AVX2 static void gemm_avx2(const uint64_t *a, const uint64_t *panels, int64_t m0, int64_t m1, int64_t n0,
                           int64_t n1, int64_t KW, int64_t K, const float *alpha, const float *bias, float *y,
                           int64_t N) {
    for (int64_t n = n0; n < n1; n += PANEL) {
        const uint64_t *panel = panels + (n / PANEL) * KW * PANEL;
        int64_t columns = n1 - n < PANEL ? n1 - n : PANEL;
        int64_t m = m0;
        for (; m + 4 <= m1; m += 4) tile_avx2(4, a + m * KW, panel, KW, K, alpha, bias, y + m * N, N, n, columns);
        for (; m < m1; m++) tile_avx2(1, a + m * KW, panel, KW, K, alpha, bias, y + m * N, N, n, columns);
    }
}
#endif

typedef void (*gemm_fn)(const uint64_t *, const uint64_t *, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                        const float *, const float *, float *, int64_t);

static gemm_fn gemm_for(int isa) {
#ifdef DIDBQ_X86
    if (isa == ISA_AVX512) return gemm_avx512;
    if (isa == ISA_AVX2) return gemm_avx2;
#endif
    return gemm_portable;
}

#define ROW_BLOCK 64   /* rows per work item: the activation bits of a block stay in L1 */
#define COLUMN_BLOCK 96 /* columns per work item: a multiple of the 48-column tile */

/* y = binary_linear(x): pack the rows of x (x + shift >= 0), then the binary GEMM on the weight panels. */
void didbq_binary_linear(const float *x, const float *shift, int64_t M, int64_t K, const uint64_t *panels,
                         int64_t N, const float *alpha, const float *bias, float *y, int isa, int threads) {
    int64_t KW = (K + 63) / 64;
    uint64_t *a = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)(M * KW + 1));
    if (!a) return;
    didbq_pack_rows(x, shift, M, K, a, isa, threads);
    gemm_fn gemm = gemm_for(isa);
    int64_t row_blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK, column_blocks = (N + COLUMN_BLOCK - 1) / COLUMN_BLOCK;
#pragma omp parallel for num_threads(threads) if (threads > 1) collapse(2) schedule(static)
    for (int64_t cb = 0; cb < column_blocks; cb++)
        for (int64_t rb = 0; rb < row_blocks; rb++) {
            int64_t m0 = rb * ROW_BLOCK, n0 = cb * COLUMN_BLOCK;
            int64_t m1 = m0 + ROW_BLOCK < M ? m0 + ROW_BLOCK : M, n1 = n0 + COLUMN_BLOCK < N ? n0 + COLUMN_BLOCK : N;
            gemm(a, panels, m0, m1, n0, n1, KW, K, alpha, bias, y, N);
        }
    free(a);
}

/* ---------------------------------------------------------------- binary attention, fused
 * For one (batch, head): sign bits of q, k, v (x + shift >= 0) and c_j = popcount(q_i ^ k_j), so score_j =
 * (D - 2 c_j) * scale. Softmax needs only the D + 1 values exp(-2 scale t), t = c_j - min c (a table), and since
 * p falls as t grows, each {0, 1} mask is a prefix in t: on for t <= T (threshold: p >= row sum / #(p > 0); bit:
 * p / a > 0.5, i.e. round(clip(p / a, 0, 1)) = 1; bivit: p >= 0.25 max p; with ensure_one_key t = 0 is always
 * on). Then out[i][d] = a * (2 popcount(m_i & v_d) - popcount(m_i)), count[i] = popcount(m_i).
 * Sums over a row run in 16 lanes reduced in one fixed order on every code path, so all paths agree exactly. */

enum { PROBS_THRESHOLD = 0, PROBS_BIT = 1, PROBS_BIVIT = 2 };
#define LANES 16

typedef struct {
    int32_t (*xor_counts)(const uint64_t *q, const uint64_t *kT, int64_t DW, int64_t NK, int64_t NKP, int32_t *c);
    void (*and_counts)(const uint64_t *m, const uint64_t *vT, int64_t JW, int64_t DP, int32_t *acc);
    float (*lane_sum)(const int32_t *c, int32_t least, const float *values, int64_t NKP);
    void (*pack_columns)(const float *x, int64_t stride, const float *shift, int64_t R, int64_t C, int64_t CP,
                         uint64_t *out);
    void (*prefix_mask)(const int32_t *c, int32_t cutoff, int64_t NKP, uint64_t *mask);
} attention_fns;

static float reduce_lanes(const float *lanes) {
    float half[8], quarter[4];
    for (int l = 0; l < 8; l++) half[l] = lanes[l] + lanes[l + 8];
    for (int l = 0; l < 4; l++) quarter[l] = half[l] + half[l + 4];
    return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

/* c[j] = popcount(q ^ k_j) for j < NKP (kT is [DW][NKP]: keys along the row, padded to 16); returns the least
 * count of the NK real keys. */
static int32_t xor_counts_portable(const uint64_t *q, const uint64_t *kT, int64_t DW, int64_t NK, int64_t NKP,
                                   int32_t *c) {
    int32_t least = INT32_MAX;
    for (int64_t j = 0; j < NKP; j++) {
        int32_t count = 0;
        for (int64_t w = 0; w < DW; w++) count += __builtin_popcountll(q[w] ^ kT[w * NKP + j]);
        c[j] = count;
        if (j < NK && count < least) least = count;
    }
    return least;
}

/* acc[d] = popcount(m & v_d) for d < DP; vT is [JW][DP] (channels along the row, padded to 8). */
static void and_counts_portable(const uint64_t *m, const uint64_t *vT, int64_t JW, int64_t DP, int32_t *acc) {
    for (int64_t d = 0; d < DP; d++) {
        int32_t count = 0;
        for (int64_t w = 0; w < JW; w++) count += __builtin_popcountll(m[w] & vT[w * DP + d]);
        acc[d] = count;
    }
}

/* sum over j of values[c[j] - least], in 16 lanes (values[t] is 0 past the table: padding keys count 0). */
static float lane_sum_portable(const int32_t *c, int32_t least, const float *values, int64_t NKP) {
    float lanes[LANES] = {0};
    for (int64_t j = 0; j < NKP; j += LANES)
        for (int l = 0; l < LANES; l++) lanes[l] += values[c[j + l] - least];
    return reduce_lanes(lanes);
}

/* The signs of x [R][C] (rows `stride` floats apart, + shift per column) packed along the rows: bit r % 64 of
 * out[(r / 64) * CP + c] is set when x[r][c] + shift[c] >= 0 (CP >= C: the padded row length of out). */
static void pack_columns(const float *x, int64_t stride, const float *shift, int64_t R, int64_t C, int64_t CP,
                         uint64_t *out) {
    memset(out, 0, sizeof(uint64_t) * (size_t)(((R + 63) / 64) * CP));
    for (int64_t r = 0; r < R; r++) {
        uint64_t bit = (uint64_t)1 << (r & 63);
        uint64_t *row = out + (r / 64) * CP;
        for (int64_t c = 0; c < C; c++) {
            float value = shift ? x[r * stride + c] + shift[c] : x[r * stride + c];
            if (value >= 0.0f) row[c] |= bit;
        }
    }
}

static void prefix_mask_portable(const int32_t *c, int32_t cutoff, int64_t NKP, uint64_t *mask) {
    for (int64_t j = 0; j < NKP; j += 64) {
        uint64_t word = 0;
        for (int64_t b = 0; b < 64 && j + b < NKP; b++) word |= (uint64_t)(c[j + b] <= cutoff) << b;
        mask[j / 64] = word;
    }
}

#ifdef DIDBQ_X86
AVX2 static int32_t xor_counts_avx2(const uint64_t *q, const uint64_t *kT, int64_t DW, int64_t NK, int64_t NKP,
                                    int32_t *c) {
    return xor_counts_portable(q, kT, DW, NK, NKP, c); /* compiled here with the popcnt instruction */
}

AVX2 static void and_counts_avx2(const uint64_t *m, const uint64_t *vT, int64_t JW, int64_t DP, int32_t *acc) {
    and_counts_portable(m, vT, JW, DP, acc);
}

AVX512 static int32_t xor_counts_avx512(const uint64_t *q, const uint64_t *kT, int64_t DW, int64_t NK,
                                        int64_t NKP, int32_t *c) {
    __m512i least = _mm512_set1_epi64(INT32_MAX);
    for (int64_t j = 0; j < NKP; j += 8) {
        __m512i acc = _mm512_setzero_si512();
        for (int64_t w = 0; w < DW; w++)
            acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(
                _mm512_set1_epi64((long long)q[w]), _mm512_loadu_si512(kT + w * NKP + j))));
        __mmask8 real = NK - j >= 8 ? (__mmask8)0xFF : NK > j ? (__mmask8)((1u << (NK - j)) - 1) : 0;
        least = _mm512_mask_min_epi64(least, real, least, acc);
        _mm256_storeu_si256((__m256i *)(c + j), _mm512_cvtepi64_epi32(acc));
    }
    return (int32_t)_mm512_reduce_min_epi64(least);
}

AVX512 static void pack_columns_avx512(const float *x, int64_t stride, const float *shift, int64_t R, int64_t C,
                                       int64_t CP, uint64_t *out) {
    memset(out, 0, sizeof(uint64_t) * (size_t)(((R + 63) / 64) * CP));
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t r = 0; r < R; r++) {
        const __m512i bit = _mm512_set1_epi64((long long)((uint64_t)1 << (r & 63)));
        uint64_t *row = out + (r / 64) * CP;
        for (int64_t c = 0; c < C; c += 8) {
            __mmask8 valid = C - c >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (C - c)) - 1);
            __m256 value = _mm256_maskz_loadu_ps(valid, x + r * stride + c);
            if (shift) value = _mm256_add_ps(value, _mm256_maskz_loadu_ps(valid, shift + c));
            __mmask8 on = _mm512_mask_cmp_ps_mask(valid, _mm512_castps256_ps512(value), zero, _CMP_GE_OQ);
            __m512i words = _mm512_loadu_si512(row + c);
            _mm512_storeu_si512(row + c, _mm512_mask_or_epi64(words, on, words, bit));
        }
    }
}

AVX512 static void and_counts_avx512(const uint64_t *m, const uint64_t *vT, int64_t JW, int64_t DP, int32_t *out) {
    for (int64_t d = 0; d < DP; d += 8) {
        __m512i acc = _mm512_setzero_si512();
        for (int64_t w = 0; w < JW; w++)
            acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_and_si512(
                _mm512_set1_epi64((long long)m[w]), _mm512_loadu_si512(vT + w * DP + d))));
        _mm256_storeu_si256((__m256i *)(out + d), _mm512_cvtepi64_epi32(acc));
    }
}

AVX512 static float lane_sum_avx512(const int32_t *c, int32_t least, const float *values, int64_t NKP) {
    __m512 acc = _mm512_setzero_ps();
    const __m512i base = _mm512_set1_epi32(least);
    for (int64_t j = 0; j < NKP; j += LANES) {
        __m512i index = _mm512_sub_epi32(_mm512_loadu_si512(c + j), base);
        acc = _mm512_add_ps(acc, _mm512_i32gather_ps(index, values, 4));
    }
    float lanes[LANES];
    _mm512_storeu_ps(lanes, acc);
    return reduce_lanes(lanes);
}

AVX512 static void prefix_mask_avx512(const int32_t *c, int32_t cutoff, int64_t NKP, uint64_t *mask) {
    const __m512i limit = _mm512_set1_epi32(cutoff);
    for (int64_t j = 0; j < NKP; j += 64) {
        uint64_t word = 0;
        for (int64_t q = 0; q < 4 && j + q * LANES < NKP; q++)
            word |= (uint64_t)_mm512_cmple_epi32_mask(_mm512_loadu_si512(c + j + q * LANES), limit) << (q * LANES);
        mask[j / 64] = word;
    }
}
#endif

static attention_fns attention_for(int isa) {
    attention_fns fns = {xor_counts_portable, and_counts_portable, lane_sum_portable, pack_columns,
                         prefix_mask_portable};
#ifdef DIDBQ_X86
    if (isa == ISA_AVX512)
        fns = (attention_fns){xor_counts_avx512, and_counts_avx512, lane_sum_avx512, pack_columns_avx512,
                              prefix_mask_avx512};
    if (isa == ISA_AVX2)
        fns = (attention_fns){xor_counts_avx2, and_counts_avx2, lane_sum_portable, pack_columns, prefix_mask_portable};
#endif
    return fns;
}

/* The largest t whose key keeps the mask on (the mask is the prefix t <= T), from the probability
 * table[t] / total of a key at distance t from the row's best. threshold: p >= 1 / #(p > 0) (the row sum is 1
 * up to rounding); valid is #(p > 0). */
static int32_t mask_cutoff(const float *table, float total, int64_t D, int kind, float a, int ensure_one_key,
                           float valid) {
    float threshold = 1.0f / (valid > 1.0f ? valid : 1.0f), best = table[0] / total;
    int32_t cutoff = -1;
    for (int64_t t = 0; t <= D; t++) {
        float p = table[t] / total;
        int on = kind == PROBS_THRESHOLD ? p >= threshold : kind == PROBS_BIT ? p / a > 0.5f : p >= 0.25f * best;
        if (!on) break;
        cutoff = (int32_t)t;
    }
    return cutoff < 0 && ensure_one_key ? 0 : cutoff;
}

static void attention_head(const float *q, const float *k, const float *v, const int64_t *rows, int64_t N,
                           int64_t NK, int64_t D,
                           const float *q_shift, const float *k_shift, const float *v_shift, const float *table,
                           int kind, float a, int ensure_one_key, float *out, float *counts, int isa) {
    int64_t DW = (D + 63) / 64, JW = (NK + 63) / 64, NKP = (NK + LANES - 1) / LANES * LANES, DP = (D + 7) / 8 * 8;
    attention_fns fns = attention_for(isa);
    uint64_t *q_bits = malloc(sizeof(uint64_t) * (size_t)(N * DW));
    uint64_t *k_bits = malloc(sizeof(uint64_t) * (size_t)(NK * DW));
    uint64_t *kT = malloc(sizeof(uint64_t) * (size_t)(DW * NKP));
    uint64_t *vT = malloc(sizeof(uint64_t) * (size_t)(JW * DP));
    uint64_t *mask = malloc(sizeof(uint64_t) * (size_t)((NKP + 63) / 64));
    int32_t *c = malloc(sizeof(int32_t) * (size_t)(NKP > DP ? NKP : DP));
    if (!q_bits || !k_bits || !kT || !vT || !mask || !c) goto done;
    for (int64_t i = 0; i < N; i++) pack_row(isa, q + i * rows[0], q_shift, D, q_bits + i * DW);
    for (int64_t j = 0; j < NK; j++) pack_row(isa, k + j * rows[1], k_shift, D, k_bits + j * DW);
    for (int64_t w = 0; w < DW; w++)
        for (int64_t j = 0; j < NKP; j++) kT[w * NKP + j] = j < NK ? k_bits[j * DW + w] : 0;
    fns.pack_columns(v, rows[2], v_shift, NK, D, DP, vT);
    int32_t far = (int32_t)(D + 1); /* table[far] = 0: padding keys count nothing and are never on */
    for (int64_t i = 0; i < N; i++) {
        int32_t least = fns.xor_counts(q_bits + i * DW, kT, DW, NK, NKP, c);
        for (int64_t j = NK; j < NKP; j++) c[j] = far + least;
        float total = fns.lane_sum(c, least, table, NKP);
        float valid = (float)NK;
        if (kind == PROBS_THRESHOLD && table[D] / total == 0.0f) { /* some probabilities underflow to 0 */
            int32_t zero = 0;
            while (table[zero] / total > 0.0f) zero++;
            fns.prefix_mask(c, least + zero - 1, NKP, mask);
            valid = 0.0f;
            for (int64_t w = 0; w < JW; w++) valid += (float)__builtin_popcountll(mask[w]);
        }
        int32_t cutoff = mask_cutoff(table, total, D, kind, a, ensure_one_key, valid);
        fns.prefix_mask(c, least + cutoff, NKP, mask);
        int32_t ones = 0;
        for (int64_t w = 0; w < JW; w++) ones += __builtin_popcountll(mask[w]);
        fns.and_counts(mask, vT, JW, DP, c);
        for (int64_t d = 0; d < D; d++) out[i * D + d] = (float)(2 * c[d] - ones) * a;
        if (counts) counts[i] = (float)ones;
    }
done:
    free(q_bits), free(k_bits), free(kT), free(vT), free(mask), free(c);
}

/* q [B][H][N][D], k and v [B][H][NK][D] fp32, the last dimension contiguous; strides (in floats) of batch, head
 * and token for q, k and v in that order (9 values); shifts [D] or NULL; prob_scale [H] (a per head);
 * out [B][H][N][D] contiguous; counts [B][H][N] or NULL. */
void didbq_binary_attention(const float *q, const float *k, const float *v, const int64_t *strides, int64_t B,
                            int64_t H, int64_t N, int64_t NK, int64_t D, const float *q_shift, const float *k_shift,
                            const float *v_shift, float scale, int kind, const float *prob_scale, int ensure_one_key,
                            float *out, float *counts, int isa, int threads) {
    float *table = calloc((size_t)(D + 2), sizeof(float)); /* table[D + 1] = 0: padding keys */
    if (!table) return;
    for (int64_t t = 0; t <= D; t++) table[t] = expf(-2.0f * scale * (float)t);
    const int64_t rows[3] = {strides[2], strides[5], strides[8]};
#pragma omp parallel for num_threads(threads) if (threads > 1 && B * H > 1) schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H;
        attention_head(q + b * strides[0] + h * strides[1], k + b * strides[3] + h * strides[4],
                       v + b * strides[6] + h * strides[7], rows, N, NK, D, q_shift, k_shift, v_shift, table, kind,
                       prob_scale[h], ensure_one_key, out + bh * N * D, counts ? counts + bh * N : NULL, isa);
    }
    free(table);
}
