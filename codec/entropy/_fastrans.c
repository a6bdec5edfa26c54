/* Native kernels of the lossless float-split path (spec/FORMAT.md §6, §7.2): the same bytes as
 * the numba kernels of codec/entropy/rans.py and decode_cpu.py, faster.
 *
 *  - acz_decode_lanes: chunks of an interleaved-lanes rANS stream (coder 3, 32 lanes), decoded
 *    8 lanes at a time with AVX2 (gathers for the slot tables, movemask + popcount + one
 *    permute for the shared renormalisation words: "Interleaved entropy coders", Giesen 2014),
 *    joined with the float-split rest in the same pass, straight into the tensor's bits;
 *  - acz_encode_lanes: the encoder of coder 2 (lanes = 1) and coder 3, 32-bit arithmetic;
 *  - acz_pack: chunk states and words laid out as spec §6.3 / §6.6 say;
 *  - acz_split_float: a float tensor's symbols, their histogram and its bit-packed rest, one pass.
 *
 * Plain C called through ctypes (which releases the GIL), built by setuptools with the system
 * compiler; the AVX2 code is compiled for that target only and chosen at run time
 * (acz_has_avx2), so the module runs on any x86-64 (and builds elsewhere without it).
 * The Python side falls back to the numba kernels where this module is missing or a layout
 * is not handled here (lanes != 32, F64, out arrays of other types).
 */
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ACZ_X86 1
#include <immintrin.h>
#endif

#define RANS_L 65536u

/* ------------------------------------------------------------------ decoding */

typedef struct {
    void *out;            /* uint16 symbols (join == 0) or uint{width} bits (join == 1) */
    int width;            /* 16 or 32 */
    int join;
    const uint8_t *rest;  /* float-split rest: rw bits per element, LSB first */
    int64_t rest_nbytes;
    int rw, low;
} Sink;

static inline uint32_t rest_at(const Sink *k, int64_t i)
{
    uint64_t bit = (uint64_t)i * (uint64_t)k->rw;
    int64_t pos = (int64_t)(bit >> 3);
    uint64_t w = 0;
    for (int j = 0; j < 4 && pos + j < k->rest_nbytes; j++)
        w |= (uint64_t)k->rest[pos + j] << (8 * j);
    return (uint32_t)(w >> (bit & 7)) & (uint32_t)((1u << k->rw) - 1u);
}

static inline void emit(const Sink *k, int64_t i, uint32_t s)
{
    if (!k->join) {
        ((uint16_t *)k->out)[i] = (uint16_t)s;
        return;
    }
    uint32_t r = rest_at(k, i);
    uint32_t v = ((r >> k->low) << (k->width - 1)) | (s << k->low) | (r & ((1u << k->low) - 1u));
    if (k->width == 16)
        ((uint16_t *)k->out)[i] = (uint16_t)v;
    else
        ((uint32_t *)k->out)[i] = v;
}

/* symbols t0.. of a chunk whose states are xs (lane t % lanes), one at a time; returns 0 or 2 */
static int scalar_steps(const uint16_t *words, int64_t *pp, int64_t wend, int64_t t0, int64_t m, int lanes,
                        uint32_t *xs, const uint32_t *tab, const uint32_t *symt, int P, const Sink *k, int64_t a)
{
    uint32_t mask = (uint32_t)((1u << P) - 1u);
    int64_t p = *pp;
    for (int64_t t = t0; t < m; t++) {
        int j = (int)(t % lanes);
        uint32_t x = xs[j];
        uint32_t slot = x & mask;
        uint32_t e = tab[slot];
        x = (e & 0xFFFFu) * (x >> P) + (e >> 16);
        if (x < RANS_L) {
            if (p >= wend) {
                *pp = p;
                return 2;
            }
            x = (x << 16) | words[p++];
        }
        xs[j] = x;
        emit(k, a + t, symt[slot]);
    }
    *pp = p;
    return 0;
}

#ifdef ACZ_X86
static int32_t PERM[256][8];

static void init_perm(void)
{
    for (int mk = 0; mk < 256; mk++) {
        int c = 0;
        for (int j = 0; j < 8; j++)
            PERM[mk][j] = (mk >> j) & 1 ? c++ : 0;
    }
}

