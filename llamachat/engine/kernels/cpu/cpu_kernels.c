/* llamachat's int4 kernels for x86-64 CPUs with AVX2, FMA and F16C; native.py builds this file
   with the system C compiler on first use and calls it through ctypes. Single-threaded: on a
   small shared machine a second thread, spinning or started per call, was measured to cost
   more than it gives (it competes with PyTorch's own threads).

   Layouts are the ones quantize.py makes, so the tensors stay owned by PyTorch:
   - int4 matrices (N, K): pack_int4's bytes (N, K/2), two columns a byte; within each group of
     32 columns the low nibbles hold columns 0-3, 8-11, 16-19, 24-27 and the high nibbles 4-7,
     12-15, 20-23, 28-31. Scale and offset are float16, (N, K/32) each: w = q * scale + offset.
   - the int8 LM head: int8 (N, K) with a bfloat16 scale per row, as Int8Linear keeps it on a CPU.
   - the KV cache: float32 (layers, kv_heads, max_len, head_dim), as KVCache allocates it.

   An int4 product first rounds the activation row to int8 in groups of 32 exactly as
   quantize.quantize_activations does (steps of max|x|/127, floor(x/step + 0.5)), so its result
   is quantize_activations(x) @ dequantized_weight.T up to float32 rounding, as on CUDA. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32

/* ------------------------------------------------------------------------------- helpers */

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* e^x for 8 floats (Cephes' expf polynomial, about 1 ulp); inputs below -87.3 give 0. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                               _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i exponent = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
}

/* ------------------------------------------------------------------ activations to int8 */

/* One activation row rounded to int8 in groups of 32: q (K), the groups' steps (K/32), and
   each group's step times the sum of its q (the offsets multiply the rounded x). Each group's
   32 bytes are stored in pack_int4's nibble order (see the top), so they pair with the weights'
   low and high nibbles as loaded. */
typedef struct {
    int8_t *q;
    float *step;
    float *sum;
} Int8Row;

static void quantize_row(const float *x, int K, Int8Row row) {
    const __m256 sign = _mm256_set1_ps(-0.0f), half = _mm256_set1_ps(0.5f);
    for (int g = 0; g < K / GROUP; g++) {
        const float *xg = x + g * GROUP;
        __m256 amax = _mm256_setzero_ps();
        for (int i = 0; i < GROUP; i += 8)
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + i)));
        float step = max8(amax) / 127.0f;
        if (!(step > 0)) step = 1.0f; /* as quantize_activations: an all-zero group */
        __m256 vstep = _mm256_set1_ps(step);
        __m256i q[4];
        for (int i = 0; i < 4; i++) {
            __m256 scaled = _mm256_div_ps(_mm256_loadu_ps(xg + 8 * i), vstep);
            q[i] = _mm256_cvttps_epi32(_mm256_floor_ps(_mm256_add_ps(scaled, half)));
        }
        __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
        /* The two packs leave the low 128 bits holding columns 0-3, 8-11, 16-19, 24-27 and the
           high 128 bits 4-7, 12-15, 20-23, 28-31: the nibble order itself. */
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                            _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(row.q + g * GROUP), packed);
        row.step[g] = step;
        row.sum[g] = step * (float)_mm_cvtsi128_si32(t);
    }
}

/* ------------------------------------------------------------------------ int4 products */

/* One group's 32 weights as bytes 0..15, in the nibble order (low nibbles, then high). */
static inline __m256i unpack_group(const uint8_t *w) {
    __m128i bytes = _mm_loadu_si128((const __m128i *)w);
    __m128i mask = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask),
                            _mm_and_si128(bytes, mask));
}

/* 8 float partial sums of a group's weights times its 32 int8 activations. */
static inline __m256 group_dot(__m256i nibbles, const int8_t *q) {
    __m256i x = _mm256_loadu_si256((const __m256i *)q);
    __m256i pairs = _mm256_maddubs_epi16(nibbles, x); /* unsigned 0..15 times signed int8 */
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

typedef struct {
    const uint8_t *weight;  /* (N, K/2) */
    const uint16_t *scale;  /* (N, K/32) float16 */
    const uint16_t *offset; /* (N, K/32) float16 */
} Int4Matrix;

static void float16_row(const uint16_t *h, float *out, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) out[i] = _cvtsh_ss(h[i]);
}

