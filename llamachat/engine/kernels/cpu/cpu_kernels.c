/* llamachat's int4 kernels for x86-64 CPUs with AVX2, FMA and F16C; native.py builds this file
   with the system C compiler on first use, for the CPU it runs on (-march=native), and calls it
   through ctypes. Where the CPU has AVX-512 VNNI, the int4 products multiply 64 weights an
   instruction (vpdpbusd) instead of 32 in two.

   The products and the attention run on a pool of threads kept alive between
   calls (the caller's thread is one of them): they wait for work spinning for a moment, then
   sleep, so between tokens (sampling, the Python around it) they leave the cores to PyTorch.

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
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define GROUP 32
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VNNI512 1
#else
#define VNNI512 0
#endif

int vnni512(void) { return VNNI512; }

/* --------------------------------------------------------------------- the thread pool */

/* work(context, part, parts): part `part` of `parts` of a job; every part runs once. */
typedef void (*Work)(void *context, int part, int parts);

#define MAX_THREADS 64
#define SPIN_NS 200000 /* how long an idle thread polls before it sleeps */

static struct {
    int parts; /* threads working a job, the caller's included */
    pthread_t threads[MAX_THREADS];
    _Atomic unsigned generation; /* one more for each job */
    _Atomic int remaining;       /* helper threads yet to finish the job */
    _Atomic int sleepers;
    _Atomic int closing;
    unsigned started; /* the generation when the helpers were started */
    Work work;
    void *context;
    pthread_mutex_t lock;
    pthread_cond_t wake;
} pool = {1, {0}, 0, 0, 0, 0, 0, NULL, NULL, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

/* One caller at a time: the pool, and the scratch memory of the step, are shared. */
static pthread_mutex_t caller = PTHREAD_MUTEX_INITIALIZER;

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void *helper(void *argument) {
    const int part = (int)(intptr_t)argument;
    unsigned seen = pool.started; /* not the generation now: a job may be posted already */
    for (;;) {
        long long since = now_ns();
        for (int polls = 0; atomic_load(&pool.generation) == seen; polls++) {
            _mm_pause();
            if (polls % 64 == 63 && now_ns() - since > SPIN_NS) {
                /* Sleep. Raising `sleepers` before the last look at `generation` (both
                   sequentially consistent) means a job posted meanwhile is seen here or its
                   poster sees a sleeper and wakes it. */
                pthread_mutex_lock(&pool.lock);
                atomic_fetch_add(&pool.sleepers, 1);
                while (atomic_load(&pool.generation) == seen && !atomic_load(&pool.closing))
                    pthread_cond_wait(&pool.wake, &pool.lock);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.lock);
                since = now_ns();
            }
        }
        seen = atomic_load(&pool.generation);
        if (atomic_load(&pool.closing)) return NULL;
        pool.work(pool.context, part, pool.parts);
        atomic_fetch_sub(&pool.remaining, 1);
    }
}

static void wake_helpers(void) {
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
}

static void stop_helpers(void) {
    if (pool.parts <= 1) return;
    atomic_store(&pool.closing, 1);
    atomic_fetch_add(&pool.generation, 1);
    pthread_mutex_lock(&pool.lock);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    for (int i = 1; i < pool.parts; i++) pthread_join(pool.threads[i], NULL);
    atomic_store(&pool.closing, 0);
    pool.parts = 1;
}

/* A forked child has the parent's pool but none of its threads. */
static void forget_helpers(void) {
    pool.parts = 1;
    atomic_store(&pool.sleepers, 0);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_mutex_init(&caller, NULL);
}

/* `threads` working each job from now on (1: the caller alone); fewer when threads cannot be
   started. */
static void use_threads(int threads) {
    static int registered = 0;
    if (!registered) {
        pthread_atfork(NULL, NULL, forget_helpers);
        registered = 1;
    }
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (threads == pool.parts) return;
    stop_helpers();
    pool.started = atomic_load(&pool.generation);
    int started = 1;
    for (; started < threads; started++)
        if (pthread_create(&pool.threads[started], NULL, helper, (void *)(intptr_t)started))
            break;
    pool.parts = started;
}