/* 8 decoded symbols s (lanes of a vector) of elements i0..i0+7 to the sink; their rests start at
 * bit sh = (i0 * rw) mod 8 of byte i0 * rw / 8 (sh = 0 for rw = 8 and 24, any for a chunk size
 * that is not a multiple of 8) */
__attribute__((target("avx2,popcnt,bmi2"), always_inline)) static inline void emit8(const Sink *k, int64_t i0, __m256i s,
                                                                                   __m256i jrw)
{
    if (!k->join) {
        __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(s, s), 0xD8);
        _mm_storeu_si128((__m128i *)((uint16_t *)k->out + i0), _mm256_castsi256_si128(p));
        return;
    }
    const int rw = k->rw;
    uint64_t bit0 = (uint64_t)i0 * (uint64_t)rw;
    int64_t byte0 = (int64_t)(bit0 >> 3);
    int sh = (int)(bit0 & 7);
    __m256i r;
    if (byte0 + 32 > k->rest_nbytes) { /* the rest's last bytes: one at a time */
        uint32_t tmp[8];
        _mm256_storeu_si256((__m256i *)tmp, s);
        for (int j = 0; j < 8; j++)
            emit(k, i0 + j, tmp[j]);
        return;
    }
    if (rw * 8 + sh <= 64) { /* 8 rests in one 64-bit load, each rw-bit field deposited in its own byte */
        uint64_t w;
        memcpy(&w, k->rest + byte0, 8);
        uint64_t f = _pdep_u64(w >> sh, 0x0101010101010101ull * ((1u << rw) - 1u));
        r = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)f));
    } else if (rw == 24) { /* 3 bytes each (sh = 0): two 16-byte loads, bytes shuffled into 32-bit lanes */
        const __m256i sh = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                            0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
        __m256i b = _mm256_setr_m128i(_mm_loadu_si128((const __m128i *)(k->rest + byte0)),
                                      _mm_loadu_si128((const __m128i *)(k->rest + byte0 + 12)));
        r = _mm256_shuffle_epi8(b, sh);
    } else {
        __m256i rel = _mm256_add_epi32(jrw, _mm256_set1_epi32(sh));
        __m256i g = _mm256_i32gather_epi32((const int *)(k->rest + byte0), _mm256_srli_epi32(rel, 3), 1);
        r = _mm256_and_si256(_mm256_srlv_epi32(g, _mm256_and_si256(rel, _mm256_set1_epi32(7))),
                             _mm256_set1_epi32((int)((1u << rw) - 1u)));
    }
    __m128i lo = _mm_cvtsi32_si128(k->low), top = _mm_cvtsi32_si128(k->width - 1);
    __m256i v = _mm256_or_si256(_mm256_sll_epi32(_mm256_srl_epi32(r, lo), top),
                                _mm256_or_si256(_mm256_sll_epi32(s, lo),
                                                _mm256_and_si256(r, _mm256_set1_epi32((int)((1u << k->low) - 1u)))));
    if (k->width == 32) {
        _mm256_storeu_si256((__m256i *)((uint32_t *)k->out + i0), v);
    } else {
        __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0xD8);
        _mm_storeu_si128((__m128i *)((uint16_t *)k->out + i0), _mm256_castsi256_si128(p));
    }
}

#define STEPQ(X, T, p, a)                                                                           \
    do {                                                                                            \
        __m256i slot = _mm256_and_si256(X, vmask);                                                  \
        __m256i e = _mm256_i32gather_epi32((const int *)tab, slot, 4);                              \
        __m256i s = _mm256_i32gather_epi32((const int *)symt, slot, 4);                             \
        X = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_and_si256(e, lo16), _mm256_srl_epi32(X, vP)), \
                             _mm256_srli_epi32(e, 16));                                             \
        __m256i need = _mm256_cmpeq_epi32(_mm256_srli_epi32(X, 16), zero);                          \
        int mk = _mm256_movemask_ps(_mm256_castsi256_ps(need));                                     \
        __m256i wv = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(words + p)));          \
        wv = _mm256_permutevar8x32_epi32(wv, _mm256_loadu_si256((const __m256i *)PERM[mk]));        \
        X = _mm256_blendv_epi8(X, _mm256_or_si256(_mm256_slli_epi32(X, 16), wv), need);             \
        p += _mm_popcnt_u32((unsigned)mk);                                                          \
        emit8(k, a + (T), s, jrw);                                                                  \
    } while (0)