/* `count` (1..4, a constant after inlining) activation rows times one weight row: out[j] =
   sum over groups of scale * step_j * (q . x_j) + offset * sum_j. `factors` holds 4 K/32. */
static inline __attribute__((always_inline)) void weight_row_times(
    const uint8_t *w, const float *scale, const float *offset, const Int8Row *x, int count,
    int G, float *factors, float *out) {
    for (int j = 0; j < count; j++) {
        float *f = factors + j * G;
        int g = 0;
        for (; g + 8 <= G; g += 8)
            _mm256_storeu_ps(f + g, _mm256_mul_ps(_mm256_loadu_ps(scale + g),
                                                  _mm256_loadu_ps(x[j].step + g)));
        for (; g < G; g++) f[g] = scale[g] * x[j].step[g];
    }
    /* Two accumulators a row, even and odd groups: a row alone (decode) would otherwise wait on
       its one FMA chain's latency. Every count sums in the same order, so a prompt's rows get
       exactly what each would get alone. Named variables, not an array: GCC kept an array of
       them on the stack. */
    __m256 even0 = _mm256_setzero_ps(), even1 = even0, even2 = even0, even3 = even0;
    __m256 odd0 = even0, odd1 = even0, odd2 = even0, odd3 = even0;
#define ACCUMULATE(acc, j, group)                                                             \
    acc = _mm256_fmadd_ps(group_dot(nibbles, x[j].q + (group) * GROUP),                        \
                          _mm256_broadcast_ss(factors + (j) * G + (group)), acc)
#define ALL_ROWS(which, group)                                                                \
    do {                                                                                      \
        ACCUMULATE(which##0, 0, group);                                                       \
        if (count > 1) ACCUMULATE(which##1, 1, group);                                        \
        if (count > 2) ACCUMULATE(which##2, 2, group);                                        \
        if (count > 3) ACCUMULATE(which##3, 3, group);                                        \
    } while (0)
    int g = 0;
    for (; g + 2 <= G; g += 2) {
        __m256i nibbles = unpack_group(w + g * (GROUP / 2));
        ALL_ROWS(even, g);
        nibbles = unpack_group(w + (g + 1) * (GROUP / 2));
        ALL_ROWS(odd, g + 1);
    }
    if (g < G) { /* an odd last group */
        __m256i nibbles = unpack_group(w + g * (GROUP / 2));
        ALL_ROWS(even, g);
    }
#undef ALL_ROWS
#undef ACCUMULATE
    const __m256 acc[4] = {_mm256_add_ps(even0, odd0), _mm256_add_ps(even1, odd1),
                           _mm256_add_ps(even2, odd2), _mm256_add_ps(even3, odd3)};
    for (int j = 0; j < count; j++) {
        __m256 offsets = _mm256_setzero_ps();
        g = 0;
        for (; g + 8 <= G; g += 8)
            offsets = _mm256_fmadd_ps(_mm256_loadu_ps(offset + g), _mm256_loadu_ps(x[j].sum + g),
                                      offsets);
        float tail = 0.0f;
        for (; g < G; g++) tail += offset[g] * x[j].sum[g];
        out[j] = sum8(acc[j]) + sum8(offsets) + tail;
    }
}

/* y (T, N) = x W^T for T rounded activation rows; each block of up to 4 rows reads a weight row
   once. `scratch` holds 6 K/32 floats. */
static void int4_product(const Int4Matrix *m, const Int8Row *x, int T, float *y, int N, int K,
                         float *scratch) {
    const int G = K / GROUP;
    float *scale = scratch, *offset = scratch + G, *factors = scratch + 2 * G;
    for (int r = 0; r < N; r++) {
        const uint8_t *w = m->weight + (size_t)r * (K / 2);
        float16_row(m->scale + (size_t)r * G, scale, G);
        float16_row(m->offset + (size_t)r * G, offset, G);
        for (int t = 0; t < T; t += 4) {
            float out[4];
            int count = T - t < 4 ? T - t : 4;
            switch (count) { /* a constant count lets the compiler unroll the rows */
            case 4: weight_row_times(w, scale, offset, x + t, 4, G, factors, out); break;
            case 3: weight_row_times(w, scale, offset, x + t, 3, G, factors, out); break;
            case 2: weight_row_times(w, scale, offset, x + t, 2, G, factors, out); break;
            default: weight_row_times(w, scale, offset, x + t, 1, G, factors, out); break;
            }
            for (int j = 0; j < count; j++) y[(size_t)(t + j) * N + r] = out[j];
        }
    }
}

/* Rows of activations a block of rows takes: their int8 copies stay in the L2 cache while every
   weight row passes over them. */
#define BLOCK_BYTES (128 * 1024)

/* y (T, N) = x (T, K) W^T with each row of x rounded to int8 in groups of 32, as
   quantize_activations does: one row for a decode step, several for a prompt (the same
   arithmetic row by row). scratch holds T (K/4 + 2 K/32) + 6 K/32 floats. Returns 0, or -1
   when memory for the rows' descriptors was not available. */
int int4_matmul(const uint8_t *weight, const uint16_t *scale, const uint16_t *offset,
                const float *x, float *y, int T, int N, int K, float *scratch) {
    const Int4Matrix m = {weight, scale, offset};
    const int G = K / GROUP, per_row = K / 4 + 2 * G;
    Int8Row *rows = malloc(sizeof(Int8Row) * T);
    if (!rows) return -1;
    for (int t = 0; t < T; t++) {
        float *at = scratch + (size_t)t * per_row;
        rows[t] = (Int8Row){(int8_t *)at, at + K / 4, at + K / 4 + G};
        quantize_row(x + (size_t)t * K, K, rows[t]);
    }
    int block = BLOCK_BYTES / K;
    block = block < 4 ? 4 : block - block % 4;
    for (int t = 0; t < T; t += block) {
        int count = T - t < block ? T - t : block;
        int4_product(&m, rows + t, count, y + (size_t)t * N, N, K, scratch + (size_t)T * per_row);
    }
    free(rows);
    return 0;
}

/* The float32 matrix (N, K) (Int4Linear.dequantized). q * scale is exact in float32, so this
   equals q.float() * scale.float() + offset.float(). */
void int4_dequantize(const uint8_t *weight, const uint16_t *scale, const uint16_t *offset,
                     float *out, int N, int K) {
    const int G = K / GROUP;
    const __m128i mask = _mm_set1_epi8(15);
    for (int r = 0; r < N; r++) {
        for (int g = 0; g < G; g++) {
            size_t at = (size_t)r * G + g;
            __m256 s = _mm256_set1_ps(_cvtsh_ss(scale[at])), o = _mm256_set1_ps(_cvtsh_ss(offset[at]));
            __m128i bytes = _mm_loadu_si128((const __m128i *)(weight + at * (GROUP / 2)));
            __m128i low = _mm_and_si128(bytes, mask), high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
            /* back to column order: four from the low nibbles, four from the high, and so on */
            __m128i first = _mm_unpacklo_epi32(low, high), second = _mm_unpackhi_epi32(low, high);
            float *dst = out + at * GROUP;
            __m128i parts[4] = {first, _mm_srli_si128(first, 8), second, _mm_srli_si128(second, 8)};
            for (int i = 0; i < 4; i++) {
                __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
                _mm256_storeu_ps(dst + 8 * i, _mm256_fmadd_ps(q, s, o));
            }
        }
    }
}

/* ---------------------------------------------------------------------- the int8 LM head */

/* y (N) = W x, int8 W (N, K) times float32 x, a bfloat16 scale per row. */
static void int8_product(const int8_t *weight, const uint16_t *scale, const float *x, float *y,
                         int N, int K) {
    for (int r = 0; r < N; r++) {
        const int8_t *w = weight + (size_t)r * K;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                         _mm256_setzero_ps()};
        int k = 0;
        for (; k + 32 <= K; k += 32) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + k));
            __m128i low = _mm256_castsi256_si128(bytes), high = _mm256_extracti128_si256(bytes, 1);
            __m128i parts[4] = {low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)};
            for (int i = 0; i < 4; i++) {
                __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i]));
                acc[i] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + k + 8 * i), acc[i]);
            }
        }
        float total = sum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        for (; k < K; k++) total += (float)w[k] * x[k];
        y[r] = bf16_to_float(scale[r]) * total;
    }
}