/* Run every part of a job, the caller doing part 0, and return when all are done. */
static void run_parts(Work work, void *context) {
    if (pool.parts == 1) {
        work(context, 0, 1);
        return;
    }
    pool.work = work;
    pool.context = context;
    atomic_store(&pool.remaining, pool.parts - 1);
    atomic_fetch_add(&pool.generation, 1);
    wake_helpers();
    work(context, 0, pool.parts);
    while (atomic_load(&pool.remaining) > 0) _mm_pause();
}

/* The slice [*start, *end) of `count` items that part `part` of `parts` takes, in whole
   multiples of `align` but the last. */
static void share(int count, int align, int part, int parts, int *start, int *end) {
    int units = (count + align - 1) / align;
    *start = (int)((long long)units * part / parts) * align;
    *end = (int)((long long)units * (part + 1) / parts) * align;
    if (*end > count) *end = count;
    if (*start > count) *start = count;
}

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
   low and high nibbles as loaded: 16 bytes for the low nibbles, then 16 for the high. With
   VNNI512 the groups go in pairs of 64 bytes, the two groups' low halves and then their high
   halves, as a pair of groups' 32 packed bytes unpack into one 512-bit register; an odd last
   group stays as it is. */
typedef struct {
    int8_t *q;
    float *step;
    float *sum;
} Int8Row;

/* Whether group g of G is one of a pair (VNNI512's layout). */
static inline int pairs(int g, int G) { return (g | 1) < G; }

/* Where group g's low-nibble half starts in a row's int8 bytes (its high half follows 16
   bytes later, or 32 in a pair). */
static inline int low_at(int g, int G) {
    if (VNNI512 && pairs(g, G)) return (g & ~1) * GROUP + 16 * (g & 1);
    return g * GROUP;
}

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
        _mm_storeu_si128((__m128i *)(row.q + low_at(g, K / GROUP)), _mm256_castsi256_si128(packed));
        _mm_storeu_si128((__m128i *)(row.q + low_at(g, K / GROUP) + 16 * (VNNI512 && pairs(g, K / GROUP) ? 2 : 1)),
                         _mm256_extracti128_si256(packed, 1));
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

/* sum over groups of offset * sum: every product path ends a row with this one function,
   its multiply-adds written out, so that the compiler cannot fuse them in one path and not in
   another (a row's result must not depend on which path computed it). */
static inline float offsets_dot(const float *offset, const float *sum, int G) {
    __m256 acc = _mm256_setzero_ps();
    int g = 0;
    for (; g + 8 <= G; g += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(offset + g), _mm256_loadu_ps(sum + g), acc);
    __m128 tail = _mm_setzero_ps();
    for (; g < G; g++) tail = _mm_fmadd_ss(_mm_set_ss(offset[g]), _mm_set_ss(sum[g]), tail);
    return sum8(acc) + _mm_cvtss_f32(tail);
}

/* f[g] = scale[g] * step[g]: each group's factor for one weight row and one activation row. */
static inline void group_factors(const float *scale, const float *step, int G, float *f) {
    int g = 0;
    for (; g + 8 <= G; g += 8)
        _mm256_storeu_ps(f + g, _mm256_mul_ps(_mm256_loadu_ps(scale + g), _mm256_loadu_ps(step + g)));
    for (; g < G; g++) f[g] = scale[g] * step[g];
}

#if VNNI512
/* A pair of groups' 32 packed bytes, broadcast to both halves of a register and the upper half
   shifted by a nibble: the 64 weights that pair with the pair's 64 int8 bytes (see low_at). */
static inline __m512i pair_nibbles(const uint8_t *w) {
    const __m512i shifts = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
    __m512i bytes = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)w));
    return _mm512_and_si512(_mm512_srlv_epi64(bytes, shifts), _mm512_set1_epi8(15));
}

/* acc + the pair's products with its 64 int8 bytes `q`, each group's times its factor (the two
   floats at `f`): the int32 sums of the first group sit in lanes 0-3 and 8-11, the second's in
   4-7 and 12-15. */
static inline __m512 pair_times(__m512i nibbles, const int8_t *q, const float *f, __m512 acc) {
    const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), nibbles, _mm512_loadu_si512(q));
    __m128 two = _mm_castpd_ps(_mm_load_sd((const double *)f));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums),
                           _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(two)), acc);
}

