/* Dequantization of packed codes on the CPU, one pass: codes -> float32 value = code * scale + zero, then, for
 * designs that rotate (rotated.py), the inverse Hadamard transform of each row.
 *
 * Compiled on first use by cpu_kernel.py (cc -O3 -march=native -fopenmp) and loaded with ctypes; PyTorch ops are used
 * wherever it is unavailable. It reproduces their dequantization bit for bit: the product and the sum are rounded
 * separately (no fused multiply-add), as `mul_` then `add_` do. The Hadamard passes reproduce rotated.fwht bit for
 * bit, which rounds differently from the matrix product the PyTorch path uses.
 *
 * Layout (see packing.py): a row of D codes (D a multiple of 8) is D / 8 words of `bits` bytes, each word holding 8
 * codes little-endian, code j in bits [j * bits, (j + 1) * bits). Scales and zero-points have one row per `tb` tokens
 * of `ng` groups; group g covers channels [g * D / ng, (g + 1) * D / ng).
 *
 * 8-bit scales (scales.py): the scale and zero-point rows are bytes, decoded here per row of scales from their
 * super-block's three numbers (top, low, high; float32, one triple per super-block of `sr` rows, shared by every
 * group or one per group): scale = steps[e] * top, zero = z * ((high - low) / 255) + low, in float32 with every
 * operation rounded apart, then rounded to the cache's dtype (float32, bfloat16 or float16, to nearest even), as
 * scales.decode computes them.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

/* The 8 codes of `bits` bits in the low 8 * bits bits of w, one per byte, in order (three halving steps). */
static inline uint64_t spread(uint64_t w, const int bits) {
    if (bits == 8) return w;
    const uint64_t low2 = (1ull << (2 * bits)) - 1, low1 = (1ull << bits) - 1;
    const uint64_t m16 = low2 | (low2 << 32), m8 = low1 * 0x0001000100010001ull;
    w &= (1ull << (8 * bits)) - 1;
    w = (w & ((1ull << (4 * bits)) - 1)) | ((w >> (4 * bits)) << 32); /* codes 0-3 | codes 4-7 */
    w = (w & m16) | ((w & (m16 << (2 * bits))) << (16 - 2 * bits));    /* pairs to 16-bit lanes */
    w = (w & m8) | ((w & (m8 << bits)) << (8 - bits));                  /* singles to bytes */
    return w;
}

/* 8 bytes from p, never reading at or past `end` (the end of the codes' storage). */
static inline uint64_t load_word(const uint8_t *p, const uint8_t *end) {
    uint64_t x = 0;
    if (end - p >= 8)
        memcpy(&x, p, 8); /* a fixed size: one load */
    else
        memcpy(&x, p, (size_t)(end - p));
    return x;
}

/* o[0..8) = the 8 codes in the bytes of x, times s plus z: per channel (s[0..8), z[0..8)) or one pair for all. */
static inline void affine8(uint64_t x, float *o, const float *s, const float *z) {
#if defined(__AVX2__)
    __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)x)));
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_mul_ps(v, _mm256_loadu_ps(s)), _mm256_loadu_ps(z)));
#else
    for (int j = 0; j < 8; j++) o[j] = (float)((x >> (8 * j)) & 0xFF) * s[j] + z[j];
#endif
}

static inline void affine8_one(uint64_t x, float *o, float s, float z) {
#if defined(__AVX2__)
    __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)x)));
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_mul_ps(v, _mm256_set1_ps(s)), _mm256_set1_ps(z)));
#else
    for (int j = 0; j < 8; j++) o[j] = (float)((x >> (8 * j)) & 0xFF) * s + z;
#endif
}

/* In place, the unnormalised Sylvester-Hadamard transform of every `block` consecutive values of o[0..D) (block a
 * power of two dividing D): stages h = 1, 2, 4, ... < block, each replacing the pair (a, b) = (o[i], o[i + h]) by
 * (a + b, a - b), in the order rotated.py's PyTorch version uses, so that the two agree bit for bit. */
static inline void fwht_row(float *o, int64_t D, int64_t block) {
#if defined(__AVX2__)
    if (D % 8 == 0) {
        for (int64_t i = 0; i < D; i += 8) { /* h = 1, 2, 4: inside one vector of 8 */
            __m256 v = _mm256_loadu_ps(o + i), t;
            if (block > 1) {
                t = _mm256_permute_ps(v, 0xB1); /* lanes 1 0 3 2 ... */
                v = _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xAA);
            }
            if (block > 2) {
                t = _mm256_permute_ps(v, 0x4E); /* lanes 2 3 0 1 ... */
                v = _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xCC);
            }
            if (block > 4) {
                t = _mm256_permute2f128_ps(v, v, 0x01); /* the two halves swapped */
                v = _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xF0);
            }
            _mm256_storeu_ps(o + i, v);
        }
        for (int64_t h = 8; h < block; h *= 2) /* h >= 8: whole vectors */
            for (int64_t base = 0; base < D; base += 2 * h)
                for (int64_t k = base; k < base + h; k += 8) {
                    __m256 a = _mm256_loadu_ps(o + k), b = _mm256_loadu_ps(o + k + h);
                    _mm256_storeu_ps(o + k, _mm256_add_ps(a, b));
                    _mm256_storeu_ps(o + k + h, _mm256_sub_ps(a, b));
                }
        return;
    }
