/* CSR's decode step on the CPU, fused: packed codes -> keys or values as attention reads them.
 *
 * For every coded token of every row and every KV head, in one pass over the codes and without
 * temporaries: unpack the head's indices and coefficients (the bit layout of csr_core/code_layout.py),
 * sum coef * atom over the batch table (what embedding_bag does in the torch path), add the refined
 * vectors' extra atoms (one flag bit per vector, their codes in order in a second stream), add the
 * centre, rotate by RoPE when cos/sin are given, and write the head vector into its slot of `out`.
 * The torch path it replaces (csr_runtime/cache.py, `_assemble`) makes ~25 passes over the same data.
 *
 * Built and loaded by csr_runtime/native_decode.py with the system C compiler; parity with the torch
 * path is tested in tests/test_native_decode.py.
 */
#include <stdint.h>
#include <string.h>

enum { FMT_FP16 = 0, FMT_FP8 = 1, FMT_INT8 = 2, FMT_E3M1 = 3 };
enum { MAX_DIM = 1024 }; /* head_dim the stack accumulators hold */

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

/* `width` bits (<= 16) starting at bit `pos` of a little-endian stream of `len` bytes */
static inline uint32_t read_field(const uint8_t *p, int64_t len, int64_t pos, int64_t width) {
    int64_t byte = pos >> 3;
    uint32_t word = p[byte];
    if (byte + 1 < len) word |= (uint32_t)p[byte + 1] << 8;
    if (byte + 2 < len) word |= (uint32_t)p[byte + 2] << 16;
    return (word >> (pos & 7)) & ((1u << width) - 1);
}

/* coefficient `f` (of groups * k) of one code */
static inline float read_coef(const uint8_t *code, const layout_t *L, int64_t f, const float *lut, float scale) {
    const uint8_t *c = code + L->index_bytes;
    switch (L->fmt) {
    case FMT_E3M1:
        return lut[read_field(code, L->index_bytes, L->groups * L->k * L->index_bits + 5 * f, 5)] * scale;
    case FMT_FP8:
        return lut[c[f]] * scale;
    case FMT_FP16: {
        uint16_t h = (uint16_t)(c[2 * f] | (c[2 * f + 1] << 8));
        return half_to_float(h);
    }
    default: { /* int8: per group an fp16 scale, then its k int8 */
        int64_t g = f / L->k, a = f % L->k;
        const uint8_t *grp = c + g * (2 + L->k);
        return (float)(int8_t)grp[2 + a] * half_to_float((uint16_t)(grp[0] | (grp[1] << 8)));
    }
    }
}

/* acc[0:w] += sum over atoms a of group g: coef * table[index] (row-local index -> batch table row);
   1 for an index past the table's `rows` */
static inline int add_group(float *acc, const uint8_t *code, const layout_t *L, int64_t g, const float *lut,
                            float scale, const float *table, int64_t rows, int64_t w, int64_t n_offline,
                            int64_t extra_base) {
    for (int64_t a = 0; a < L->k; a++) {
        int64_t f = g * L->k + a;
        int64_t i = read_field(code, L->index_bytes, f * L->index_bits, L->index_bits);
        if (i >= n_offline) i += extra_base;
        if (i >= rows) return 1;
        float c = read_coef(code, L, f, lut, scale);
        const float *atom = table + i * w;
        if (w == 64) { /* the usual head width: a constant trip count the compiler unrolls and vectorises */
            for (int64_t j = 0; j < 64; j++) acc[j] += c * atom[j];
        } else {
            for (int64_t j = 0; j < w; j++) acc[j] += c * atom[j];
        }
    }
    return 0;
}

static int64_t popcount_prefix(const uint8_t *mask, int64_t bits) {
    int64_t count = 0, full = bits >> 3;
    for (int64_t i = 0; i < full; i++) count += __builtin_popcount(mask[i]);
    if (bits & 7) count += __builtin_popcount(mask[full] & ((1u << (bits & 7)) - 1));
    return count;
}

/* Returns 0; 1 when head_dim is over MAX_DIM (the caller takes the torch path); 2 for an index past the table;
   3 for more refined vectors than refinement codes. */
int csr_decode(const uint8_t *codes, int64_t B, int64_t n, int64_t groups, int64_t k, int64_t index_bits,
               int64_t index_bytes, int64_t nbytes, int64_t fmt, const float *lut, const float *row_scale,
               const float *table, int64_t rows, int64_t w, int64_t n_offline, int64_t slots,
               const uint8_t *mask, int64_t mask_bytes, const uint8_t *rcodes, int64_t R, int64_t rk,
               int64_t r_index_bytes, int64_t r_nbytes, int64_t H, const float *center, const float *cos,
               const float *sin, float *out, int64_t so_b, int64_t so_h, int64_t so_t, int64_t threads,
               int64_t block) {
    const int64_t s_n = groups / H, d = s_n * w, half = d / 2;
    if (d > MAX_DIM) return 1;
    const layout_t L = {groups, k, index_bits, index_bytes, nbytes, fmt};
    const layout_t RL = {1, rk, index_bits, r_index_bytes, r_nbytes, fmt};
    const int64_t blocks = (n + block - 1) / block;
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
    for (int64_t job = 0; job < B * blocks; job++) {
        const int64_t b = job / blocks, t0 = (job % blocks) * block, t1 = t0 + block < n ? t0 + block : n;
        const float scale = row_scale[b];
        const int64_t extra_base = b * slots;
        const uint8_t *row_mask = mask ? mask + b * mask_bytes : 0;
        int64_t refined = row_mask ? popcount_prefix(row_mask, t0 * groups) : 0; /* this row's codes before t0 */
        float acc[MAX_DIM], extra[MAX_DIM];
        for (int64_t t = t0; t < t1; t++) {
            const uint8_t *code = codes + (b * n + t) * nbytes;
            for (int64_t h = 0; h < H; h++) {
                for (int64_t j = 0; j < d; j++) acc[j] = 0.0f;
                for (int64_t c = 0; c < s_n; c++) {
                    const int64_t g = h * s_n + c, v = t * groups + g;
                    status |= add_group(acc + c * w, code, &L, g, lut, scale, table, rows, w, n_offline, extra_base) << 1;
                    if (row_mask && (row_mask[v >> 3] >> (v & 7)) & 1) {
                        if (refined >= R) {
                            status |= 4;
                            continue;
                        }
                        for (int64_t j = 0; j < w; j++) extra[j] = 0.0f;
                        status |= add_group(extra, rcodes + (b * R + refined) * r_nbytes, &RL, 0, lut, scale, table,
                                            rows, w, n_offline, extra_base) << 1;
                        for (int64_t j = 0; j < w; j++) acc[c * w + j] += extra[j];
                        refined++;
                    }
                }
                if (center)
                    for (int64_t j = 0; j < d; j++) acc[j] += center[h * d + j];
                float *o = out + b * so_b + h * so_h + t * so_t;
                if (cos) {
                    const float *cs = cos + (b * n + t) * d, *sn = sin + (b * n + t) * d;
                    for (int64_t j = 0; j < half; j++) o[j] = acc[j] * cs[j] - acc[j + half] * sn[j];
                    for (int64_t j = half; j < d; j++) o[j] = acc[j] * cs[j] + acc[j - half] * sn[j];
                } else {
                    for (int64_t j = 0; j < d; j++) o[j] = acc[j];
                }
            }
        }
    }
    return status & 2 ? 2 : status & 4 ? 3 : 0;
}