/* `count` (1..4, a constant after inlining) activation rows times one weight row: out[j] =
   sum over groups of scale * step_j * (q . x_j) + offset * sum_j. `factors` holds 4 K/32.
   Two groups an instruction: their 32 packed bytes, broadcast to both halves of a register and
   the upper half shifted by a nibble, are the 64 weights that pair with the rows' 64 bytes. */
static inline __attribute__((always_inline)) void weight_row_times(
    const uint8_t *w, const float *scale, const float *offset, const Int8Row *x, int count,
    int G, float *factors, float *out) {
    for (int j = 0; j < count; j++) group_factors(scale, x[j].step, G, factors + j * G);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
#define PAIR(acc, j) acc = pair_times(nibbles, x[j].q + g * GROUP, factors + (j) * G + g, acc)
    int g = 0;
    for (; g + 2 <= G; g += 2) {
        __m512i nibbles = pair_nibbles(w + g * 16);
        PAIR(acc0, 0);
        if (count > 1) PAIR(acc1, 1);
        if (count > 2) PAIR(acc2, 2);
        if (count > 3) PAIR(acc3, 3);
    }
#undef PAIR
    float lone[4] = {0, 0, 0, 0}; /* an odd last group */
    if (g < G) {
        __m256i nibbles = unpack_group(w + g * (GROUP / 2));
        for (int j = 0; j < count; j++)
            lone[j] = sum8(group_dot(nibbles, x[j].q + g * GROUP)) * factors[j * G + g];
    }
    const __m512 acc[4] = {acc0, acc1, acc2, acc3};
    for (int j = 0; j < count; j++)
        out[j] = (_mm512_reduce_add_ps(acc[j]) + lone[j]) + offsets_dot(offset, x[j].sum, G);
}

/* Four weight rows times one activation row (a decode step): the same sums as
   weight_row_times's with count 1, in the same order, four rows at once so that their
   accumulators are independent (one row alone waits on its multiply-add's latency) and each
   pair of the row's int8 groups is loaded once for all four. `factors` holds 4 K/32. */
static inline void four_rows_times_one(const uint8_t *w, size_t row_bytes, const uint16_t *scale,
                                       const uint16_t *offset, const Int8Row *x, int G,
                                       float *row, float *factors, float *out) {
    for (int line = 0; line < 4 * G * 2; line += 64) { /* the next rows' scales and offsets */
        _mm_prefetch((const char *)(scale + 4 * G) + line, _MM_HINT_T0);
        _mm_prefetch((const char *)(offset + 4 * G) + line, _MM_HINT_T0);
    }
    for (int i = 0; i < 4; i++) {
        float16_row(scale + (size_t)i * G, row, G);
        group_factors(row, x->step, G, factors + i * G);
    }
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    int g = 0;
    /* The next four rows' weights are fetched meanwhile: they come from memory (a model's
       matrices are far larger than the caches) in one stream a row. */
    const uint8_t *next = w + 4 * row_bytes;
    for (; g + 2 <= G; g += 2) {
        for (int i = 0; i < 4; i++) _mm_prefetch((const char *)(next + i * row_bytes + g * 16), _MM_HINT_T0);
        for (int i = 0; i < 4; i++)
            acc[i] = pair_times(pair_nibbles(w + i * row_bytes + g * 16), x->q + g * GROUP,
                                factors + i * G + g, acc[i]);
    }
    /* The rest exactly as weight_row_times ends: the same sums in the same order. */
    for (int i = 0; i < 4; i++) {
        float lone = 0.0f; /* an odd last group */
        if (g < G) {
            __m256i nibbles = unpack_group(w + i * row_bytes + g * (GROUP / 2));
            lone = sum8(group_dot(nibbles, x->q + g * GROUP)) * factors[i * G + g];
        }
        float16_row(offset + (size_t)i * G, row, G);
        out[i] = (_mm512_reduce_add_ps(acc[i]) + lone) + offsets_dot(row, x->sum, G);
    }
}
#else
/* `count` (1..4, a constant after inlining) activation rows times one weight row: out[j] =
   sum over groups of scale * step_j * (q . x_j) + offset * sum_j. `factors` holds 4 K/32. */
static inline __attribute__((always_inline)) void weight_row_times(
    const uint8_t *w, const float *scale, const float *offset, const Int8Row *x, int count,
    int G, float *factors, float *out) {
    for (int j = 0; j < count; j++) group_factors(scale, x[j].step, G, factors + j * G);
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
        out[j] = sum8(acc[j]) + offsets_dot(offset, x[j].sum, G);
    }
}
#endif

