/* CSR's decode step on the CPU, fused: packed codes -> what attention reads.
 *
 * csr_decode: for every coded token of every row and every KV head, in one pass over the codes and
 * without temporaries: unpack the head's indices and coefficients (the bit layout of
 * csr_core/code_layout.py), sum coef * atom over the row's atoms (what embedding_bag does in the torch
 * path), add the refined vectors' extra atoms (one flag bit per vector, their codes in order in a second
 * stream), add the centre, rotate by RoPE when cos/sin are given, and then either write the head vector
 * into its slot of `out` (OP_DECODE) or, for keys, only its dot products with the G query heads that share
 * the KV head (OP_SCORE: G floats written instead of d_h; the keys are never stored).
 * The torch path it replaces (csr_runtime/cache.py, `_assemble`) makes ~25 passes over the same data.
 *
 * csr_value_weights: values aggregated as codes. sum_t w_t v_t = sum_atoms a_atom * atom + mu * sum_t w_t with
 * a_atom = sum of w_t * coef over the pairs naming that atom: one scatter per pair instead of a d_h-wide
 * decode per value; the product of a with the atoms is left to BLAS (csr_runtime/native.py).
 *
 * csr_mp_gram / csr_mp_amx / csr_mp_direct: matching pursuit, through the Gram matrix for many vectors (the
 * product X D^T given, or made here on Intel AMX), or computing every score itself for a decode step's few
 * (csr_runtime/sparse_coding.py chooses).
 *
 * Built and loaded by csr_runtime/native.py with the system C compiler; parity with the torch
 * path is tested in tests/test_native.py.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

enum { FMT_FP16 = 0, FMT_FP8 = 1, FMT_INT8 = 2, FMT_E3M1 = 3 };
enum { MAX_DIM = 1024, MAX_FIELDS = 1024, MAX_CODE_BYTES = 6 * MAX_FIELDS }; /* what the stack buffers hold: head_dim,
                                                                          pairs and bytes per code */

typedef struct {
    int64_t groups, k, index_bits, index_bytes, nbytes, fmt;
} layout_t;

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exp = 113;
        while (!(mant & 0x400)) { mant <<= 1; exp--; }
        bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* `width` bits (<= 16) starting at bit `pos` of a little-endian stream readable 8 bytes past every field */
static inline uint32_t read_field(const uint8_t *p, int64_t pos, int64_t width) {
    uint64_t word;
    memcpy(&word, p + (pos >> 3), 8);
    return (uint32_t)(word >> (pos & 7)) & ((1u << width) - 1);
}

/* Every (index, coefficient) pair of one code: idx[f], coef[f] for f < F = groups * k, in stream order.
   `len`: bytes readable from `code` (to the end of the codes); the last codes, with fewer than 8 bytes after
   them, are read from a zero-padded copy, so every field is one unchecked 8-byte load. F and bits (L's
   index_bits) are arguments so that a kernel instantiated for one layout passes constants: the loops unroll
   with every shift known (see LAYOUT_* below). */
static inline __attribute__((always_inline)) void unpack_code(const uint8_t *code, int64_t len, const layout_t *L,
                                                              const float *lut, float scale, int64_t *idx,
                                                              float *coef, const int64_t F, const int64_t bits) {
    uint8_t padded[MAX_CODE_BYTES + 8];
    if (len < L->nbytes + 8) {
        memset(padded, 0, L->nbytes + 8);
        memcpy(padded, code, L->nbytes);
        code = padded;
    }
    for (int64_t f = 0; f < F; f++) idx[f] = read_field(code, f * bits, bits);
    const uint8_t *c = code + L->index_bytes;
    switch (L->fmt) {
    case FMT_E3M1:
        for (int64_t f = 0; f < F; f++) coef[f] = lut[read_field(code, F * bits + 5 * f, 5)] * scale;
        break;
    case FMT_FP8:
        for (int64_t f = 0; f < F; f++) coef[f] = lut[c[f]] * scale;
        break;
    case FMT_FP16:
        for (int64_t f = 0; f < F; f++) coef[f] = half_to_float((uint16_t)(c[2 * f] | (c[2 * f + 1] << 8)));
        break;
    default: /* int8: per group an fp16 scale, then its k int8 */
        for (int64_t g = 0; g < L->groups; g++) {
            const uint8_t *grp = c + g * (2 + L->k);
            const float group_scale = half_to_float((uint16_t)(grp[0] | (grp[1] << 8)));
            for (int64_t a = 0; a < L->k; a++) coef[g * L->k + a] = (float)(int8_t)grp[2 + a] * group_scale;
        }
    }
}

/* The atom a row-local index names (the offline atoms, then the row's `slots` extra atoms); 0 past them. */
static inline const float *row_atom(int64_t i, const float *offline, int64_t n_offline, const float *row_extra,
                                    int64_t slots, int64_t w) {
    return i < n_offline ? offline + i * w : i < n_offline + slots ? row_extra + (i - n_offline) * w : 0;
}

/* acc[0:w] += sum over the k pairs: coef * atom[index]; 1 for an index past the row's atoms. Inlined with a
   constant w, the loop is unrolled. */
static inline __attribute__((always_inline)) int add_atoms(float *acc, const int64_t *idx, const float *coef,
                                                           int64_t k, const float *offline, int64_t n_offline,
                                                           const float *row_extra, int64_t slots, const int64_t w) {
    for (int64_t a = 0; a < k; a++) {
        const float *atom = row_atom(idx[a], offline, n_offline, row_extra, slots, w);
        if (!atom) return 1;
        const float c = coef[a];
        for (int64_t j = 0; j < w; j++) acc[j] += c * atom[j];
    }
    return 0;
}

static int64_t popcount_prefix(const uint8_t *mask, int64_t bits) {
    int64_t count = 0, full = bits >> 3;
    for (int64_t i = 0; i < full; i++) count += __builtin_popcount(mask[i]);
    if (bits & 7) count += __builtin_popcount(mask[full] & ((1u << (bits & 7)) - 1));
    return count;
}

/* sum a[j] * b[j] in 8 lanes (vectorised without reassociation flags) */
static inline float dot(const float *a, const float *b, int64_t n) {
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s = 0.0f;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int i = 0; i < 8; i++) lane[i] += a[j + i] * b[j + i];
    for (; j < n; j++) s += a[j] * b[j];
    return s + (((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7])));
}

enum { OP_DECODE = 0, OP_SCORE = 1, TILE = 64 }; /* TILE: tokens and score rows score_block gathers */

typedef struct {
    const uint8_t *codes, *mask, *rcodes;
    int64_t B, n, mask_bytes, R, H, n_offline, slots, so_b, so_h, so_t, block, rope_width, cos_row, op, G;
    layout_t L, RL;
    const float *lut, *row_scale, *offline, *extra, *center, *cos, *sin, *query;
    float *out; /* OP_DECODE: (B, H, n, d) at strides so_*; OP_SCORE: scores (B, H, G, n), so_t (0: n) floats
                   from one query head's row to the next */
} job_t;