#define STEP(X, T) STEPQ(X, T, p, a)

/* full rounds of 32 symbols while 32 words can be read; returns the next symbol index */
__attribute__((target("avx2,popcnt,bmi2"))) static int64_t simd_rounds(const uint16_t *words, int64_t *pp, int64_t wend,
                                                                 int64_t m, uint32_t *xs, const uint32_t *tab,
                                                                 const uint32_t *symt, int P, const Sink *k, int64_t a)
{
    const __m256i vmask = _mm256_set1_epi32((int)((1u << P) - 1u)), lo16 = _mm256_set1_epi32(0xFFFF);
    const __m256i zero = _mm256_setzero_si256();
    const __m128i vP = _mm_cvtsi32_si128(P);
    const __m256i jrw = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(k->join ? k->rw : 0));
    __m256i X0 = _mm256_loadu_si256((const __m256i *)xs), X1 = _mm256_loadu_si256((const __m256i *)(xs + 8));
    __m256i X2 = _mm256_loadu_si256((const __m256i *)(xs + 16)), X3 = _mm256_loadu_si256((const __m256i *)(xs + 24));
    int64_t p = *pp, t = 0;
    for (; t + 32 <= m && p + 32 <= wend; t += 32) {
        STEP(X0, t);
        STEP(X1, t + 8);
        STEP(X2, t + 16);
        STEP(X3, t + 24);
    }
    _mm256_storeu_si256((__m256i *)xs, X0);
    _mm256_storeu_si256((__m256i *)(xs + 8), X1);
    _mm256_storeu_si256((__m256i *)(xs + 16), X2);
    _mm256_storeu_si256((__m256i *)(xs + 24), X3);
    *pp = p;
    return t;
}

/* two chunks of m symbols each in lock step (8 independent state vectors: the gathers' latency
 * overlaps better), full rounds while both can read 32 words; returns the next symbol index */
__attribute__((target("avx2,popcnt,bmi2"))) static int64_t simd_rounds2(const uint16_t *words, int64_t *ppa, int64_t wenda,
                                                                  int64_t *ppb, int64_t wendb, int64_t m, uint32_t *xa,
                                                                  uint32_t *xb, const uint32_t *tab, const uint32_t *symt, int P,
                                                                  const Sink *k, int64_t a, int64_t b)
{
    const __m256i vmask = _mm256_set1_epi32((int)((1u << P) - 1u)), lo16 = _mm256_set1_epi32(0xFFFF);
    const __m256i zero = _mm256_setzero_si256();
    const __m128i vP = _mm_cvtsi32_si128(P);
    const __m256i jrw = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(k->join ? k->rw : 0));
    __m256i A0 = _mm256_loadu_si256((const __m256i *)xa), A1 = _mm256_loadu_si256((const __m256i *)(xa + 8));
    __m256i A2 = _mm256_loadu_si256((const __m256i *)(xa + 16)), A3 = _mm256_loadu_si256((const __m256i *)(xa + 24));
    __m256i B0 = _mm256_loadu_si256((const __m256i *)xb), B1 = _mm256_loadu_si256((const __m256i *)(xb + 8));
    __m256i B2 = _mm256_loadu_si256((const __m256i *)(xb + 16)), B3 = _mm256_loadu_si256((const __m256i *)(xb + 24));
    int64_t pa = *ppa, pb = *ppb, t = 0;
    for (; t + 32 <= m && pa + 32 <= wenda && pb + 32 <= wendb; t += 32) {
        STEPQ(A0, t, pa, a);
        STEPQ(B0, t, pb, b);
        STEPQ(A1, t + 8, pa, a);
        STEPQ(B1, t + 8, pb, b);
        STEPQ(A2, t + 16, pa, a);
        STEPQ(B2, t + 16, pb, b);
        STEPQ(A3, t + 24, pa, a);
        STEPQ(B3, t + 24, pb, b);
    }
    _mm256_storeu_si256((__m256i *)xa, A0), _mm256_storeu_si256((__m256i *)(xa + 8), A1);
    _mm256_storeu_si256((__m256i *)(xa + 16), A2), _mm256_storeu_si256((__m256i *)(xa + 24), A3);
    _mm256_storeu_si256((__m256i *)xb, B0), _mm256_storeu_si256((__m256i *)(xb + 8), B1);
    _mm256_storeu_si256((__m256i *)(xb + 16), B2), _mm256_storeu_si256((__m256i *)(xb + 24), B3);
    *ppa = pa, *ppb = pb;
    return t;
}
#endif