/* ------------------------------------------------------------------- the whole decode step */

typedef struct {
    Int4Matrix qkv, wo, w13, w2; /* (H + 2 KV) hd x D, D x H hd, 2F x D, D x F */
    const float *attention_norm, *ffn_norm;
} Layer;

typedef struct {
    int dim, n_layers, n_heads, n_kv_heads, head_dim, ffn, vocab;
    float eps, attention_scale;
    const Layer *layers;
    const float *final_norm;
    const int8_t *head_weight;  /* (vocab, dim) */
    const uint16_t *head_scale; /* (vocab) bfloat16 */
} Model;

static void rms_norm(const float *x, const float *weight, float *out, int n, float eps) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float squares = sum8(acc);
    for (; i < n; i++) squares += x[i] * x[i];
    float inverse = 1.0f / sqrtf(squares / n + eps);
    for (i = 0; i < n; i++) out[i] = x[i] * inverse * weight[i];
}

static inline int larger(int a, int b) { return a > b ? a : b; }

static void add(float *x, const float *y, int n) {
    for (int i = 0; i < n; i++) x[i] += y[i];
}

/* Rotate one head (hd) in place by a position's cos/sin rows (hd): Hugging Face's half split,
   v * cos + rotate_half(v) * sin. */
static void rope(float *v, const float *cos, const float *sin, int head_dim) {
    const int half = head_dim / 2;
    int i = 0;
    for (; i + 8 <= half; i += 8) {
        __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + half + i);
        _mm256_storeu_ps(v + i, _mm256_fnmadd_ps(b, _mm256_loadu_ps(sin + i),
                                                 _mm256_mul_ps(a, _mm256_loadu_ps(cos + i))));
        _mm256_storeu_ps(v + half + i,
                         _mm256_fmadd_ps(a, _mm256_loadu_ps(sin + half + i),
                                         _mm256_mul_ps(b, _mm256_loadu_ps(cos + half + i))));
    }
    for (; i < half; i++) {
        float a = v[i], b = v[half + i];
        v[i] = a * cos[i] - b * sin[i];
        v[half + i] = b * cos[half + i] + a * sin[half + i];
    }
}