/* A code layout's sizes as constants for an instantiated kernel (0: read from the job's layouts): groups (KV heads x
   chunks) and atoms k per code, index bits, and the refinement's k. The key-score and value kernels have one
   instance with these as constants, every loop over a code unrolled with its shifts known (~10-30 % faster); any
   other layout takes the loops. CSR_INSTANCE is set at build time: csr_runtime/native.py builds one library per
   layout in use (`_library_for`); without it, the embedded defaults' layout on the default model (SmolLM2: 3 KV
   heads, 4 atoms each, 2048 atoms = 11-bit indices, 4 refinement atoms). Instances are e3m1 layouts only. */
typedef struct { int64_t groups, k, bits, rk; } layout_consts_t;
#ifndef CSR_INSTANCE
#define CSR_INSTANCE 3, 4, 11, 4
#endif
static const layout_consts_t LAYOUT_ANY = {0, 0, 0, 0}, LAYOUT_INSTANCE = {CSR_INSTANCE};
void csr_instance(int64_t *out) { /* the instance's layout: groups, k, index bits, refinement k */
    out[0] = LAYOUT_INSTANCE.groups, out[1] = LAYOUT_INSTANCE.k, out[2] = LAYOUT_INSTANCE.bits, out[3] = LAYOUT_INSTANCE.rk;
}
static inline int is_instance_layout(const layout_t *L, const layout_t *RL, int64_t R) {
    return L->fmt == FMT_E3M1 && L->groups == LAYOUT_INSTANCE.groups && L->k == LAYOUT_INSTANCE.k &&
           L->index_bits == LAYOUT_INSTANCE.bits &&
           (R == 0 || (RL->k == LAYOUT_INSTANCE.rk && RL->index_bits == LAYOUT_INSTANCE.bits));
}

/* Tokens t0..t1 of row b. w and s_n are constants where the caller inlines it for the usual shapes. */
static inline __attribute__((always_inline)) int decode_block(const job_t *J, int64_t b, int64_t t0, int64_t t1,
                                                              const int64_t w, const int64_t s_n) {
    const int64_t d = s_n * w, half = d / 2, groups = J->L.groups, k = J->L.k, rk = J->RL.k;
    const float scale = J->row_scale[b];
    const float *row_extra = J->extra ? J->extra + b * J->slots * w : 0;
    const uint8_t *row_mask = J->mask ? J->mask + b * J->mask_bytes : 0;
    const uint8_t *codes_end = J->codes + J->B * J->n * J->L.nbytes;
    const uint8_t *rcodes_end = J->rcodes ? J->rcodes + J->B * J->R * J->RL.nbytes : 0;
    int64_t refined = row_mask ? popcount_prefix(row_mask, t0 * groups) : 0; /* this row's codes before t0 */
    int64_t idx[MAX_FIELDS], ridx[MAX_FIELDS];
    float coef[MAX_FIELDS], rcoef[MAX_FIELDS], acc[MAX_DIM], more[MAX_DIM], rotated[MAX_DIM];
    int status = 0;
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *code = J->codes + (b * J->n + t) * J->L.nbytes;
        unpack_code(code, codes_end - code, &J->L, J->lut, scale, idx, coef, groups * k, J->L.index_bits);
        for (int64_t h = 0; h < J->H; h++) {
            for (int64_t j = 0; j < d; j++) acc[j] = 0.0f;
            for (int64_t c = 0; c < s_n; c++) {
                const int64_t g = h * s_n + c, v = t * groups + g;
                status |= add_atoms(acc + c * w, idx + g * k, coef + g * k, k, J->offline, J->n_offline, row_extra,
                                    J->slots, w);
                if (row_mask && (row_mask[v >> 3] >> (v & 7)) & 1) { /* its extra atoms, summed apart first */
                    if (refined >= J->R) return status | 2;
                    const uint8_t *rcode = J->rcodes + (b * J->R + refined++) * J->RL.nbytes;
                    unpack_code(rcode, rcodes_end - rcode, &J->RL, J->lut, scale, ridx, rcoef, rk, J->RL.index_bits);
                    for (int64_t j = 0; j < w; j++) more[j] = 0.0f;
                    status |= add_atoms(more, ridx, rcoef, rk, J->offline, J->n_offline, row_extra, J->slots, w);
                    for (int64_t j = 0; j < w; j++) acc[c * w + j] += more[j];
                }
            }
            if (J->center)
                for (int64_t j = 0; j < d; j++) acc[j] += J->center[h * d + j];
            float *o = J->op == OP_DECODE ? J->out + b * J->so_b + h * J->so_h + t * J->so_t : rotated;
            if (J->cos) { /* rope_width d: full cos/sin rows; d/2: their first halves (the halves are equal) */
                const int64_t rw = J->rope_width, second = rw == d ? half : 0;
                const float *cs = J->cos + b * J->cos_row + t * rw, *sn = J->sin + b * J->cos_row + t * rw;
                for (int64_t j = 0; j < half; j++) o[j] = acc[j] * cs[j] - acc[j + half] * sn[j];
                for (int64_t j = 0; j < half; j++) o[half + j] = acc[half + j] * cs[second + j] + acc[j] * sn[second + j];
            } else {
                for (int64_t j = 0; j < d; j++) o[j] = acc[j];
            }
            if (J->op == OP_SCORE) { /* the G query heads of KV head h: (B, H, G, d) queries, (B, H, G, n) scores */
                const float *q = J->query + (b * J->H + h) * J->G * d;
                const int64_t rs = J->so_t ? J->so_t : J->n;
                float *score = J->out + (b * J->H + h) * J->G * rs + t;
                for (int64_t g = 0; g < J->G; g++) score[g * rs] = dot(q + g * d, rotated, d);
            }
        }
    }
    return status;
}

/* OP_SCORE for head vectors of one chunk (s_n = 1) and d = 8 * V: the same arithmetic as decode_block, held in V
   vector registers of 8 floats (GCC/clang vector extensions), the key never leaving them. Unlike decode_block it
   fuses multiply-adds where the CPU has FMA and sums each dot product as a tree of horizontal adds, four query heads
   at a time: the scores differ from the torch path's q·k in the last bits (float32 tolerance in the tests), and
   the kernel runs ~10 % faster than with separate roundings. */
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }

#if defined(__AVX__)
/* {sum a, sum b, sum c, sum d} */
static inline v4 sum8x4(v8 a, v8 b, v8 c, v8 d) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps((__m256)a, (__m256)b), _mm256_hadd_ps((__m256)c, (__m256)d));
    return (v4)_mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}