static int use_simd = 0;

typedef struct {
    int64_t p, wend, m, a, t;
    int w;
    uint32_t xs[32];
} Chunk;

/* a chunk's states read and checked (status 0, 1 or 2) */
static int32_t chunk_open(Chunk *c, const uint16_t *words, int64_t w0, int64_t wend, int64_t m, int lanes, int64_t a)
{
    c->w = m < lanes ? (int)m : lanes;
    c->wend = wend, c->m = m, c->a = a, c->t = 0;
    if (wend - w0 < 2 * (int64_t)c->w)
        return 2;
    for (int j = 0; j < c->w; j++) {
        c->xs[j] = (uint32_t)words[w0 + 2 * j] | ((uint32_t)words[w0 + 2 * j + 1] << 16);
        if (c->xs[j] < RANS_L)
            return 1;
    }
    c->p = w0 + 2 * c->w;
    return 0;
}

/* the rest of a chunk (vector rounds, then one symbol at a time) and its final checks */
static int32_t chunk_finish(Chunk *c, const uint16_t *words, int lanes, const uint32_t *tab, const uint32_t *symt, int P,
                            const Sink *k)
{
#ifdef ACZ_X86
    if (use_simd && lanes == 32 && c->m >= 32 && c->t + 32 <= c->m) {
        int64_t p = c->p;
        c->t += simd_rounds(words, &p, c->wend, c->m - c->t, c->xs, tab, symt, P, k, c->a + c->t);
        c->p = p;
    }
#endif
    if (scalar_steps(words, &c->p, c->wend, c->t, c->m, lanes, c->xs, tab, symt, P, k, c->a))
        return 2;
    for (int j = 0; j < c->w; j++)
        if (c->xs[j] != RANS_L)
            return 3;
    return c->p != c->wend ? 4 : 0;
}

/* one chunk of m symbols (words [w0, wend)) to elements a..a+m-1; the status codes of decode_cpu.py */
static int32_t decode_chunk(const uint16_t *words, int64_t w0, int64_t wend, int64_t m, int lanes, const uint32_t *tab,
                            const uint32_t *symt, int P, const Sink *k, int64_t a)
{
    uint32_t xs[32];
    int w = m < lanes ? (int)m : lanes;
    if (wend - w0 < 2 * (int64_t)w)
        return 2;
    for (int j = 0; j < w; j++) {
        xs[j] = (uint32_t)words[w0 + 2 * j] | ((uint32_t)words[w0 + 2 * j + 1] << 16);
        if (xs[j] < RANS_L)
            return 1;
    }
    int64_t p = w0 + 2 * w, t = 0;
#ifdef ACZ_X86
    if (use_simd && lanes == 32 && m >= 32)
        t = simd_rounds(words, &p, wend, m, xs, tab, symt, P, k, a);
#endif
    if (scalar_steps(words, &p, wend, t, m, lanes, xs, tab, symt, P, k, a))
        return 2;
    for (int j = 0; j < w; j++)
        if (xs[j] != RANS_L)
            return 3;
    return p != wend ? 4 : 0;
}

/* chunks [c0, c1) of a stream (chunk_w[c]: its first word, chunk_w[c + 1] its end; lanes <= 32).
 * out: uint16 symbols (join = 0) or the float-split bits, uint{width} (join = 1; rw <= 25). */