static inline float dot(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return sum8(acc);
}

/* softmax over scores (n) in place; returns nothing, the weights sum to 1. */
static void softmax(float *scores, int n) {
    float top = -INFINITY;
    for (int i = 0; i < n; i++) top = scores[i] > top ? scores[i] : top;
    __m256 vtop = _mm256_set1_ps(top), total = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + i), vtop));
        _mm256_storeu_ps(scores + i, e);
        total = _mm256_add_ps(total, e);
    }
    float sum = sum8(total);
    for (; i < n; i++) {
        scores[i] = expf(scores[i] - top);
        sum += scores[i];
    }
    const float inverse = 1.0f / sum;
    for (i = 0; i < n; i++) scores[i] *= inverse;
}

/* The query heads of one kv head (groups x hd) over positions [0, length): each key and value
   row is read once for the whole group. out (groups x hd); scores: groups x length floats. */
static void attend(const float *q, const float *keys, const float *values, int groups,
                   int length, int head_dim, float scale, float *scores, float *out) {
    for (int s = 0; s < length; s++) {
        const float *k = keys + (size_t)s * head_dim;
        for (int h = 0; h < groups; h++)
            scores[(size_t)h * length + s] = dot(q + h * head_dim, k, head_dim) * scale;
    }
    for (int h = 0; h < groups; h++) softmax(scores + (size_t)h * length, length);
    memset(out, 0, sizeof(float) * groups * head_dim);
    for (int s = 0; s < length; s++) {
        const float *v = values + (size_t)s * head_dim;
        for (int h = 0; h < groups; h++) {
            __m256 p = _mm256_set1_ps(scores[(size_t)h * length + s]);
            float *o = out + h * head_dim;
            for (int i = 0; i < head_dim; i += 8)
                _mm256_storeu_ps(o + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(v + i),
                                                        _mm256_loadu_ps(o + i)));
        }
    }
}