#else
static inline float sum8(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
static inline v4 sum8x4(v8 a, v8 b, v8 c, v8 d) { return (v4){sum8(a), sum8(b), sum8(c), sum8(d)}; }
#endif
#if defined(__FMA__)
#define MADD(a, b, c) ((v8)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c))) /* a * b + c, one rounding */
#define MADD4(a, b, c) ((v4)_mm_fmadd_ps((__m128)(a), _mm_set1_ps(b), (__m128)(c)))
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#define MADD4(a, b, c) ((a) * (b) + (c))
#endif

static inline __attribute__((always_inline)) int score_block(const job_t *J, int64_t b, int64_t t0, int64_t t1,
                                                             const int V, const layout_consts_t C) {
    const int64_t d = 8 * V, groups = C.groups ? C.groups : J->L.groups, k = C.k ? C.k : J->L.k,
                  rk = C.rk ? C.rk : J->RL.k, G = J->G;
    const int64_t F = groups * k, bits = C.bits ? C.bits : J->L.index_bits,
                  rbits = C.bits ? C.bits : J->RL.index_bits;
    const float scale = J->row_scale[b];
    const float *row_extra = J->extra ? J->extra + b * J->slots * d : 0;
    const uint8_t *row_mask = J->mask ? J->mask + b * J->mask_bytes : 0;
    const uint8_t *codes_end = J->codes + J->B * J->n * J->L.nbytes;
    const uint8_t *rcodes_end = J->rcodes ? J->rcodes + J->B * J->R * J->RL.nbytes : 0;
    int64_t refined = row_mask ? popcount_prefix(row_mask, t0 * groups) : 0;
    int64_t idx[MAX_FIELDS], ridx[MAX_FIELDS];
    float coef[MAX_FIELDS], rcoef[MAX_FIELDS];
    const float *atom[2 * MAX_FIELDS]; /* a head's atoms and coefficients (its refinement's after its own), all
                                          looked up before the sum: so the accumulators stay in registers */
    float c[2 * MAX_FIELDS];
    const int64_t rs = J->so_t ? J->so_t : J->n; /* floats from one query head's scores to the next */
    /* the block's scores gathered here and written a row at a time at the end: one store per token into each of
       groups * G rows far apart slowed the loop by ~10 % */
    float local[TILE * TILE], *tile = groups * G <= TILE && t1 - t0 <= TILE ? local : 0;
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *code = J->codes + (b * J->n + t) * J->L.nbytes;
        unpack_code(code, codes_end - code, &J->L, J->lut, scale, idx, coef, F, bits);
        const int64_t rw = J->rope_width;
        const float *cs = J->cos ? J->cos + b * J->cos_row + t * rw : 0;
        const float *sn = J->sin ? J->sin + b * J->cos_row + t * rw : 0;
        for (int64_t h = 0; h < groups; h++) {
            int64_t m = 0, found = 1;
            for (int64_t a = 0; a < k; a++, m++) {
                atom[m] = row_atom(idx[h * k + a], J->offline, J->n_offline, row_extra, J->slots, d);
                found &= atom[m] != 0;
                c[m] = coef[h * k + a];
            }
            const int64_t v = t * groups + h;
            if (row_mask && (row_mask[v >> 3] >> (v & 7)) & 1) {
                if (refined >= J->R) return 2;
                const uint8_t *rcode = J->rcodes + (b * J->R + refined++) * J->RL.nbytes;
                unpack_code(rcode, rcodes_end - rcode, &J->RL, J->lut, scale, ridx, rcoef, rk, rbits);
                for (int64_t a = 0; a < rk; a++, m++) {
                    atom[m] = row_atom(ridx[a], J->offline, J->n_offline, row_extra, J->slots, d);
                    found &= atom[m] != 0;
                    c[m] = rcoef[a];
                }
            }
            if (!found) return 1;
            v8 acc[V];
            for (int j = 0; j < V; j++) acc[j] = J->center ? load8(J->center + h * d + 8 * j) : (v8){0};
            for (int64_t a = 0; a < m; a++) {
                const v8 ca = (v8){0} + c[a];
                for (int j = 0; j < V; j++) acc[j] = MADD(ca, load8(atom[a] + 8 * j), acc[j]);
            }
            v8 rot[V];
            if (cs) { /* x[j] cos - x[j + d/2] sin | x[j + d/2] cos' + x[j] sin' (cos' = cos where rw = d/2) */
                const int H2 = V / 2;
                const float *cs2 = rw == d ? cs + d / 2 : cs, *sn2 = rw == d ? sn + d / 2 : sn;
                for (int j = 0; j < H2; j++) {
                    rot[j] = acc[j] * load8(cs + 8 * j) - acc[j + H2] * load8(sn + 8 * j);
                    rot[j + H2] = acc[j + H2] * load8(cs2 + 8 * j) + acc[j] * load8(sn2 + 8 * j);
                }
            } else {
                for (int j = 0; j < V; j++) rot[j] = acc[j];
            }
            const float *q = J->query + (b * groups + h) * G * d;
            float *score = J->out + (b * groups + h) * G * rs + t;
            for (int64_t g0 = 0; g0 < G; g0 += 4) {
                v8 sum[4];
                for (int e = 0; e < 4; e++) {
                    if (g0 + e >= G) { sum[e] = (v8){0}; continue; }
                    const float *qe = q + (g0 + e) * d;
                    sum[e] = rot[0] * load8(qe);
                    for (int j = 1; j < V; j++) sum[e] = MADD(rot[j], load8(qe + 8 * j), sum[e]);
                }
                const v4 s4 = sum8x4(sum[0], sum[1], sum[2], sum[3]);
                for (int e = 0; e < 4 && g0 + e < G; e++) {
                    if (tile) tile[(h * G + g0 + e) * TILE + t - t0] = s4[e];
                    else score[(g0 + e) * rs] = s4[e];
                }
            }
        }
    }
    for (int64_t r = 0; tile && r < groups * G; r++) /* row r: query head r % G of KV head r / G */
        memcpy(J->out + ((b * groups + r / G) * G + r % G) * rs + t0, tile + r * TILE, (t1 - t0) * sizeof(float));
    return 0;
}

/* OP_DECODE writes every decoded vector into out; OP_SCORE writes each one's dot products with the G query
   heads of its KV head, query (B, H, G, d) -> out (B, H, G, n).
   Returns 0; 1 when head_dim or a code's pair count is over what the stack buffers hold (the caller takes the
   torch path); 2 for an index past a row's atoms; 3 for more refined vectors than refinement codes. */
int csr_decode(const uint8_t *codes, int64_t B, int64_t n, int64_t groups, int64_t k, int64_t index_bits,
               int64_t index_bytes, int64_t nbytes, int64_t fmt, const float *lut, const float *row_scale,
               const float *offline, int64_t n_offline, const float *extra, int64_t slots, int64_t w,
               const uint8_t *mask, int64_t mask_bytes, const uint8_t *rcodes, int64_t R, int64_t rk,
               int64_t r_index_bytes, int64_t r_nbytes, int64_t H, const float *center, const float *cos,
               const float *sin, int64_t rope_width, int64_t cos_row, float *out, int64_t so_b, int64_t so_h, int64_t so_t,
               int64_t op, int64_t G, const float *query, int64_t threads, int64_t block) {
    const int64_t s_n = groups / H;
    if (s_n * w > MAX_DIM || groups * k > MAX_FIELDS || rk > MAX_FIELDS || nbytes > MAX_CODE_BYTES ||
        r_nbytes > MAX_CODE_BYTES)
        return 1;
    const job_t J = {codes, mask, rcodes, B, n, mask_bytes, R, H, n_offline, slots, so_b, so_h, so_t, block,
                     rope_width, cos_row, op, G, {groups, k, index_bits, index_bytes, nbytes, fmt},
                     {1, rk, index_bits, r_index_bytes, r_nbytes, fmt}, lut, row_scale, offline, extra, center,
                     cos, sin, query, out};
    const int64_t blocks = (n + block - 1) / block;
    const int instance = is_instance_layout(&J.L, &J.RL, R);
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
    for (int64_t job = 0; job < B * blocks; job++) {
        const int64_t b = job / blocks, t0 = (job % blocks) * block, t1 = t0 + block < n ? t0 + block : n;
        if (op == OP_SCORE && w == 64 && s_n == 1) /* a decode step's keys, d_h = 64 (SmolLM2) */
            status |= instance ? score_block(&J, b, t0, t1, 8, LAYOUT_INSTANCE) : score_block(&J, b, t0, t1, 8, LAYOUT_ANY);
        else if (op == OP_SCORE && w == 128 && s_n == 1) /* d_h = 128 (Llama 2/3, Qwen) */
            status |= instance ? score_block(&J, b, t0, t1, 16, LAYOUT_INSTANCE)
                               : score_block(&J, b, t0, t1, 16, LAYOUT_ANY);
        else if (w == 64 && s_n == 1) /* keys and values of d_h = 64 (SmolLM2) */
            status |= decode_block(&J, b, t0, t1, 64, 1);
        else if (w == 128 && s_n == 1) /* d_h = 128 (Llama 2/3, Qwen) */
            status |= decode_block(&J, b, t0, t1, 128, 1);
        else
            status |= decode_block(&J, b, t0, t1, w, s_n);
    }
    return status & 1 ? 2 : status & 2 ? 3 : 0;
}