/* Rows [start, end) of y (T, N) = x W^T for T rounded activation rows; each block of up to 4
   rows reads a weight row once. `scratch` holds 6 K/32 floats. */
static void int4_rows(const Int4Matrix *m, const Int8Row *x, int T, float *y, int N, int K,
                      int start, int end, float *scratch) {
    const int G = K / GROUP;
    float *scale = scratch, *offset = scratch + G, *factors = scratch + 2 * G;
    int r = start;
#if VNNI512
    if (T == 1)
        for (; r + 4 <= end; r += 4) {
            float out[4];
            four_rows_times_one(m->weight + (size_t)r * (K / 2), K / 2, m->scale + (size_t)r * G,
                                m->offset + (size_t)r * G, x, G, offset, factors, out);
            for (int i = 0; i < 4; i++) y[r + i] = out[i];
        }
#endif
    for (; r < end; r++) {
        const uint8_t *w = m->weight + (size_t)r * (K / 2);
        for (int line = 0; line < K / 2; line += 64) /* the next row, from memory meanwhile */
            _mm_prefetch((const char *)(w + K / 2) + line, _MM_HINT_T0);
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

/* Scratch floats a product needs for each thread: 6 K/32, rounded up to a cache line. */
static inline size_t part_scratch(int K) { return (6 * (size_t)(K / GROUP) + 15) & ~(size_t)15; }

typedef struct {
    const Int4Matrix *m;
    const Int8Row *x;
    int T, N, K;
    float *y, *scratch; /* scratch: part_scratch(K) for each part */
} Product;

static void product_part(void *context, int part, int parts) {
    const Product *p = context;
    int start, end;
    share(p->N, 16, part, parts, &start, &end);
    int4_rows(p->m, p->x, p->T, p->y, p->N, p->K, start, end,
              p->scratch + (size_t)part * part_scratch(p->K));
}

/* y (T, N) = x W^T on every thread of the pool, each taking a share of W's rows. */
static void int4_product(const Int4Matrix *m, const Int8Row *x, int T, float *y, int N, int K,
                         float *scratch) {
    Product p = {m, x, T, N, K, y, scratch};
    run_parts(product_part, &p);
}

/* Rows of activations a block of rows takes: their int8 copies stay in the L2 cache while every
   weight row passes over them. */
#define BLOCK_BYTES (128 * 1024)

/* y (T, N) = x (T, K) W^T with each row of x rounded to int8 in groups of 32, as
   quantize_activations does: one row for a decode step, several for a prompt (the same
   arithmetic row by row), on `threads` threads. scratch holds T (K/4 + 2 K/32) floats.
   Returns 0, or -1 when memory was not available. */
int int4_matmul(const uint8_t *weight, const uint16_t *scale, const uint16_t *offset,
                const float *x, float *y, int T, int N, int K, float *scratch, int threads) {
    const Int4Matrix m = {weight, scale, offset};
    const int G = K / GROUP, per_row = K / 4 + 2 * G;
    Int8Row *rows = malloc(sizeof(Int8Row) * T);
    float *parts_scratch = malloc(sizeof(float) * part_scratch(K) * MAX_THREADS);
    if (!rows || !parts_scratch) {
        free(rows);
        free(parts_scratch);
        return -1;
    }
    for (int t = 0; t < T; t++) {
        float *at = scratch + (size_t)t * per_row;
        rows[t] = (Int8Row){(int8_t *)at, at + K / 4, at + K / 4 + G};
        quantize_row(x + (size_t)t * K, K, rows[t]);
    }
    int block = BLOCK_BYTES / K;
    block = block < 4 ? 4 : block - block % 4;
    pthread_mutex_lock(&caller);
    use_threads(threads);
    for (int t = 0; t < T; t += block) {
        int count = T - t < block ? T - t : block;
        int4_product(&m, rows + t, count, y + (size_t)t * N, N, K, parts_scratch);
    }
    pthread_mutex_unlock(&caller);
    free(rows);
    free(parts_scratch);
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

/* Rows [start, end) of y (N) = W x, int8 W (N, K) times float32 x, a bfloat16 scale per row. */
static void int8_rows(const int8_t *weight, const uint16_t *scale, const float *x, float *y,
                      int start, int end, int K) {
    for (int r = start; r < end; r++) {
        const int8_t *w = weight + (size_t)r * K;
        for (int line = 0; line < K; line += 64) /* the next row, from memory meanwhile */
            _mm_prefetch((const char *)(w + K) + line, _MM_HINT_T0);
        int k = 0;
#ifdef __AVX512F__
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                         _mm512_setzero_ps()};
        for (; k + 64 <= K; k += 64)
            for (int i = 0; i < 4; i++) {
                __m128i bytes = _mm_loadu_si128((const __m128i *)(w + k + 16 * i));
                __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
                acc[i] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + k + 16 * i), acc[i]);
            }
        float total = _mm512_reduce_add_ps(
            _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
#else
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                         _mm256_setzero_ps()};
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
#endif
        for (; k < K; k++) total += (float)w[k] * x[k];
        y[r] = bf16_to_float(scale[r]) * total;
    }
}