int acz_decode_lanes(const uint16_t *words, const int64_t *chunk_w, int64_t cs, int64_t n, const uint32_t *tab,
                     const uint32_t *symt, int P, int lanes, void *out, int join, const uint8_t *rest, int64_t rest_nbytes,
                     int rw, int low, int width, int64_t c0, int64_t c1, int32_t *status)
{
    if (lanes < 1 || lanes > 32 || P < 0 || P > 16 || (join && (rw > 25 || (width != 16 && width != 32))))
        return -1;
    Sink k = {out, width, join, rest, rest_nbytes, rw, low};
    int64_t c = c0;
#ifdef ACZ_X86
    if (use_simd && lanes == 32) { /* full chunks two at a time, in lock step */
        Chunk A, B;
        for (; c + 2 <= c1 && (c + 2) * cs <= n && cs >= 32; c += 2) {
            int32_t sa = chunk_open(&A, words, chunk_w[c], chunk_w[c + 1], cs, lanes, c * cs);
            int32_t sb = chunk_open(&B, words, chunk_w[c + 1], chunk_w[c + 2], cs, lanes, (c + 1) * cs);
            if (!sa && !sb) {
                int64_t t = simd_rounds2(words, &A.p, A.wend, &B.p, B.wend, cs, A.xs, B.xs, tab, symt, P, &k, A.a, B.a);
                A.t = B.t = t;
            }
            status[c] = sa ? sa : chunk_finish(&A, words, lanes, tab, symt, P, &k);
            status[c + 1] = sb ? sb : chunk_finish(&B, words, lanes, tab, symt, P, &k);
        }
    }
#endif
    for (; c < c1; c++) {
        int64_t a = c * cs, m = n - a < cs ? n - a : cs;
        status[c] = decode_chunk(words, chunk_w[c], chunk_w[c + 1], m, lanes, tab, symt, P, &k, a);
    }
    return 0;
}

/* ------------------------------------------------------------------ encoding */

static inline int64_t sym_at(const void *sym, int sym_kind, int64_t k)
{
    switch (sym_kind) {
    case 1: return ((const uint8_t *)sym)[k];
    case -1: return ((const int8_t *)sym)[k];
    case 2: return ((const uint16_t *)sym)[k];
    default: return ((const int16_t *)sym)[k];
    }
}

/* chunks [c0, c1) of sym − offset (sym_kind: ±1 / ±2 = (un)signed 8 / 16-bit), as rans.py's
 * _encode_chunk_lanes: chunk c's words end at scratch[min(a + cs, n)] (the region of its own
 * symbols), states[c * lanes + l] its lanes' final states, nwords[c] its word count.
 * x / f by a reciprocal (Granlund & Montgomery 1994, thm 4.2: rcp[s] = ceil(2^(32+l) / f),
 * l = ceil(log2 f), exact for every 32-bit x), renormalisation without branches. */
int acz_encode_lanes(const void *sym, int sym_kind, int64_t n, int64_t cs, const uint32_t *freq, const uint32_t *cum, int P,
                     int lanes, int64_t offset, const uint64_t *rcp, const uint8_t *rsh, uint16_t *scratch, uint32_t *states,
                     int64_t *nwords, int64_t c0, int64_t c1)
{
    if (lanes < 1 || lanes > 32 || P < 1 || P > 16)
        return -1;
    for (int64_t c = c0; c < c1; c++) {
        int64_t a = c * cs, b = a + cs < n ? a + cs : n;
        uint32_t xs[32];
        for (int l = 0; l < lanes; l++)
            xs[l] = RANS_L;
        uint16_t *end = scratch + b;
        int64_t nw = 0;
        int l = (int)((b - 1 - a) % lanes);
        for (int64_t k = b - 1; k >= a; k--) {
            int64_t s = sym_at(sym, sym_kind, k) - offset;
            uint32_t f = freq[s];
            uint32_t x = xs[l];
            /* a word out when x >= f * 2^(32-P); the slot written is free either way (nw < b - k) */
            int big = (uint64_t)x >= ((uint64_t)f << (32 - P));
            *(end - 1 - nw) = (uint16_t)x;
            nw += big;
            x >>= (big << 4);
            uint32_t q = (uint32_t)(((unsigned __int128)x * rcp[s]) >> (32 + rsh[s]));
            xs[l] = (q << P) + (x - q * f) + cum[s];
            l = l ? l - 1 : lanes - 1;
        }
        memcpy(states + c * lanes, xs, sizeof(uint32_t) * (size_t)lanes);
        nwords[c] = nw;
    }
    return 0;
}

#ifdef ACZ_X86
static int32_t ENC_PERM[256][8];

static void init_enc_perm(void)
{
    for (int mk = 0; mk < 256; mk++) { /* the set lanes, ascending, in the top popcount(mk) slots */
        int c = __builtin_popcount((unsigned)mk), i = 8 - c;
        for (int j = 0; j < 8; j++)
            ENC_PERM[mk][j] = 0;
        for (int j = 0; j < 8; j++)
            if ((mk >> j) & 1)
                ENC_PERM[mk][i++] = j;
    }
}