/* Tokens t0..t1 of row b, values as codes: a[h, c, atom, g] += w[b, h, g, t] * coef for every pair of chunk c of
   head h (the refined vectors' extra pairs too); the G query heads' weights of one atom side by side in `Gs` >= G
   slots, so a pair touches one cache line. With Gs = 4 (G <= 4: SmolLM2's 3, Llama 3's 4) a pair is one 4-float
   vector update (a fused multiply-add where the CPU has one) instead of G scalar ones; unused slots add 0.
   a: this job's (H, s_n, atoms, Gs) accumulator. */

static inline __attribute__((always_inline)) void add_pair(float *slot, const float *w, v4 wv, float cf, int64_t G,
                                                           const int four) {
    if (four) {
        v4 cur;
        memcpy(&cur, slot, sizeof cur);
        cur = MADD4(wv, cf, cur);
        memcpy(slot, &cur, sizeof cur);
    } else {
        for (int64_t g = 0; g < G; g++) slot[g] += w[g] * cf;
    }
}

static inline __attribute__((always_inline)) int scatter_block(const job_t *J, const float *weights, float *a,
                                                               int64_t atoms, int64_t Gs, int64_t b, int64_t t0,
                                                               int64_t t1, const int four, const layout_consts_t C) {
    const int64_t groups = C.groups ? C.groups : J->L.groups, k = C.k ? C.k : J->L.k, rk = C.rk ? C.rk : J->RL.k,
                  H = J->H, G = J->G, s_n = groups / H;
    const int64_t F = groups * k, bits = C.bits ? C.bits : J->L.index_bits,
                  rbits = C.bits ? C.bits : J->RL.index_bits;
    const float scale = J->row_scale[b];
    const uint8_t *row_mask = J->mask ? J->mask + b * J->mask_bytes : 0;
    const uint8_t *codes_end = J->codes + J->B * J->n * J->L.nbytes;
    const uint8_t *rcodes_end = J->rcodes ? J->rcodes + J->B * J->R * J->RL.nbytes : 0;
    int64_t refined = row_mask ? popcount_prefix(row_mask, t0 * groups) : 0;
    int64_t idx[MAX_FIELDS], ridx[MAX_FIELDS];
    float coef[MAX_FIELDS], rcoef[MAX_FIELDS], w[MAX_FIELDS];
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *code = J->codes + (b * J->n + t) * J->L.nbytes;
        unpack_code(code, codes_end - code, &J->L, J->lut, scale, idx, coef, F, bits);
        for (int64_t h = 0; h < H; h++) {
            const float *wt = weights + (b * H + h) * G * J->so_t + t; /* query head g's weight: wt[g * so_t] */
            if (four) {
                w[0] = wt[0], w[1] = G > 1 ? wt[J->so_t] : 0.0f, w[2] = G > 2 ? wt[2 * J->so_t] : 0.0f;
                w[3] = G > 3 ? wt[3 * J->so_t] : 0.0f;
            } else {
                for (int64_t g = 0; g < Gs; g++) w[g] = g < G ? wt[g * J->so_t] : 0.0f;
            }
            const v4 wv = {w[0], w[1], w[2], w[3]};
            for (int64_t c = 0; c < s_n; c++) {
                const int64_t v = t * groups + h * s_n + c;
                float *ac = a + (h * s_n + c) * atoms * Gs;
                for (int64_t p = 0; p < k; p++) {
                    const int64_t i = idx[(h * s_n + c) * k + p];
                    if (i >= atoms) return 1;
                    add_pair(ac + i * Gs, w, wv, coef[(h * s_n + c) * k + p], G, four);
                }
                if (row_mask && (row_mask[v >> 3] >> (v & 7)) & 1) {
                    if (refined >= J->R) return 2;
                    const uint8_t *rcode = J->rcodes + (b * J->R + refined++) * J->RL.nbytes;
                    unpack_code(rcode, rcodes_end - rcode, &J->RL, J->lut, scale, ridx, rcoef, rk, rbits);
                    for (int64_t p = 0; p < rk; p++) {
                        if (ridx[p] >= atoms) return 1;
                        add_pair(ac + ridx[p] * Gs, w, wv, rcoef[p], G, four);
                    }
                }
            }
        }
    }
    return 0;
}

/* weights (B, H, G, n), weight_stride floats from one (b, h, g) row to the next -> a (P, B, H, s_n, atoms, Gs),
   zeroed by the caller (Gs >= max(G, 4) slots an atom): part p holds the sums over the p-th
   of P equal token ranges (threads never write the same floats; the caller adds the parts).
   Returns 0; 1 when a pair count is over the stack buffers; 2 for an index past a row's atoms; 3 for more
   refined vectors than refinement codes. */
int csr_value_weights(const uint8_t *codes, int64_t B, int64_t n, int64_t groups, int64_t k, int64_t index_bits,
                      int64_t index_bytes, int64_t nbytes, int64_t fmt, const float *lut, const float *row_scale,
                      int64_t atoms, const uint8_t *mask, int64_t mask_bytes, const uint8_t *rcodes, int64_t R,
                      int64_t rk, int64_t r_index_bytes, int64_t r_nbytes, int64_t H, int64_t G,
                      const float *weights, int64_t weight_stride, float *a, int64_t Gs, int64_t P, int64_t threads) {
    if (groups * k > MAX_FIELDS || rk > MAX_FIELDS || nbytes > MAX_CODE_BYTES || r_nbytes > MAX_CODE_BYTES ||
        Gs > MAX_FIELDS || Gs < G || Gs < 4)
        return 1;
    const job_t J = {codes, mask, rcodes, B, n, mask_bytes, R, H, 0, 0, 0, 0, weight_stride, 0, 0, 0, 0, G,
                     {groups, k, index_bits, index_bytes, nbytes, fmt},
                     {1, rk, index_bits, r_index_bytes, r_nbytes, fmt}, lut, row_scale, 0, 0, 0, 0, 0, 0, 0};
    const int64_t per_row = H * Gs * (groups / H) * atoms;
    const int instance = is_instance_layout(&J.L, &J.RL, R);
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
    for (int64_t job = 0; job < P * B; job++) {
        const int64_t p = job / B, b = job % B;
        float *part = a + (p * B + b) * per_row;
        const int64_t t0 = n * p / P, t1 = n * (p + 1) / P;
        status |= 1 << (Gs != 4 ? scatter_block(&J, weights, part, atoms, Gs, b, t0, t1, 0, LAYOUT_ANY)
                        : instance ? scatter_block(&J, weights, part, atoms, Gs, b, t0, t1, 1, LAYOUT_INSTANCE)
                                   : scatter_block(&J, weights, part, atoms, Gs, b, t0, t1, 1, LAYOUT_ANY));
    }
    return status & 4 ? 3 : status & 2 ? 2 : 0;
}