typedef struct {
    const int8_t *weight;
    const uint16_t *scale;
    const float *x;
    float *y;
    int N, K;
} HeadProduct;

static void head_part(void *context, int part, int parts) {
    const HeadProduct *p = context;
    int start, end;
    share(p->N, 64, part, parts, &start, &end);
    int8_rows(p->weight, p->scale, p->x, p->y, start, end, p->K);
}

/* ------------------------------------------------- the model's layers, for a prompt or a token */

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


/* The attention of a prompt's rows: row t attends positions [0, start + t], each part taking a
   share of the (row, query head) pairs, those of one row and kv head together. */
typedef struct {
    const float *q; /* (T, widest): row t's rotated queries first */
    size_t q_stride;
    const float *keys, *values;
    float *out; /* (T, H hd) */
    float *scores;
    int rows, start, heads, groups, max_len, head_dim;
    float scale;
} PromptAttention;

static void prompt_attention_part(void *context, int part, int parts) {
    const PromptAttention *a = context;
    int first, last;
    share(a->rows * a->heads, 1, part, parts, &first, &last);
    float *scores = a->scores + (size_t)part * a->groups * (a->start + a->rows);
    for (int item = first; item < last;) {
        int t = item / a->heads, head = item % a->heads;
        int kv = head / a->groups, count = (kv + 1) * a->groups - head; /* within the row */
        if (item + count > last) count = last - item;
        size_t at = (size_t)kv * a->max_len * a->head_dim;
        attend(a->q + t * a->q_stride + (size_t)head * a->head_dim, a->keys + at, a->values + at,
               count, a->start + t + 1, a->head_dim, a->scale, scores,
               a->out + (size_t)t * a->heads * a->head_dim + (size_t)head * a->head_dim);
        item += count;
    }
}

/* T tokens at positions start .. start + T - 1 through the model on `threads` threads: a
   decode step is one row. Every row is computed alone (the products give a row what it gets in
   any block, its attention reads exactly positions [0, its own]), so a prompt read in one call,
   in chunks, or token by token leaves the same keys and values and the same logits. The caches
   are (layers, kv_heads, max_len, head_dim), a layer's (kv_heads, max_len, head_dim) contiguous
   and `layer_stride` floats after the last's (one slot of a batch's pool lies between the other
   slots' layers); head_dim is a multiple of 8 and dim and ffn of 32 (checked by the caller). `embeddings` (T, dim); rope_cos/rope_sin the
   whole tables (positions, head_dim); logits (vocab) for the last row, or (T, vocab) with
   `every_row`. Returns 0, or -1 when scratch memory was not available. */