/* groups [g0, g1) of 8 symbols (a + 8g .. a + 8g + 7: lanes 8(g mod 4) ..) of a 32-lane chunk,
 * descending, uint16 symbols; x / f as floor(x * (1/f) + 2^-18) in double precision, exact:
 * the product is within 2^-20 of x / f = q + r / f, r / f <= 1 - 2^-16. Words of the lanes that
 * renormalise go, ascending by lane, right below the words already written (as the scalar loop
 * writes them one by one, highest lane first). */
__attribute__((target("avx2,popcnt"))) static int64_t simd_encode_groups(const uint16_t *sym, int64_t a, int64_t g1, int64_t offset,
                                                                        const uint32_t *fcum, const double *invf,
                                                                        int P, uint32_t *xs, uint16_t *end, int64_t nw)
{
    const __m256i vlim = _mm256_set1_epi32(0), lo16 = _mm256_set1_epi32(0xFFFF), flip = _mm256_set1_epi32((int)0x80000000u);
    const __m256i voff = _mm256_set1_epi32((int)offset);
    const __m256d two31 = _mm256_set1_pd(2147483648.0), bias = _mm256_set1_pd(1.0 / (1 << 18));
    const __m128i sP = _mm_cvtsi32_si128(32 - P), vP = _mm_cvtsi32_si128(P);
    (void)vlim;
    for (int64_t g = g1 - 1; g >= 0; g--) {
        uint32_t *xp = xs + 8 * (g & 3);
        __m256i X = _mm256_loadu_si256((const __m256i *)xp);
        __m256i s = _mm256_sub_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(sym + a + 8 * g))), voff);
        __m256i fc = _mm256_i32gather_epi32((const int *)fcum, s, 4); /* freq | cum << 16 */
        __m256i f = _mm256_and_si256(fc, lo16), c = _mm256_srli_epi32(fc, 16);
        __m256i xmax = _mm256_sll_epi32(f, sP);
        __m256i big = _mm256_cmpeq_epi32(_mm256_max_epu32(X, xmax), X);
        int mk = _mm256_movemask_ps(_mm256_castsi256_ps(big));
        { /* no branch: whether any lane renormalises is a coin toss for the predictor */
            __m256i w = _mm256_permutevar8x32_epi32(_mm256_and_si256(X, lo16), _mm256_loadu_si256((const __m256i *)ENC_PERM[mk]));
            __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(w, w), 0xD8);
            _mm_storeu_si128((__m128i *)(end - nw - 8), _mm256_castsi256_si128(p));
            nw += _mm_popcnt_u32((unsigned)mk);
            X = _mm256_blendv_epi8(X, _mm256_srli_epi32(X, 16), big);
        }
        __m256i xf = _mm256_xor_si256(X, flip); /* x - 2^31 as a signed int, converted, + 2^31 */
        __m256d xlo = _mm256_add_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(xf)), two31);
        __m256d xhi = _mm256_add_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(xf, 1)), two31);
        __m256d ilo = _mm256_i32gather_pd(invf, _mm256_castsi256_si128(s), 8);
        __m256d ihi = _mm256_i32gather_pd(invf, _mm256_extracti128_si256(s, 1), 8);
        __m128i qlo = _mm256_cvttpd_epi32(_mm256_add_pd(_mm256_mul_pd(xlo, ilo), bias));
        __m128i qhi = _mm256_cvttpd_epi32(_mm256_add_pd(_mm256_mul_pd(xhi, ihi), bias));
        __m256i q = _mm256_setr_m128i(qlo, qhi);
        X = _mm256_add_epi32(_mm256_add_epi32(_mm256_sll_epi32(q, vP), _mm256_sub_epi32(X, _mm256_mullo_epi32(q, f))), c);
        _mm256_storeu_si256((__m256i *)xp, X);
    }
    return nw;
}
#endif

/* as acz_encode_lanes for 32 lanes and uint16 symbols (no symbol owning every slot, so freq and cum
 * fit 16 bits: fcum[s] = freq[s] | cum[s] << 16), AVX2 */