/* Matching pursuit through the Gram matrix gram (N, N) = D D^T, all s atoms of a row in one go, so the row's N
   scores stay in the core's cache: scores (n, N) = X D^T on entry (overwritten). Per atom, one pass over the
   row: remove the previous atom's share (<R - c d_i, d_j> = <R, d_j> - c <d_i, d_j>) and find the first j of
   largest |score|; its score is the coefficient, rounded to the nearest of `levels` (times scale, ties to the
   lower level; the midpoints between levels given) as e3m1 is when levels are given; idx, coef: (n, s). */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }

/* Scores j..j+15 of a row: each lane keeps its largest |score| and the first index it was met at (strict >: the
   first of equals stays). */
static inline __attribute__((always_inline)) void keep_largest(v16 score, int64_t j, v16 *best_abs, vi16 *best_index) {
    const vi16 abs_mask = (vi16){0} + 0x7fffffff, lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const v16 a = (v16)((vi16)score & abs_mask);
    const vi16 greater = a > *best_abs;
    *best_abs = (v16)((greater & (vi16)a) | (~greater & (vi16)*best_abs));
    *best_index = (greater & (lanes + (int32_t)j)) | (~greater & *best_index);
}

/* The first index of the largest |score| over `sets` sets of lanes kept by keep_largest; that |score| in *top. */
static inline int64_t first_of_largest(const v16 *best_abs, const vi16 *best_index, int sets, float *top) {
    int64_t at = 0;
    *top = -1.0f;
    for (int set = 0; set < sets; set++)
        for (int i = 0; i < 16; i++)
            if (best_abs[set][i] > *top || (best_abs[set][i] == *top && best_index[set][i] < at))
                *top = best_abs[set][i], at = best_index[set][i];
    return at;
}

/* One block of 16 scores at row + j: row -= c * g there (when g is given), then keep_largest. */
static inline __attribute__((always_inline)) void update_block(float *row, const float *g, v16 cv, int64_t j,
                                                               v16 *best_abs, vi16 *best_index) {
    v16 v = load16(row + j);
    if (g) {
        v -= cv * load16(g + j);
        memcpy(row + j, &v, sizeof v);
    }
    keep_largest(v, j, best_abs, best_index);
}

#if defined(__AVX512F__)
/* The first j where |row[j]| equals top (the row's largest: found by a pass before). */
static inline int64_t first_match(const float *row, int64_t N, float top) {
    const __m512 topv = _mm512_set1_ps(top), magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    int64_t j = 0;
    for (; j + 16 <= N; j += 16) {
        const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_and_ps(_mm512_loadu_ps(row + j), magnitude), topv, _CMP_EQ_OQ);
        if (hit) return j + __builtin_ctz(hit);
    }
    for (; j < N; j++)
        if ((row[j] < 0 ? -row[j] : row[j]) == top) return j;
    return 0; /* only where a score is NaN */
}

/* row -= c * g (when g is given), then the first j of largest |row[j]|. AVX-512: a pass that updates the row and
   keeps only the running maximum of |row| (two registers, so each max does not wait on the one before), then a
   scan of the row (in L1) for the first j where |row[j]| equals it: 4 vector operations an element instead of the
   7 of keeping each lane's index (the pass was bound by them, not by memory). */
static inline int64_t update_and_argmax(float *row, int64_t N, const float *g, float c) {
    const __m512 cv = _mm512_set1_ps(c), magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    __m512 top0 = _mm512_setzero_ps(), top1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= N; j += 32) {
        __m512 v0 = _mm512_loadu_ps(row + j), v1 = _mm512_loadu_ps(row + j + 16);
        if (g) {
            v0 = _mm512_sub_ps(v0, _mm512_mul_ps(cv, _mm512_loadu_ps(g + j)));
            v1 = _mm512_sub_ps(v1, _mm512_mul_ps(cv, _mm512_loadu_ps(g + j + 16)));
            _mm512_storeu_ps(row + j, v0);
            _mm512_storeu_ps(row + j + 16, v1);
        }
        top0 = _mm512_max_ps(top0, _mm512_and_ps(v0, magnitude));
        top1 = _mm512_max_ps(top1, _mm512_and_ps(v1, magnitude));
    }
    float top = _mm512_reduce_max_ps(_mm512_max_ps(top0, top1));
    for (int64_t t = j; t < N; t++) {
        if (g) row[t] -= c * g[t];
        const float a = row[t] < 0 ? -row[t] : row[t];
        if (a > top) top = a;
    }
    return first_match(row, N, top);
}
#else
/* row -= c * g (when g is given), then the first j of largest |row[j]|: one pass in 16-float lanes (two or four
   registers) with masked blends, two blocks at a time into two sets of lanes so that each compare does not wait on
   the one before (the chain of compares and selects bound the pass). */
static inline int64_t update_and_argmax(float *row, int64_t N, const float *g, float c) {
    const v16 cv = (v16){0} + c;
    v16 best_abs[2] = {(v16){0} - 1.0f, (v16){0} - 1.0f};
    vi16 best_index[2] = {(vi16){0}, (vi16){0}};
    int64_t j = 0;
    for (; j + 32 <= N; j += 32) {
        update_block(row, g, cv, j, &best_abs[0], &best_index[0]);
        update_block(row, g, cv, j + 16, &best_abs[1], &best_index[1]);
    }
    float top;
    int64_t at = first_of_largest(best_abs, best_index, 2, &top);
    for (; j < N; j++) {
        if (g) row[j] -= c * g[j];
        const float a = row[j] < 0 ? -row[j] : row[j];
        if (a > top) top = a, at = j;
    }
    return at;
}
#endif

/* The index of the level nearest to a magnitude: the count of midpoints between levels below it (as
   torch.bucketize counts them: ties to the lower level). */
static inline int64_t levels_below(float magnitude, const float *midpoints, int64_t n_levels) {
    int64_t m = 0;
    for (int64_t i = 0; i < n_levels - 1; i++) m += midpoints[i] < magnitude;
    return m;
}

/* c rounded to the nearest of `levels` times scale (ties to the lower level; the midpoints between levels given),
   as e3m1 is; c itself without levels. */
static inline float round_to_levels(float c, const float *levels, const float *midpoints, int64_t n_levels,
                                    float scale) {
    if (!levels) return c;
    const float v = c / scale;
    const int64_t m = levels_below(v < 0 ? -v : v, midpoints, n_levels);
    return v < 0 ? -(levels[m] * scale) : levels[m] * scale;
}