#endif
    for (int64_t h = 1; h < block; h *= 2)
        for (int64_t base = 0; base < D; base += 2 * h)
            for (int64_t k = base; k < base + h; k++) {
                const float a = o[k], b = o[k + h];
                o[k] = a + b;
                o[k + h] = a - b;
            }
}

/* Where a row's scales and zero-points come from: float32 rows (16-bit scales, converted by the caller), or byte codes
 * with their super-blocks' numbers (8-bit scales). */
typedef struct {
    const void *scale, *zero; /* float32, or uint8 codes when `ranges` is set */
    const int64_t *ss;        /* strides of scale and zero (elements) over batch, head, row */
    const float *ranges;      /* NULL, or (B, H, rows / sr, rn, 3) float32: top, low, high */
    const int64_t *rs;        /* strides of ranges over batch, head, super-block (elements) */
    int64_t rn, sr;           /* triples per super-block (1: shared by every group; else ng), rows per super-block */
    const float *steps;       /* the 256 scale steps 2^(-e / 32), float32 */
    int dtype;                /* the cache's dtype, which decoded scales are rounded to: RQ_F32, RQ_BF16, RQ_F16 */
} Scales;

enum { RQ_F32 = 0, RQ_BF16 = 1, RQ_F16 = 2 };

/* x rounded to bfloat16 (to nearest, ties to even), as a float. */
static inline float round_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return x; /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&x, &u, 4);
    return x;
}

/* x rounded to float16 (to nearest, ties to even; overflow to infinity, subnormals kept), as a float. */
static inline float round_f16(float x) {
    uint32_t u, a, r;
    memcpy(&u, &x, 4);
    a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return x;     /* inf, NaN */
    if (a >= 0x477ff000u) {             /* >= 65520: beyond the largest float16 once rounded */
        r = 0x7f800000u;
    } else if (a < 0x38800000u) {       /* below 2^-14: float16 subnormals, steps of 2^-24 */
        float m;
        memcpy(&m, &a, 4);
        m = (m * 16777216.0f + 8388608.0f) - 8388608.0f; /* to an integer number of steps (< 2^10), ties to even */
        m *= 5.9604644775390625e-08f;
        memcpy(&r, &m, 4);
    } else {                            /* normal: 13 mantissa bits dropped */
        r = (a + 0xfffu + ((a >> 13) & 1u)) & ~0x1fffu;
    }
    r |= u & 0x80000000u;
    memcpy(&x, &r, 4);
    return x;
}

static inline float round_to(float x, int dtype) {
    return dtype == RQ_BF16 ? round_bf16(x) : dtype == RQ_F16 ? round_f16(x) : x;
}

#define RQ_MAX_GROUPS 1024 /* groups a decoded row of 8-bit scales may hold (stack buffers) */

/* Row `row` of 8-bit scales of one head decoded into sbuf / zbuf: `e`, `zc` its codes, `rg` its super-block's
 * numbers (one triple, or one per group). */
static inline void decode_row(const Scales *sc, const uint8_t *e, const uint8_t *zc, const float *rg, int64_t ng,
                              float *sbuf, float *zbuf) {
    const int64_t per_group = sc->rn == 1 ? 0 : 3; /* a group's triple: the shared one, or its own */
    for (int64_t g = 0; g < ng; g++) {
        const float *f = rg + per_group * g;
        const float step = (f[2] - f[1]) / 255.0f;
        sbuf[g] = round_to(sc->steps[e[g]] * f[0], sc->dtype);
        zbuf[g] = round_to((float)zc[g] * step + f[1], sc->dtype);
    }
}