static void silu_mul(float *gate_up, int width) {
    int i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= width; i += 8) {
        __m256 g = _mm256_loadu_ps(gate_up + i);
        __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, sign))));
        _mm256_storeu_ps(gate_up + i, _mm256_mul_ps(silu, _mm256_loadu_ps(gate_up + width + i)));
    }
    for (; i < width; i++) gate_up[i] = gate_up[i] / (1.0f + expf(-gate_up[i])) * gate_up[width + i];
}

/* One token through the model: `embedding` (dim) in, logits (vocab) out, this position's keys
   and values written into the caches (layers, kv_heads, max_len, head_dim). rope_cos/rope_sin
   are the position's rows (head_dim). Returns 0, or -1 when scratch memory was not available.
   head_dim is a multiple of 8 and dim and ffn of 32 (checked by the caller). */
int decode_step(const Model *m, const float *embedding, int position, float *k_cache,
                float *v_cache, int max_len, const float *rope_cos, const float *rope_sin,
                float *logits) {
    const int D = m->dim, H = m->n_heads, KV = m->n_kv_heads, HD = m->head_dim, F = m->ffn;
    const int groups = H / KV, length = position + 1, qkv_width = (H + 2 * KV) * HD;
    const int widest = larger(larger(2 * F, qkv_width), D); /* the longest product output */
    const int inputs = larger(larger(F, H * HD), D);         /* the longest product input */
    /* x, h (D); projections (widest); attention out (H hd); scores (groups x length);
       the int8 row (inputs/4 + 2 inputs/32); the products' scratch (6 inputs/32) */
    size_t floats = 2 * (size_t)D + widest + (size_t)H * HD + (size_t)groups * length +
                    inputs / 4 + 8 * (inputs / GROUP) + 64;
    float *memory = malloc(floats * sizeof(float));
    if (!memory) return -1;
    float *x = memory, *h = x + D, *projected = h + D, *attended = projected + widest;
    float *scores = attended + H * HD, *row_memory = scores + (size_t)groups * length;
    Int8Row row = {(int8_t *)row_memory, row_memory + inputs / 4,
                   row_memory + inputs / 4 + inputs / GROUP};
    float *factors = row_memory + inputs / 4 + 2 * (inputs / GROUP); /* 6 inputs/32 */

    memcpy(x, embedding, sizeof(float) * D);
    for (int l = 0; l < m->n_layers; l++) {
        const Layer *layer = &m->layers[l];
        rms_norm(x, layer->attention_norm, h, D, m->eps);
        quantize_row(h, D, row);
        int4_product(&layer->qkv, &row, 1, projected, qkv_width, D, factors);
        for (int head = 0; head < H + KV; head++) rope(projected + head * HD, rope_cos, rope_sin, HD);
        float *keys = k_cache + (size_t)l * KV * max_len * HD;
        float *values = v_cache + (size_t)l * KV * max_len * HD;
        for (int g = 0; g < KV; g++) {
            size_t at = ((size_t)g * max_len + position) * HD;
            memcpy(keys + at, projected + (H + g) * HD, sizeof(float) * HD);
            memcpy(values + at, projected + (H + KV + g) * HD, sizeof(float) * HD);
        }
        for (int g = 0; g < KV; g++) {
            size_t start = (size_t)g * max_len * HD;
            attend(projected + g * groups * HD, keys + start, values + start, groups, length, HD,
                   m->attention_scale, scores, attended + g * groups * HD);
        }
        quantize_row(attended, H * HD, row);
        int4_product(&layer->wo, &row, 1, projected, D, H * HD, factors);
        add(x, projected, D);
        rms_norm(x, layer->ffn_norm, h, D, m->eps);
        quantize_row(h, D, row);
        int4_product(&layer->w13, &row, 1, projected, 2 * F, D, factors);
        silu_mul(projected, F);
        quantize_row(projected, F, row);
        int4_product(&layer->w2, &row, 1, h, D, F, factors);
        add(x, h, D);
    }
    rms_norm(x, m->final_norm, h, D, m->eps);
    int8_product(m->head_weight, m->head_scale, h, logits, m->vocab, D);
    free(memory);
    return 0;
}