/* Matching pursuit of one row of scores through the Gram matrix: s atoms into idx, coef. */
static inline void mp_row(float *row, int64_t N, const float *gram, int64_t s, int64_t *idx, float *coef,
                          const float *levels, const float *midpoints, int64_t n_levels, float scale) {
    const float *g = 0;
    float c = 0.0f;
    for (int64_t a = 0; a < s; a++) {
        const int64_t at = update_and_argmax(row, N, g, c);
        c = round_to_levels(row[at], levels, midpoints, n_levels, scale);
        idx[a] = at;
        coef[a] = c;
        g = gram + at * N;
    }
}

void csr_mp_gram(float *scores, int64_t n, int64_t N, const float *gram, int64_t s, int64_t *idx, float *coef,
                 const float *levels, const float *midpoints, int64_t n_levels, float scale, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++)
        mp_row(scores + r * N, N, gram, s, idx + r * s, coef + r * s, levels, midpoints, n_levels, scale);
}

/* csr_mp_amx: csr_mp_gram with its product X D^T made here, 16 vectors at a time on the CPU's matrix unit (Intel
   AMX, bf16 tiles with float32 sums), each block's scores (16 x N, in L2) coded at once. float32 products from bf16
   ones ("bf16x3"): x = x_hi + x_lo and d = d_hi + d_lo, each part rounded to bf16, and x.d ~ x_hi.d_hi + x_hi.d_lo +
   x_lo.d_hi, exact to ~2^-17 of |x| |d| (float32: ~2^-21), so the atoms chosen are float32's but at near-ties;
   after each atom the scores are updated through the Gram matrix held as int16 (csr_amx_gram, made on the tiles).
   Built where the compiler targets AMX (-march=native on such a CPU); csr_amx_ready asks Linux for the tile state
   (once a process). Atoms packed once per dictionary by csr_amx_pack_atoms: (hi, lo) x (N / 16 blocks of 16 atoms)
   x (k / 32 chunks) x a 16 x 16 x 2 tile, pairs of channels adjacent as the dot-product instruction reads them. */
enum { AMX_ROWS = 16, AMX_K = 32 };

static inline uint16_t bf16_nearest(float f) { /* round to nearest, ties to even (finite inputs) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_value(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The padded sizes: channels to a multiple of 32, atoms to a multiple of 32 (two tiles of 16 a step). */
static inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

void csr_amx_pack_atoms(const float *atoms, int64_t N, int64_t d, uint16_t *packed) {
    const int64_t kc = round_up(d, AMX_K) / AMX_K, Np = round_up(N, 2 * 16), half = Np * kc * AMX_K;
    for (int64_t jb = 0; jb < Np / 16; jb++)
        for (int64_t c = 0; c < kc; c++)
            for (int64_t r = 0; r < 16; r++)
                for (int64_t j = 0; j < 16; j++)
                    for (int64_t p = 0; p < 2; p++) {
                        const int64_t k = c * AMX_K + 2 * r + p, atom = jb * 16 + j;
                        const int64_t at = (((jb * kc + c) * 16 + r) * 16 + j) * 2 + p;
                        const float v = k < d && atom < N ? atoms[atom * d + k] : 0.0f;
                        const uint16_t hi = bf16_nearest(v);
                        packed[at] = hi;
                        packed[half + at] = bf16_nearest(v - bf16_value(hi));
                    }
}

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__linux__)
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

int csr_amx_ready(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0; }

/* The 16 x Np scores of one block of rows, hi/lo parts of its vectors in xh, xl (16 x dp bf16 each). Tiles: 0, 1
   the vectors' hi parts of two 32-channel chunks, 2, 3 their lo parts (held for the whole block where d <= 64,
   else one chunk at a time in 0, 2); 6, 7 two blocks of atoms' hi, then lo parts; 4, 5 the two blocks' sums (two
   chains, so each product need not wait on the one before). `terms`: 3 (bf16x3), 2 (d_lo = 0: no x_hi.d_lo), 1
   (x_lo = d_lo = 0: x_hi.d_hi alone). */
#define CHUNK_PRODUCTS(AH, AL, b0, b1)                                                                              \
    do {                                                                                                           \
        _tile_loadd(6, b0, 64);                                                                                    \
        _tile_loadd(7, b1, 64);                                                                                    \
        if (terms > 1) {                                                                                           \
            _tile_dpbf16ps(4, AL, 6); /* x_lo . d_hi */                                                            \
            _tile_dpbf16ps(5, AL, 7);                                                                              \
        }                                                                                                          \
        _tile_dpbf16ps(4, AH, 6); /* x_hi . d_hi */                                                                \
        _tile_dpbf16ps(5, AH, 7);                                                                                  \
        if (terms > 2) {                                                                                           \
            _tile_loadd(6, (b0) + half, 64);                                                                       \
            _tile_loadd(7, (b1) + half, 64);                                                                       \
            _tile_dpbf16ps(4, AH, 6); /* x_hi . d_lo */                                                            \
            _tile_dpbf16ps(5, AH, 7);                                                                              \
        }                                                                                                          \
    } while (0)

/* The largest |score| of each of the block's rows over 32 columns at j (stored by the tiles): top[i] = max(top[i], ...). */
static inline void keep_top(const float *scores, int64_t stride, int64_t j, __m512 *top) {
    for (int i = 0; i < AMX_ROWS; i++) {
        top[i] = _mm512_range_ps(top[i], _mm512_loadu_ps(scores + i * stride + j), 0xB);
        top[i] = _mm512_range_ps(top[i], _mm512_loadu_ps(scores + i * stride + j + 16), 0xB);
    }
}

static void block_scores(const uint16_t *xh, const uint16_t *xl, int64_t dp, const uint16_t *packed, int64_t Np,
                         int terms, float *scores, int64_t stride, float *row_top) {
    const int64_t kc = dp / AMX_K, half = Np * dp;
    __m512 top[AMX_ROWS];
    for (int i = 0; i < AMX_ROWS; i++) top[i] = _mm512_setzero_ps();
    if (kc <= 2) {
        _tile_loadd(0, xh, dp * 2);
        _tile_loadd(2, xl, dp * 2);
        if (kc == 2) {
            _tile_loadd(1, xh + AMX_K, dp * 2);
            _tile_loadd(3, xl + AMX_K, dp * 2);
        }
    }
    for (int64_t jb = 0; jb < Np / 16; jb += 2) {
        _tile_zero(4);
        _tile_zero(5);
        const uint16_t *b0 = packed + jb * kc * 512, *b1 = b0 + kc * 512;
        if (kc <= 2) {
            CHUNK_PRODUCTS(0, 2, b0, b1);
            if (kc == 2) CHUNK_PRODUCTS(1, 3, b0 + 512, b1 + 512);
        } else {
            for (int64_t c = 0; c < kc; c++) {
                _tile_loadd(0, xh + c * AMX_K, dp * 2);
                _tile_loadd(2, xl + c * AMX_K, dp * 2);
                CHUNK_PRODUCTS(0, 2, b0 + c * 512, b1 + c * 512);
            }
        }
        if (jb) keep_top(scores, stride, (jb - 2) * 16, top); /* the last pair's, while the tiles work */
        _tile_stored(4, scores + jb * 16, stride * 4);
        _tile_stored(5, scores + jb * 16 + 16, stride * 4);
    }
    keep_top(scores, stride, Np - 32, top);
    for (int i = 0; i < AMX_ROWS; i++) row_top[i] = _mm512_reduce_max_ps(top[i]);
}