int prompt_step(const Model *m, const float *embeddings, int start, int T, float *k_cache,
                float *v_cache, int max_len, long long layer_stride, const float *rope_cos,
                const float *rope_sin, float *logits, int every_row, int threads) {
    const int D = m->dim, H = m->n_heads, KV = m->n_kv_heads, HD = m->head_dim, F = m->ffn;
    const int groups = H / KV, qkv_width = (H + 2 * KV) * HD;
    const int widest = larger(larger(2 * F, qkv_width), D);
    const int inputs = larger(larger(F, H * HD), D);
    const int parts = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    const size_t per_row = inputs / 4 + 2 * (inputs / GROUP); /* an int8 row's floats */
    size_t floats = (size_t)T * (2 * D + widest + H * HD + per_row) +
                    (size_t)parts * groups * (start + T) + parts * part_scratch(inputs) + 64;
    float *memory = malloc(floats * sizeof(float));
    Int8Row *rows = malloc(sizeof(Int8Row) * T);
    if (!memory || !rows) {
        free(memory);
        free(rows);
        return -1;
    }
    float *x = memory, *h = x + (size_t)T * D, *projected = h + (size_t)T * D;
    float *attended = projected + (size_t)T * widest, *row_memory = attended + (size_t)T * H * HD;
    float *scores = row_memory + (size_t)T * per_row;
    float *products = scores + (size_t)parts * groups * (start + T);
    for (int t = 0; t < T; t++) {
        float *at = row_memory + (size_t)t * per_row;
        rows[t] = (Int8Row){(int8_t *)at, at + inputs / 4, at + inputs / 4 + inputs / GROUP};
    }
    /* Rows a product takes at once: their int8 copies stay in the L2 cache (int4_matmul). */
    int block = BLOCK_BYTES / D;
    block = block < 4 ? 4 : block - block % 4;
#define PRODUCT(matrix, width, in, out)                                                       \
    for (int t0 = 0; t0 < T; t0 += block)                                                     \
        int4_product(&(matrix), rows + t0, T - t0 < block ? T - t0 : block,                    \
                     (out) + (size_t)t0 * (width), width, in, products)

    pthread_mutex_lock(&caller);
    use_threads(parts);
    memcpy(x, embeddings, sizeof(float) * T * D);
    for (int l = 0; l < m->n_layers; l++) {
        const Layer *layer = &m->layers[l];
        for (int t = 0; t < T; t++) {
            rms_norm(x + (size_t)t * D, layer->attention_norm, h + (size_t)t * D, D, m->eps);
            quantize_row(h + (size_t)t * D, D, rows[t]);
        }
        PRODUCT(layer->qkv, qkv_width, D, projected);
        float *keys = k_cache + (size_t)l * layer_stride;
        float *values = v_cache + (size_t)l * layer_stride;
        for (int t = 0; t < T; t++) {
            float *row = projected + (size_t)t * qkv_width;
            const int position = start + t;
            for (int head = 0; head < H + KV; head++)
                rope(row + head * HD, rope_cos + (size_t)position * HD,
                     rope_sin + (size_t)position * HD, HD);
            for (int g = 0; g < KV; g++) {
                size_t at = ((size_t)g * max_len + position) * HD;
                memcpy(keys + at, row + (H + g) * HD, sizeof(float) * HD);
                memcpy(values + at, row + (H + KV + g) * HD, sizeof(float) * HD);
            }
        }
        PromptAttention attention = {projected, qkv_width, keys, values, attended, scores, T,
                                     start, H, groups, max_len, HD, m->attention_scale};
        run_parts(prompt_attention_part, &attention);
        for (int t = 0; t < T; t++) quantize_row(attended + (size_t)t * H * HD, H * HD, rows[t]);
        PRODUCT(layer->wo, D, H * HD, projected);
        for (int t = 0; t < T; t++) {
            add(x + (size_t)t * D, projected + (size_t)t * D, D);
            rms_norm(x + (size_t)t * D, layer->ffn_norm, h + (size_t)t * D, D, m->eps);
            quantize_row(h + (size_t)t * D, D, rows[t]);
        }
        PRODUCT(layer->w13, 2 * F, D, projected);
        for (int t = 0; t < T; t++) {
            silu_mul(projected + (size_t)t * 2 * F, F);
            quantize_row(projected + (size_t)t * 2 * F, F, rows[t]);
        }
        PRODUCT(layer->w2, D, F, h);
        for (int t = 0; t < T; t++) add(x + (size_t)t * D, h + (size_t)t * D, D);
    }
#undef PRODUCT
    for (int t = every_row ? 0 : T - 1; t < T; t++) {
        rms_norm(x + (size_t)t * D, m->final_norm, h, D, m->eps);
        float *out = logits + (every_row ? (size_t)t * m->vocab : 0);
        HeadProduct head = {m->head_weight, m->head_scale, h, out, m->vocab, D};
        run_parts(head_part, &head);
    }
    pthread_mutex_unlock(&caller);
    free(rows);
    free(memory);
    return 0;
}