int acz_encode_lanes32(const uint16_t *sym, int64_t n, int64_t cs, const uint32_t *freq, const uint32_t *cum,
                       const uint32_t *fcum, int P, int64_t offset, const double *invf, uint16_t *scratch, uint32_t *states,
                       int64_t *nwords, int64_t c0, int64_t c1)
{
#ifdef ACZ_X86
    if (!use_simd || P < 1 || P > 16)
        return -1;
    for (int64_t c = c0; c < c1; c++) {
        int64_t a = c * cs, b = a + cs < n ? a + cs : n, m = b - a, G = m / 8;
        uint32_t xs[32];
        for (int l = 0; l < 32; l++)
            xs[l] = RANS_L;
        uint16_t *end = scratch + b;
        int64_t nw = 0;
        for (int64_t k = b - 1; k >= a + 8 * G; k--) { /* the top partial group, one by one */
            int l = (int)((k - a) & 31);
            int64_t s = (int64_t)sym[k] - offset;
            uint32_t f = freq[s], x = xs[l];
            if ((uint64_t)x >= ((uint64_t)f << (32 - P))) {
                *(end - 1 - nw) = (uint16_t)x;
                nw++;
                x >>= 16;
            }
            xs[l] = ((x / f) << P) + (x % f) + cum[s];
        }
        nw = simd_encode_groups(sym, a, G, offset, fcum, invf, P, xs, end, nw);
        memcpy(states + c * 32, xs, sizeof(xs));
        nwords[c] = nw;
    }
    return 0;
#else
    (void)sym, (void)n, (void)cs, (void)freq, (void)cum, (void)fcum, (void)P, (void)offset, (void)invf, (void)scratch, (void)states;
    (void)nwords, (void)c0, (void)c1;
    return -1;
#endif
}

/* chunk bytes (spec §6.3, §6.6): each chunk's min(lanes, m) states (u32 LE), then its words in
 * decode order; out must hold sum(lengths) bytes (lengths computed by the caller). */
int acz_pack(const uint32_t *states, const int64_t *nwords, const uint16_t *scratch, int64_t cs, int64_t n, int lanes,
             int64_t c0, int64_t c1, const int64_t *offsets, uint8_t *out)
{
    for (int64_t c = c0; c < c1; c++) {
        int64_t a = c * cs, b = a + cs < n ? a + cs : n;
        int w = b - a < lanes ? (int)(b - a) : lanes;
        uint8_t *o = out + offsets[c];
        for (int l = 0; l < w; l++) { /* little-endian (the module is built for little-endian hosts only) */
            uint32_t x = states[c * lanes + l];
            o[0] = (uint8_t)x, o[1] = (uint8_t)(x >> 8), o[2] = (uint8_t)(x >> 16), o[3] = (uint8_t)(x >> 24);
            o += 4;
        }
        memcpy(o, scratch + b - nwords[c], 2 * (size_t)nwords[c]);
    }
    return 0;
}

/* elements [i0, i1) of a float tensor's bits (uint16 or uint32, width 16 / 32): their symbols (the
 * exponent and top k mantissa bits, uint16), counted into hist (2^(e+k) int64), and the rest (sign,
 * low mantissa bits: rw = width − e − k bits each) bit-packed LSB first into rest, which the
 * caller zeroed; i0 * rw must be a multiple of 8 (so ranges write disjoint bytes). */
#ifdef ACZ_X86
/* elements [i0, i0 + 8m) of 16-bit floats with rw <= 8: symbols and rests 8 at a time, the rests'
 * rw-bit fields gathered from their bytes (pext) into rw bytes; counts in 4 tables (no chain of
 * increments on one counter). Returns the rest's next byte. */
__attribute__((target("avx2,bmi2"))) static uint8_t *split16_simd(const uint16_t *bits, int64_t i0, int64_t m, int low, int rw,
                                                                 uint32_t smask, uint16_t *sym, int64_t *h4, int64_t hs, uint8_t *o)
{
    const __m256i vs = _mm256_set1_epi32((int)smask), vl = _mm256_set1_epi32((int)((1u << low) - 1u));
    const __m128i cl = _mm_cvtsi32_si128(low);
    const uint64_t pm = 0x0101010101010101ull * ((1u << rw) - 1u);
    for (int64_t g = 0; g < m; g++) {
        int64_t i = i0 + 8 * g;
        __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(bits + i)));
        __m256i sy = _mm256_and_si256(_mm256_srl_epi32(b, cl), vs);
        __m256i r = _mm256_or_si256(_mm256_sll_epi32(_mm256_srli_epi32(b, 15), cl), _mm256_and_si256(b, vl));
        __m128i sy16 = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(sy, sy), 0xD8));
        _mm_storeu_si128((__m128i *)(sym + i), sy16);
        __m128i r16 = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8));
        uint64_t r8 = (uint64_t)_mm_cvtsi128_si64(_mm_packus_epi16(r16, r16));
        uint64_t packed = _pext_u64(r8, pm);
        memcpy(o, &packed, 8); /* rw bytes valid; the rest is overwritten next (the caller leaves 8 bytes of room) */
        o += rw;
        uint16_t t[8];
        _mm_storeu_si128((__m128i *)t, sy16);
        h4[t[0]]++, h4[hs + t[1]]++, h4[2 * hs + t[2]]++, h4[3 * hs + t[3]]++;
        h4[t[4]]++, h4[hs + t[5]]++, h4[2 * hs + t[6]]++, h4[3 * hs + t[7]]++;
    }
    return o;
}
#endif