/* A block's vectors as bf16 hi and lo parts (rows past n and channels past d zero). */
static inline void split_block(const float *x, int64_t rows, int64_t d, int64_t dp, uint16_t *xh, uint16_t *xl) {
#if defined(__AVX512BF16__)
    if (d == dp) {
        for (int64_t i = 0; i < AMX_ROWS; i++)
            for (int64_t k = 0; k < d; k += 16) {
                const __m512 v = i < rows ? _mm512_loadu_ps(x + i * d + k) : _mm512_setzero_ps();
                const __m256bh hi = _mm512_cvtneps_pbh(v);
                const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)hi), 16));
                _mm256_storeu_si256((__m256i *)(xh + i * dp + k), (__m256i)hi);
                _mm256_storeu_si256((__m256i *)(xl + i * dp + k), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, back)));
            }
        return;
    }
#endif
    for (int64_t i = 0; i < AMX_ROWS; i++)
        for (int64_t k = 0; k < dp; k++) {
            const float v = i < rows && k < d ? x[i * d + k] : 0.0f;
            xh[i * dp + k] = bf16_nearest(v);
            xl[i * dp + k] = bf16_nearest(v - bf16_value(xh[i * dp + k]));
        }
}

/* Scores through a Gram matrix held as int16 (G ~ gram_scale * q, |q| <= 32767: half the bytes of float32 — each
   pass reads a row of G from L3 —, its error under 2^-16 of its largest entry, ~the scores' own): as
   update_and_argmax with c * gram_scale times the int16 row, the update fused and |v| maxed in one operation
   (VRANGEPS): 4 vector operations an element besides the conversion. 1.15x faster than float32 rows. */
static inline int64_t update_and_argmax16(float *row, int64_t N, const int16_t *g, float c) {
    const __m512 cv = _mm512_set1_ps(c);
    __m512 top0 = _mm512_setzero_ps(), top1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= N; j += 32) {
        __m512 v0 = _mm512_loadu_ps(row + j), v1 = _mm512_loadu_ps(row + j + 16);
        if (g) {
            const __m512 g0 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)(g + j))));
            const __m512 g1 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)(g + j + 16))));
            v0 = _mm512_fnmadd_ps(cv, g0, v0); /* fused: one rounding (this path is not the torch path's twin) */
            v1 = _mm512_fnmadd_ps(cv, g1, v1);
            _mm512_storeu_ps(row + j, v0);
            _mm512_storeu_ps(row + j + 16, v1);
        }
        top0 = _mm512_range_ps(top0, v0, 0xB); /* max(|top|, |v|) in one operation */
        top1 = _mm512_range_ps(top1, v1, 0xB);
    }
    float top = _mm512_reduce_max_ps(_mm512_max_ps(top0, top1));
    for (int64_t t = j; t < N; t++) {
        if (g) row[t] -= c * (float)g[t];
        const float a = row[t] < 0 ? -row[t] : row[t];
        if (a > top) top = a;
    }
    return first_match(row, N, top);
}

/* Over the blocks of 16 rows of x (n, d): the block's scores X D^T on the tiles, then either matching pursuit of
   each row through the int16 Gram matrix (idx, coef given) or, for the Gram matrix itself (x = the atoms), the rows
   as int16 into gram_out. 0: done; 1: no memory for a thread's buffers. */
static int amx_blocks(const float *x, int64_t n, int64_t d, const uint16_t *packed, int64_t N, int terms,
                      const int16_t *gram, float gram_scale, int16_t *gram_out, int64_t s, int64_t *idx, float *coef,
                      const float *levels, const float *midpoints, int64_t n_levels, float scale, int64_t threads) {
    const int64_t dp = round_up(d, AMX_K), Np = round_up(N, 2 * 16), blocks = (n + AMX_ROWS - 1) / AMX_ROWS;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } config;
        memset(&config, 0, sizeof config);
        config.palette = 1;
        for (int t = 0; t < 8; t++) config.colsb[t] = 64, config.rows[t] = AMX_ROWS; /* every tile 16 x 64 bytes */
        _tile_loadconfig(&config);
        uint16_t *xh = aligned_alloc(64, 2 * AMX_ROWS * dp * sizeof(uint16_t)), *xl = xh + AMX_ROWS * dp;
        /* rows a cache line more than the atoms apart: 2^k floats apart, a tile's 16 rows fall in one set of L1 */
        const int64_t stride = Np + 16;
        float *scores = aligned_alloc(64, AMX_ROWS * stride * sizeof(float));
        if (!xh || !scores) failed = 1;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            if (!xh || !scores) continue;
            const int64_t r0 = b * AMX_ROWS, rows = n - r0 < AMX_ROWS ? n - r0 : AMX_ROWS;
            split_block(x + r0 * d, rows, d, dp, xh, xl);
            float row_top[AMX_ROWS]; /* each row's largest |score| (padding columns are 0: never above it) */
            block_scores(xh, xl, dp, packed, Np, terms, scores, stride, row_top);
            for (int64_t i = 0; i < rows; i++) {
                float *row = scores + i * stride;
                if (gram_out) { /* to the nearest int16 (ties to even), saturated */
                    const __m512 inverse = _mm512_set1_ps(1.0f / gram_scale);
                    int16_t *out = gram_out + (r0 + i) * N;
                    int64_t j = 0;
                    for (; j + 16 <= N; j += 16)
                        _mm256_storeu_si256((__m256i *)(out + j), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(
                                                                       _mm512_mul_ps(_mm512_loadu_ps(row + j), inverse))));
                    for (; j < N; j++) {
                        const float q = row[j] * (1.0f / gram_scale);
                        out[j] = (int16_t)(q >= 32767.0f ? 32767 : q <= -32768.0f ? -32768 : (int)__builtin_rintf(q));
                    }
                    continue;
                }
                const int16_t *g = 0;
                float c = 0.0f;
                for (int64_t a = 0; a < s; a++) {
                    const int64_t at = a ? update_and_argmax16(row, N, g, c * gram_scale) : first_match(row, N, row_top[i]);
                    c = round_to_levels(row[at], levels, midpoints, n_levels, scale);
                    idx[(r0 + i) * s + a] = at;
                    coef[(r0 + i) * s + a] = c;
                    g = gram + at * N;
                }
            }
        }
        free(xh);
        free(scores);
        _tile_release();
    }
    return failed;
}

/* x (n, d) float32 -> idx, coef (n, s) as csr_mp_gram over X D^T, through `gram` from csr_amx_gram. */
int csr_mp_amx(const float *x, int64_t n, int64_t d, const uint16_t *packed, int64_t N, int64_t atoms_bf16,
               const int16_t *gram, float gram_scale, int64_t s, int64_t *idx, float *coef, const float *levels,
               const float *midpoints, int64_t n_levels, float scale, int64_t threads) {
    return amx_blocks(x, n, d, packed, N, atoms_bf16 ? 2 : 3, gram, gram_scale, 0, s, idx, coef, levels, midpoints,
                      n_levels, scale, threads);
}

/* The Gram matrix D D^T (N, N) of the atoms (N, d) as int16, G ~ gram_scale * gram, on the tiles (bf16x3, one
   product where the atoms are bf16 values). */