static inline __attribute__((always_inline)) void rows_bits(
    const uint8_t *codes, const uint8_t *end, const int64_t *cs, const Scales *sc, float *out, const int64_t *os,
    int64_t H, int64_t T, int64_t D, const int bits, int64_t tb, int64_t ng, int64_t hadamard, int64_t first,
    int64_t last) {
    const int64_t chunk = D / ng, nwords = D / 8, words_per_group = chunk / 8;
    const int coded = sc->ranges != NULL;
    float sbuf[RQ_MAX_GROUPS], zbuf[RQ_MAX_GROUPS];
    for (int64_t bh = first / T; bh * T < last; bh++) {
        const int64_t b = bh / H, h = bh % H;
        const int64_t t0 = first > bh * T ? first - bh * T : 0, t1 = last < (bh + 1) * T ? last - bh * T : T;
        const uint8_t *codes_bh = codes + b * cs[0] + h * cs[1];
        const int64_t scales_bh = b * sc->ss[0] + h * sc->ss[1];
        const float *ranges_bh = coded ? sc->ranges + b * sc->rs[0] + h * sc->rs[1] : NULL;
        float *out_bh = out + b * os[0] + h * os[1];
        /* counters instead of a division per row: row of scales (and its place in it), super-block (and place) */
        int64_t row = t0 / tb, in_row = t0 % tb;
        int64_t block = coded ? row / sc->sr : 0, in_block = coded ? row % sc->sr : 0;
        const float *s = NULL, *z = NULL;
        int fresh = 1;
        for (int64_t t = t0; t < t1; t++) {
            if (fresh) {
                const int64_t off = scales_bh + row * sc->ss[2];
                if (coded) {
                    decode_row(sc, (const uint8_t *)sc->scale + off, (const uint8_t *)sc->zero + off,
                               ranges_bh + block * sc->rs[2], ng, sbuf, zbuf);
                    s = sbuf;
                    z = zbuf;
                } else {
                    s = (const float *)sc->scale + off;
                    z = (const float *)sc->zero + off;
                }
                fresh = 0;
            }
            const uint8_t *p = codes_bh + t * cs[2];
            float *o = out_bh + t * os[2];
            if (chunk == 1) { /* a scale per channel (per-channel keys) */
                for (int64_t w = 0; w < nwords; w++)
                    affine8(spread(load_word(p + w * bits, end), bits), o + 8 * w, s + 8 * w, z + 8 * w);
            } else { /* a scale per group of `chunk` channels, a multiple of 8 */
                for (int64_t g = 0; g < ng; g++)
                    for (int64_t w = g * words_per_group; w < (g + 1) * words_per_group; w++)
                        affine8_one(spread(load_word(p + w * bits, end), bits), o + 8 * w, s[g], z[g]);
            }
            if (hadamard > 1) fwht_row(o, D, hadamard);
            if (++in_row == tb) {
                in_row = 0;
                row++;
                fresh = 1;
                if (coded && ++in_block == sc->sr) {
                    in_block = 0;
                    block++;
                }
            }
        }
    }
}

static void rows(const uint8_t *codes, const uint8_t *end, const int64_t *cs, const Scales *sc, float *out,
                 const int64_t *os, int64_t H, int64_t T, int64_t D, int bits, int64_t tb, int64_t ng,
                 int64_t hadamard, int64_t first, int64_t last) {
    switch (bits) { /* one specialised loop per bit-width: the shifts and masks become constants */
#define RQ_CASE(k) \
    case k: rows_bits(codes, end, cs, sc, out, os, H, T, D, k, tb, ng, hadamard, first, last); break;
        RQ_CASE(1) RQ_CASE(2) RQ_CASE(3) RQ_CASE(4) RQ_CASE(5) RQ_CASE(6) RQ_CASE(7) RQ_CASE(8)
#undef RQ_CASE
    }
}

/* codes: uint8 (B, H, T, D * bits / 8) with strides cs[0..3) (last stride 1), readable up to `end`;
 * scale, zero: (B, H, T / tb, ng), strides ss[0..3), float32, or uint8 codes when `ranges` is not NULL: then ranges
 * is float32 (B, H, T / (tb * sr), rn, 3) with strides rs[0..3) (its last two dimensions contiguous), rn 1 or ng,
 * steps the 256 scale steps and dtype the cache's (RQ_F32, RQ_BF16, RQ_F16); out: float32 (B, H, T, D), strides
 * os[0..3).
 * hadamard > 1: then every row gets the unnormalised Hadamard transform of each `hadamard` consecutive channels.
 * Rows (b, h, t) are split evenly over `threads` OpenMP threads (when compiled with OpenMP and worth it). */
int rq_dequantize(const uint8_t *codes, const uint8_t *end, const int64_t *cs, const void *scale, const void *zero,
                  const int64_t *ss, const float *ranges, const int64_t *rs, int64_t rn, int64_t sr,
                  const float *steps, int dtype, float *out, const int64_t *os, int64_t B, int64_t H, int64_t T,
                  int64_t D, int bits, int64_t tb, int64_t ng, int64_t hadamard, int threads) {
    if (bits < 1 || bits > 8 || D % 8 || ng < 1 || D % ng || (D / ng != 1 && (D / ng) % 8) || tb < 1) return 1;
    if (hadamard < 0 || (hadamard > 1 && ((hadamard & (hadamard - 1)) || D % hadamard))) return 1;
    if (ranges != NULL && (ng > RQ_MAX_GROUPS || sr < 1 || (rn != 1 && rn != ng) || steps == NULL ||
                           dtype < RQ_F32 || dtype > RQ_F16))
        return 1;
    const int64_t n = B * H * T;
    if (n <= 0) return 0; /* nothing to write (and T = 0 must not be divided by) */
    const Scales sc = {scale, zero, ss, ranges, rs, rn, sr, steps, dtype};
#if defined(_OPENMP)
    if (threads > 1 && n * D >= (1 << 15)) {
#pragma omp parallel num_threads(threads)
        {
            const int64_t k = omp_get_thread_num(), m = omp_get_num_threads();
            rows(codes, end, cs, &sc, out, os, H, T, D, bits, tb, ng, hadamard, n * k / m, n * (k + 1) / m);
        }
        return 0;
    }
#endif
    (void)threads;
    rows(codes, end, cs, &sc, out, os, H, T, D, bits, tb, ng, hadamard, 0, n);
    return 0;
}