int acz_split_float(const void *bits, int width, int e, int k, int64_t i0, int64_t i1, uint16_t *sym, int64_t *hist,
                    uint8_t *rest, int64_t rest_nbytes)
{
    int low = width - 1 - e - k, rw = width - e - k;
    if ((width != 16 && width != 32) || rw > 25 || ((uint64_t)i0 * rw) & 7)
        return -1;
    uint32_t smask = (1u << (e + k)) - 1u, lmask = (1u << low) - 1u;
    uint8_t *o = rest + (((uint64_t)i0 * rw) >> 3);
    uint64_t acc = 0;
    int nacc = 0;
#ifdef ACZ_X86
    if (use_simd && width == 16 && rw <= 8) {
        /* groups of 8 while their 8-byte rest stores stay inside this range's bytes of the rest
         * (another thread writes the next range's) */
        int64_t m = (i1 - i0) / 8, lim = (int64_t)(((uint64_t)i1 * rw) >> 3);
        if (lim > rest_nbytes)
            lim = rest_nbytes;
        while (m > 0 && (int64_t)(((uint64_t)(i0 + 8 * m) * rw) >> 3) + 8 - rw > lim)
            m--;
        int64_t hs = (int64_t)smask + 1;
        int64_t *h4 = (int64_t *)calloc((size_t)(4 * hs), sizeof(int64_t));
        if (h4 && m > 0) {
            o = split16_simd((const uint16_t *)bits, i0, m, low, rw, smask, sym, h4, hs, o);
            for (int64_t s = 0; s < hs; s++)
                hist[s] += h4[s] + h4[hs + s] + h4[2 * hs + s] + h4[3 * hs + s];
            i0 += 8 * m;
        }
        free(h4);
    }
#endif
    for (int64_t i = i0; i < i1; i++) {
        uint32_t b = width == 16 ? ((const uint16_t *)bits)[i] : ((const uint32_t *)bits)[i];
        uint32_t s = (b >> low) & smask;
        sym[i] = (uint16_t)s;
        hist[s]++;
        uint32_t r = ((b >> (width - 1)) << low) | (b & lmask);
        acc |= (uint64_t)r << nacc;
        nacc += rw;
        if (nacc >= 32) {
            o[0] = (uint8_t)acc, o[1] = (uint8_t)(acc >> 8), o[2] = (uint8_t)(acc >> 16), o[3] = (uint8_t)(acc >> 24);
            o += 4;
            acc >>= 32;
            nacc -= 32;
        }
    }
    while (nacc > 0) {
        *o++ = (uint8_t)acc;
        acc >>= 8;
        nacc -= 8;
    }
    return 0;
}

int acz_has_avx2(void) { return use_simd; }

int acz_set_simd(int on);

/* once, before any call: the permutation table and the CPU check */
int acz_init(void)
{
#ifdef ACZ_X86
    init_perm();
    init_enc_perm();
#endif
    return acz_set_simd(1);
}

/* tests: 0 forces the portable path (the same bytes), 1 the AVX2 one where the CPU has it */
int acz_set_simd(int on)
{
#ifdef ACZ_X86
    use_simd = on && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi2");
#else
    (void)on;
#endif
    return use_simd;
}

/* ------------------------------------------------------------------ module (loaded through ctypes) */

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_fastrans", "native float-split kernels (ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__fastrans(void)
{
    acz_init();
    return PyModule_Create(&moddef);
}