int csr_amx_gram(const float *atoms, int64_t N, int64_t d, const uint16_t *packed, int64_t atoms_bf16, int16_t *gram,
                 float gram_scale, int64_t threads) {
    return amx_blocks(atoms, N, d, packed, N, atoms_bf16 ? 1 : 3, 0, gram_scale, gram, 0, 0, 0, 0, 0, 0, 1.0f, threads);
}
#else
int csr_amx_ready(void) { return 0; }
int csr_mp_amx(const float *x, int64_t n, int64_t d, const uint16_t *packed, int64_t N, int64_t atoms_bf16,
               const int16_t *gram, float gram_scale, int64_t s, int64_t *idx, float *coef, const float *levels,
               const float *midpoints, int64_t n_levels, float scale, int64_t threads) {
    return 1;
}
int csr_amx_gram(const float *atoms, int64_t N, int64_t d, const uint16_t *packed, int64_t atoms_bf16, int16_t *gram,
                 float gram_scale, int64_t threads) {
    return 1;
}
#endif

/* Codes with e3m1 coefficients packed as csr_core/code_layout.py lays them out (code_packing.pack_codes, the torch
   path: ~10 tensor operations over every code of a prefill): per code, F index fields then F coefficient fields
   (sign in bit 4, the count of midpoints below |coef / scale| in bits 0-3), field f at bit shift[f] of byte
   byte[f]. idx, coef (n, F), scale (n) -> out (n, nbytes). 0: done; 1: an index >= 2^index_bits. */
int csr_pack_e3m1(const int64_t *idx, const float *coef, const float *scale, int64_t n, int64_t F, int64_t index_bits,
                  const int64_t *byte, const int32_t *shift, int64_t nbytes, const float *midpoints, int64_t n_levels,
                  uint8_t *out, int64_t threads) {
    if (nbytes > MAX_CODE_BYTES || 2 * F > 2 * MAX_FIELDS) return 2;
    int bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad)
    for (int64_t r = 0; r < n; r++) {
        uint8_t code[MAX_CODE_BYTES + 3];
        memset(code, 0, (size_t)nbytes + 3);
        for (int64_t f = 0; f < 2 * F; f++) {
            uint32_t v;
            if (f < F) {
                const int64_t i = idx[r * F + f];
                bad |= i < 0 || i >> index_bits;
                v = (uint32_t)i;
            } else {
                const float c = coef[r * F + f - F];
                const uint32_t m = (uint32_t)levels_below((c < 0 ? -c : c) / scale[r], midpoints, n_levels);
                v = c < 0 && m > 0 ? m + 16 : m;
            }
            const uint32_t w = v << shift[f];
            code[byte[f]] |= (uint8_t)w;
            code[byte[f] + 1] |= (uint8_t)(w >> 8);
            code[byte[f] + 2] |= (uint8_t)(w >> 16);
        }
        memcpy(out + r * nbytes, code, (size_t)nbytes);
    }
    return bad;
}

/* Residual energies of coded vectors (the refinement's ranking: sparse_coding.residual_energy): out[i] =
   ||x_i - sum_g coef[i, g] atoms[idx[i, g]]||^2, the sum decoded first as the torch path does, RESIDUAL_SPAN channels
   at a time. x (n, d), idx, coef (n, s), atoms (N, d) -> out (n). */
enum { RESIDUAL_SPAN = 256 };

void csr_residual_energy(const float *x, int64_t n, int64_t d, const int64_t *idx, const float *coef, int64_t s,
                         const float *atoms, float *out, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float decoded[RESIDUAL_SPAN], energy = 0.0f;
        for (int64_t k0 = 0; k0 < d; k0 += RESIDUAL_SPAN) {
            const int64_t span = d - k0 < RESIDUAL_SPAN ? d - k0 : RESIDUAL_SPAN;
            for (int64_t k = 0; k < span; k++) decoded[k] = 0.0f;
            for (int64_t g = 0; g < s; g++) {
                const float c = coef[i * s + g], *atom = atoms + idx[i * s + g] * d + k0;
                for (int64_t k = 0; k < span; k++) decoded[k] += c * atom[k];
            }
            for (int64_t k = 0; k < span; k++) {
                const float r = x[i * d + k0 + k] - decoded[k];
                energy += r * r;
            }
        }
        out[i] = energy;
    }
}

/* Matching pursuit of a few rows without the Gram matrix (a decode step's new tokens: too few to pay for it): per
   atom, every score of the residual, <R, d_j> = sum_k R[k] atoms_t[k, j] summed in k order, 16 atoms a register
   and MP_ROWS rows a sweep, so each load of the atoms (N d floats, column-major, in L2) serves MP_ROWS rows; the
   first j of largest |score| as in update_and_argmax. x (n, d) -> idx, coef (n, s); rounding as csr_mp_gram. */
enum { MP_ROWS = 4 };

void csr_mp_direct(const float *x, int64_t n, int64_t d, const float *atoms_t, int64_t N, int64_t s, int64_t *idx,
                   float *coef, const float *levels, const float *midpoints, int64_t n_levels, float scale,
                   int64_t threads) {
    if (d > MAX_DIM) return;
    const int64_t sweeps = (n + MP_ROWS - 1) / MP_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t sweep = 0; sweep < sweeps; sweep++) {
        const int64_t r0 = sweep * MP_ROWS, rows = n - r0 < MP_ROWS ? n - r0 : MP_ROWS;
        float residual[MP_ROWS][MAX_DIM];
        for (int64_t r = 0; r < MP_ROWS; r++)
            for (int64_t k = 0; k < d; k++) residual[r][k] = r < rows ? x[(r0 + r) * d + k] : 0.0f;
        for (int64_t a = 0; a < s; a++) {
            v16 best_abs[MP_ROWS];
            vi16 best_index[MP_ROWS];
            for (int r = 0; r < MP_ROWS; r++) best_abs[r] = (v16){0} - 1.0f, best_index[r] = (vi16){0};
            int64_t j = 0;
            for (; j + 16 <= N; j += 16) {
                v16 score[MP_ROWS];
                for (int r = 0; r < MP_ROWS; r++) score[r] = (v16){0};
                for (int64_t k = 0; k < d; k++) {
                    const v16 atom_k = load16(atoms_t + k * N + j);
                    for (int r = 0; r < MP_ROWS; r++) score[r] += residual[r][k] * atom_k;
                }
                for (int r = 0; r < MP_ROWS; r++) keep_largest(score[r], j, &best_abs[r], &best_index[r]);
            }
            for (int64_t r = 0; r < rows; r++) {
                float top;
                int64_t at = first_of_largest(&best_abs[r], &best_index[r], 1, &top);
                for (int64_t t = j; t < N; t++) { /* atoms past the last full register */
                    float score = 0.0f;
                    for (int64_t k = 0; k < d; k++) score += residual[r][k] * atoms_t[k * N + t];
                    const float m = score < 0 ? -score : score;
                    if (m > top) top = m, at = t;
                }
                float c = 0.0f; /* the chosen atom's score, summed in the same order */
                for (int64_t k = 0; k < d; k++) c += residual[r][k] * atoms_t[k * N + at];
                c = round_to_levels(c, levels, midpoints, n_levels, scale);
                for (int64_t k = 0; k < d; k++) residual[r][k] -= c * atoms_t[k * N + at];
                idx[(r0 + r) * s + a] = at;
                coef[(r0 + r) * s + a] = c;
            }
        }
    }
}
