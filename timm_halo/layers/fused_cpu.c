/* Fused windowed attention for CPUs: a window's logits live in a per-thread buffer and never reach a tensor.
 *
 * Built on first use by fused_cpu.py, once for float and once for double (-DHALO_DOUBLE), and called through
 * ctypes on a range of windows; the caller runs ranges on its own threads (ctypes releases the GIL).
 * Layouts, window w (n windows; nh x nw blocks per image and head, window w is block (w / nw % nh, w % nw) of group
 * w / (nh * nw)): q (d, Q), k (d, K), v (dv, K), out (dv, Q) as read through a Layout each (below: windows stored one
 * after another, or cut straight out of NCHW maps, out-of-image positions reading as 0), stats (Q, 2);
 * K = kh * kw, Q = bq * bq,
 *   rel_h, rel_w: the relative terms' source, either (mode PRODUCTS) per window (Rh, Q) / (Rw, Q): each query's
 *     dot products with every row of the two tables, or (mode TABLES) the tables themselves, (Rh, d) / (Rw, d),
 *     whose products with q the kernel takes itself (no per-query products in memory),
 *   base_h (nh, bq), base_w (nw, bq): the table row of key row / column 0 for each block and query row / column,
 *   mask_h (nh, kh), mask_w (nw, kw): additive border masks (0 or a very negative number),
 * query i = (y, x) and key j = (jh, jw) row-major. With P_h[r, i] = q[:, i] . table_h[r] (likewise P_w), the logit
 * of (i, j) in block (by, bx) is
 *   scale * q[:, i] . k[:, j] + P_h[base_h[by, y] + jh, i] + mask_h[by, jh] + P_w[base_w[bx, x] + jw, i]
 *   + mask_w[bx, jw].
 * All work is on GCC/Clang vector types (64 bytes: one AVX-512 register, or two AVX2 / four SSE / NEON), so no loop
 * has a scalar tail and nothing depends on the auto-vectoriser. Forward, per window: logits (K, Q) = relative terms
 * + k^T (scale q) with the queries across vector lanes, softmax down the keys, out = v P^T (halo_fwd).
 * Backward: the keys' and values' rows padded to nv whole vectors (pad columns get a very negative logit, hence
 * probability exactly 0), the same logits (Q, K), P recomputed from the forward's per-query max and 1 / sum of exp
 * (stats: flash-attention style), dP = dO^T v, dS = P (dP - rowsum(dO O)), dq = scale dS k^T, dk = scale q dS,
 * dv = dO P. Every product there is one register-blocked kernel (gemm), with keys also copied key-major where keys
 * are the contracted axis.
 * Functions return 0, 1 when out of memory, 2 when a table row lies outside its table, 3 for operands that do
 * not fit together (2 and 3: a caller's bug).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef HALO_DOUBLE
typedef double T;
typedef int64_t I;
#define PAD_LOGIT (-DBL_MAX / 4)
#else
typedef float T;
typedef int32_t I;
#define PAD_LOGIT (-FLT_MAX / 4)
#endif

/* One vec is one SIMD register of the target (a register file of 32 or 16 of them) */
#ifndef VBYTES
#if defined(__AVX512F__)
#define VBYTES 64
#elif defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16 /* SSE, NEON */
#endif
#endif
#if defined(__AVX512F__) || defined(__aarch64__)
#define REGISTERS 32
#else
#define REGISTERS 16
#endif
#define VL ((int)(VBYTES / sizeof(T)))
#define QB 16 /* queries per block: a block's logits and their gradient stay in L1 / L2 while a window is used */
typedef T vec __attribute__((vector_size(VBYTES)));
#if defined(__AVX512F__) && VBYTES == 64
#include <immintrin.h>
#define HALO_AVX512 /* 64-byte vectors on AVX-512: max and scalef instructions */
#endif
enum { PRODUCTS = 0, TABLES = 1 };  /* HaloArgs.mode: what rel_h / rel_w point to (see the top comment) */

/* Where element (channel c, row y, column x) of window w's q / k / v / out lies: index
 *   group * g + block_y * by + block_x * bx + channel * c + row * (y - pad_y) + (x - pad_x)
 * with (g, by, bx) = (w / (nh * nw), w / nw % nh, w % nw); it exists where by * step_y - pad_y + y lies in
 * [0, height) and bx * step_x - pad_x + x in [0, width) (0 is read elsewhere, nothing written). Windows stored one
 * after another: pad 0, steps = the window's sides, bounds never hit. */
typedef struct {
    int64_t group, channel, block_y, block_x, row;
    int32_t step_y, step_x, pad_y, pad_x, height, width;
} Layout;

/* The layouts (mirrored by fused_cpu.py's Layouts): grad_q is laid out as q, grad_out as out; grad_k / grad_v are
 * always windows one after another. */
typedef struct {
    Layout q, k, v, out;
} Layouts;
/* One call's operands, named (mirrored field by field by fused_cpu.py's HaloArgs; halo_args_bytes lets the caller
 * check the layout). Backward reads out and stats and writes the grad_* fields; forward writes out and stats. */
typedef struct {
    int32_t d, dv, Q, kh, kw;       /* channels of q / k and of v, queries and key rows / columns per window */
    int32_t rows_h, rows_w;         /* rows of the two relative sources (tables, or per-window products) */
    int32_t nh, nw, bq, mode;       /* blocks per axis, queries per block side, PRODUCTS or TABLES */
    int64_t calls_stride;           /* TABLES backward: windows per call; call start / calls_stride picks the
                                     * call's own (rows, d) slice of grad_rel_h / grad_rel_w */
    T scale;
    const T *q, *k, *v, *rel_h, *rel_w;
    const int32_t *base_h, *base_w;
    const T *mask_h, *mask_w;
    T *out, *stats;
    const T *grad_out;
    T *grad_q, *grad_k, *grad_v, *grad_rel_h, *grad_rel_w;
    Layouts lay;
} HaloArgs;

typedef I ivec __attribute__((vector_size(VBYTES)));

static inline vec splat(T x) { return x - (vec){0}; }  /* x - 0 == x for every x, -0 included: no add */
static inline vec vselect(ivec mask, vec a, vec b) { return (vec)((mask & (ivec)a) | (~mask & (ivec)b)); }
/* max(a, b) per lane, b where either is NaN (the x86 instruction's rule) */
static inline vec vmax(vec a, vec b) {
#if defined(HALO_AVX512) && defined(HALO_DOUBLE)
    return (vec)_mm512_max_pd((__m512d)a, (__m512d)b);
#elif defined(HALO_AVX512)
    return (vec)_mm512_max_ps((__m512)a, (__m512)b);
#else
    return vselect(a > b, a, b);
#endif
}
static inline T hsum(vec x) {  /* halving steps: log2(VL) adds of shuffled halves, not VL dependent adds */
    T a[VL];
    memcpy(a, &x, sizeof a);
    for (int w = VL / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) a[l] += a[l + w];
    return a[0];
}

/* exp for x <= 0 (a logit minus its row's max), on whole vectors: exactly 0 far below the smallest normal number's
 * log (below it, where float on AVX-512 gives subnormals as ATen's exp does), so masked keys get zero probability as
 * in ATen's softmax; NaN stays NaN. Range reduction by ln 2 (split in a high and low part), then a polynomial on
 * |r| <= ln(2) / 2: degree 6 (about 1 ulp) in fp32, 13 (Taylor) in fp64. */
static inline vec exp_nonpos(vec x) {
#ifdef HALO_DOUBLE
    const vec lo = splat(-708.0), magic = splat(6755399441055744.0);  /* 1.5 * 2^52: adding it rounds */
    const ivec under = x < lo;
    const vec xc = vselect(under, lo, x);
    const vec n = (xc * 1.4426950408889634 + magic) - magic;
    const vec r = (xc - n * 6.93145751953125e-1) - n * 1.42860682030941723212e-6;
    vec p = splat(1.0 / 6227020800.0);  /* 1 / 13! */
    static const double inv_fact[13] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
                                        1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
                                        1.0 / 6.0, 0.5, 1.0, 1.0};
    for (int t = 0; t < 13; ++t) p = p * r + inv_fact[t];
    const ivec two_n = (__builtin_convertvector(n, ivec) + 1023) << 52;
    return vselect(under, splat(0), p * (vec)two_n);
#else
#ifdef HALO_AVX512
    /* p * 2^n below is one instruction (scalef) that rounds to 0 or a subnormal below the normal range, as exp does:
     * no underflow select. The clamp keeps the range reduction finite; exp(-120) is 0 in float. */
    const vec xc = vmax(splat(-120.0f), x);  /* vmax keeps a NaN x */
#else
    const vec lo = splat(-87.0f);
    const ivec under = x < lo;
    const vec xc = vselect(under, lo, x);
#endif
    const vec magic = splat(12582912.0f);  /* 1.5 * 2^23: adding it rounds to an integer */
    const vec n = (xc * 1.44269504088896341f + magic) - magic;
    vec r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vec p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
#ifdef HALO_AVX512
    return (vec)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
    const ivec two_n = (__builtin_convertvector(n, ivec) + 127) << 23;
    return vselect(under, splat(0), p * (vec)two_n);
#endif
#endif
}

typedef struct {
    int d, dv, Q, kh, kw, nv, rwv; /* nv: vectors per row of kh * kw keys, padded; rwv: per row of kw */
    int dvec, dvvec, qv;           /* vectors per key of d and dv channels, per row of Q queries (all padded) */
    int rows_h, rows_w, nh, nw, bq, mode; /* table rows per axis, blocks per axis, queries per block side */
    int pstride;                          /* row stride of the window's products: Q (PRODUCTS), qv * VL (TABLES) */
    T *hv, *gh;                           /* one query's rel_h terms and their gradient (kh) */
    T *qs;                                /* the window's queries times scale (d, Q) */
    vec *k, *v;                           /* channel-major padded copies: k (d, nv), v (dv, nv) */
    vec *keys_t;                          /* key-major padded copy of k (nv * VL, dvec) */
    vec *p, *ds;                          /* a block's logits / probabilities and their gradient (QB, nv) */
    vec *per_query;                       /* dq (Q, dvec) */
    vec *rw, *colsum;                     /* a rel_w row; column sums */
    ivec *in_row;                         /* lanes of rw's vectors that hold one of the kw columns */
    vec *gk, *gv;                         /* padded dk (d, nv), dv (dv, nv) */
    /* TABLES: q padded (d, qv); the window's products (rows, qv) and their gradients; q key-major (Q, dvec), dq
     * padded (d, qv), this call's table gradients (rows, dvec) */
    vec *qp, *ph, *pw, *gph, *gpw, *qt, *dqp, *gtab_h, *gtab_w;
    T *qraw, *oraw, *graw, *gqraw;        /* the window's q, out, dO and dq (d or dv, Q) */
    void *mem;
} Scratch;

/* Carves consecutive blocks of vectors out of one allocation. */
static vec *take(vec **cursor, size_t vectors) {
    vec *block = *cursor;
    *cursor += vectors;
    return block;
}

static int scratch_init(Scratch *s, const HaloArgs *a) {  /* for the backward */
    const int d = a->d, dv = a->dv, Q = a->Q, kh = a->kh, kw = a->kw;
    s->d = d; s->dv = dv; s->Q = Q; s->kh = kh; s->kw = kw;
    s->rows_h = a->rows_h; s->rows_w = a->rows_w; s->nh = a->nh; s->nw = a->nw; s->bq = a->bq;
    s->mode = a->mode;
    s->nv = (kh * kw + VL - 1) / VL;
    s->rwv = (kw + VL - 1) / VL;
    s->dvec = (d + VL - 1) / VL;
    s->dvvec = (dv + VL - 1) / VL;
    s->qv = (Q + VL - 1) / VL;
    s->pstride = s->mode == TABLES ? s->qv * VL : Q;
    const size_t nv = (size_t)s->nv, keys = nv * VL, rwv = (size_t)s->rwv;
    const size_t width = (size_t)s->dvec;  /* of keys_t and per_query */
    const size_t qv = (size_t)s->qv, rows = (size_t)(s->rows_h + s->rows_w), tables = s->mode == TABLES;
    const size_t block = (size_t)QB * nv + 1;  /* + 1: room for rel_logits' last whole-vector store */
    const size_t sizes[] = {  /* in the order taken below */
        (size_t)d * nv, (size_t)dv * nv, keys * width,                        /* k, v, keys_t */
        block, block, (size_t)Q * width,                                      /* p, ds, per_query */
        (size_t)d * nv, (size_t)dv * nv,                                      /* gk, gv */
        rwv, rwv, rwv, (size_t)(2 * kh + VL - 1) / VL,                        /* rw, colsum, in_row, hv + gh */
        ((size_t)d * Q + VL - 1) / VL,                                        /* qs */
        tables * d * qv, tables * rows * qv, tables * rows * qv,              /* qp, ph + pw, gph + gpw */
        tables * Q * s->dvec, tables * d * qv,                                /* qt, dqp */
        tables * rows * s->dvec,                                              /* gtab_h + gtab_w */
        ((size_t)d * Q + VL - 1) / VL, ((size_t)dv * Q + VL - 1) / VL,       /* qraw, oraw */
        ((size_t)dv * Q + VL - 1) / VL, ((size_t)d * Q + VL - 1) / VL,       /* graw, gqraw */
    };
    size_t vectors = 0;
    for (size_t t = 0; t < sizeof sizes / sizeof sizes[0]; ++t) vectors += sizes[t];
    s->mem = aligned_alloc(VBYTES, vectors * VBYTES);
    if (!s->mem) return 0;
    memset(s->mem, 0, vectors * VBYTES);  /* pad columns and pad channels of the copies stay 0 */
    vec *p = (vec *)s->mem;
    const size_t *z = sizes;
    s->k = take(&p, *z++);
    s->v = take(&p, *z++);
    s->keys_t = take(&p, *z++);
    s->p = take(&p, *z++);
    s->ds = take(&p, *z++);
    s->per_query = take(&p, *z++);
    s->gk = take(&p, *z++);
    s->gv = take(&p, *z++);
    s->rw = take(&p, *z++);
    s->colsum = take(&p, *z++);
    s->in_row = (ivec *)take(&p, *z++);
    s->hv = (T *)take(&p, *z++);
    s->gh = s->hv + kh;
    s->qs = (T *)take(&p, *z++);
    s->qp = take(&p, *z++);
    s->ph = take(&p, *z++);
    s->pw = s->ph + (size_t)s->rows_h * qv;
    s->gph = take(&p, *z++);
    s->gpw = s->gph + (size_t)s->rows_h * qv;
    s->qt = take(&p, *z++);
    s->dqp = take(&p, *z++);
    s->gtab_h = take(&p, *z++);
    s->gtab_w = s->gtab_h + (size_t)s->rows_h * s->dvec;
    s->qraw = (T *)take(&p, *z++);
    s->oraw = (T *)take(&p, *z++);
    s->graw = (T *)take(&p, *z++);
    s->gqraw = (T *)take(&p, *z++);
    for (int jw = 0; jw < kw; ++jw) ((I *)s->in_row)[jw] = -1;
    return 1;
}

static void scratch_free(Scratch *s) { free(s->mem); }

/* Window w's (channels, rows, cols) through layout l: load into dst[c * ldc + y * cols + x] (0 outside the image),
 * or store from there (inside the image only). */
static void window_copy(int nh, int nw, const Layout *l, int64_t w, int channels, int rows, int cols, T *map,
                        T *dst, int64_t ldc, int store) {
    const int64_t g = w / ((int64_t)nh * nw);
    const int by = (int)(w / nw % nh), bx = (int)(w % nw);
    const int y0 = by * l->step_y - l->pad_y, x0 = bx * l->step_x - l->pad_x;
    const int x_lo = x0 < 0 ? -x0 : 0, x_hi = l->width - x0 < cols ? l->width - x0 : cols;
    const int64_t origin = g * l->group + by * l->block_y + bx * l->block_x - l->pad_y * l->row - l->pad_x;
    for (int c = 0; c < channels; ++c)
        for (int y = 0; y < rows; ++y) {
            T *local = dst + c * ldc + (int64_t)y * cols;
            const int inside = y0 + y >= 0 && y0 + y < l->height && x_lo < x_hi;
            /* the first column read or written: never formed outside the map */
            const int64_t at = origin + c * l->channel + (int64_t)y * l->row + x_lo;
            if (store) {
                if (inside) memcpy(map + at, local + x_lo, sizeof(T) * (size_t)(x_hi - x_lo));
            } else if (!inside) {
                memset(local, 0, sizeof(T) * (size_t)cols);
            } else {
                memset(local, 0, sizeof(T) * (size_t)x_lo);
                memcpy(local + x_lo, map + at, sizeof(T) * (size_t)(x_hi - x_lo));
                memset(local + x_hi, 0, sizeof(T) * (size_t)(cols - x_hi));
            }
        }
}

static void window_load(int nh, int nw, const Layout *l, int64_t w, int channels, int rows, int cols,
                        const T *map, T *dst, int64_t ldc) {
    window_copy(nh, nw, l, w, channels, rows, cols, (T *)map, dst, ldc, 0);
}

/* Rows of nv vectors back to rows of kh * kw keys. */
static void unpad_rows(const Scratch *s, int channels, const vec *src, T *dst) {
    const size_t keys = (size_t)s->kh * s->kw;
    for (int c = 0; c < channels; ++c) memcpy(dst + c * keys, src + (size_t)c * s->nv, sizeof(T) * keys);
}

/* The vector width this library was built for (fused_cpu.py: 'auto' prefers the kernel from 32 bytes). */
int halo_vector_bytes(void) { return VBYTES; }

/* sizeof(HaloArgs): differs between the float and double builds, and from any other layout. */
int64_t halo_args_bytes(void) { return (int64_t)sizeof(HaloArgs); }

/* dst[j * ldd + r] = src[r * lds + j] for r < rows, j < cols. */
static void transpose(int rows, int cols, const T *src, int64_t lds, T *dst, int64_t ldd) {
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < cols; ++j) dst[j * ldd + r] = src[r * lds + j];
}

/* A padded copy (channels, nv vectors) into key-major rows (nv * VL, width vectors); their pads were zeroed once. */
static void key_major(const Scratch *s, int channels, const vec *src, vec *dst, int width) {
    transpose(channels, s->kh * s->kw, (const T *)src, (int64_t)s->nv * VL, (T *)dst, (int64_t)width * VL);
}

/* The small matrix products of a window, all one register-blocked kernel:
 *   c[r * ldc + u] (+)= sum_{t < n} a[r * ars + t * acs] * b[t * ldb + u]   for r < rows, u < cols (vectors),
 * an rb x ub block of c held in registers while t runs (each loaded b vector feeds rb FMAs, each broadcast a
 * scalar ub). rb and ub are constants where the tile() calls below are inlined. */
#if REGISTERS == 32
#define MAX_UB 4 /* 16 accumulators, 4 loaded vectors and a broadcast of 32 registers */
#else
#define MAX_UB 2 /* 8 accumulators of 16 registers */
#endif
static inline __attribute__((always_inline)) void tile(const int rb, const int ub, int n, const T *a, int64_t ars,
                                                        int64_t acs, const vec *b, int64_t ldb, vec *c, int64_t ldc,
                                                        int accumulate) {
    vec acc[8][MAX_UB];
    for (int r = 0; r < rb; ++r)
        for (int u = 0; u < ub; ++u) acc[r][u] = accumulate ? c[r * ldc + u] : splat(0);
    for (int t = 0; t < n; ++t) {
        const vec *bt = b + t * ldb;
        vec bv[MAX_UB];
        for (int u = 0; u < ub; ++u) bv[u] = bt[u];
        const T *at = a + t * acs;
        for (int r = 0; r < rb; ++r) {
            const vec ar = splat(at[r * ars]);
            for (int u = 0; u < ub; ++u) acc[r][u] += ar * bv[u];
        }
    }
    for (int r = 0; r < rb; ++r)
        for (int u = 0; u < ub; ++u) c[r * ldc + u] = acc[r][u];
}

#define TILE(RB, UB) tile(RB, UB, n, a, ars, acs, b, ldb, c, ldc, accumulate)
static void tile_any(int rb, int ub, int n, const T *a, int64_t ars, int64_t acs, const vec *b, int64_t ldb, vec *c,
                     int64_t ldc, int accumulate) {
    switch (rb * 8 + ub) {
    case 8 * 8 + 1: TILE(8, 1); break;
    case 4 * 8 + 1: TILE(4, 1); break;
    case 1 * 8 + 1: TILE(1, 1); break;
#if MAX_UB >= 2
    case 8 * 8 + 2: TILE(8, 2); break;
    case 4 * 8 + 2: TILE(4, 2); break;
    case 1 * 8 + 2: TILE(1, 2); break;
#endif
#if MAX_UB >= 4
    case 4 * 8 + 3: TILE(4, 3); break;
    case 4 * 8 + 4: TILE(4, 4); break;
    case 1 * 8 + 3: TILE(1, 3); break;
    case 1 * 8 + 4: TILE(1, 4); break;
#endif
    default: TILE(rb, ub); break; /* not reached (gemm() asks for the tiles above); correct for any rb, ub */
    }
}
#undef TILE

static void gemm(int rows, int cols, int n, const T *a, int64_t ars, int64_t acs, const vec *b, int64_t ldb, vec *c,
                 int64_t ldc, int accumulate) {
    const int rb_max = cols <= 2 && MAX_UB >= 4 ? 8 : 4;  /* narrow products: more rows per tile instead */
    for (int r0 = 0; r0 < rows;) {
        const int rb = rows - r0 >= rb_max ? rb_max : rows - r0 >= 4 ? 4 : 1;
        for (int u0 = 0; u0 < cols; u0 += MAX_UB) {
            const int ub = cols - u0 < MAX_UB ? cols - u0 : MAX_UB;
            tile_any(rb, ub, n, a + r0 * ars, ars, acs, b + u0, ldb, c + r0 * ldc + u0, ldc, accumulate);
        }
        r0 += rb;
    }
}

/* Query i of window w: its table rows (key row / column 0) and its block's masks. */
typedef struct {
    int row_h, row_w;
    const T *mask_h, *mask_w;
} RelRows;

static int rel_rows(const Scratch *s, int64_t w, int i, const int32_t *base_h, const int32_t *base_w,
                    const T *mask_h, const T *mask_w, RelRows *r) {
    const int by = (int)(w / s->nw % s->nh), bx = (int)(w % s->nw), y = i / s->bq, x = i % s->bq;
    r->row_h = base_h[by * s->bq + y];
    r->row_w = base_w[bx * s->bq + x];
    r->mask_h = mask_h + (size_t)by * s->kh;
    r->mask_w = mask_w + (size_t)bx * s->kw;
    return r->row_h >= 0 && r->row_h + s->kh <= s->rows_h && r->row_w >= 0 && r->row_w + s->kw <= s->rows_w;
}

/* Query i's relative terms, masks included: rel_h into s->hv (kh), rel_w into the padded row s->rw. ph / pw: this
 * window's products (rows, Q) of the queries with the tables (given, or computed per window in TABLES mode). */
static void rel_values(const Scratch *s, const RelRows *r, int i, const T *ph, const T *pw) {
    T *rw = (T *)s->rw;  /* its pad columns hold PAD_LOGIT */
    const size_t stride = (size_t)s->pstride;
    const T *h = ph + r->row_h * stride + i, *wp = pw + r->row_w * stride + i;
    for (int jh = 0; jh < s->kh; ++jh) s->hv[jh] = h[jh * stride] + r->mask_h[jh];
    for (int jw = 0; jw < s->kw; ++jw) rw[jw] = wp[jw * stride] + r->mask_w[jw];
}

/* The relative terms, masks included, of queries i0 .. i0 + n - 1 into the rows of s->p; 0, or 2 for a table row
 * out of range. */
static int rel_logits(const Scratch *s, int64_t w, int i0, int n, const int32_t *base_h, const int32_t *base_w,
                      const T *mask_h, const T *mask_w, const T *ph, const T *pw) {
    const int rwv = s->rwv, keys = s->kh * s->kw;
    for (int i = i0; i < i0 + n; ++i) {
        RelRows r;
        if (!rel_rows(s, w, i, base_h, base_w, mask_h, mask_w, &r)) return 2;
        rel_values(s, &r, i, ph, pw);
        /* Key row jh is the kw values from jh * kw: whole-vector stores in increasing order, each overwriting the
         * lanes past kw of the one before; the last one's spill past the row is overwritten by the next row or
         * lies in the buffer's one spare vector. */
        T *row = (T *)(s->p + (size_t)(i - i0) * s->nv);
        for (int jh = 0; jh < s->kh; ++jh) {
            const T a = s->hv[jh];
            for (int u = 0; u < rwv; ++u) {
                const vec x = s->rw[u] + a;
                memcpy(row + (size_t)jh * s->kw + (size_t)u * VL, &x, sizeof x);
            }
        }
        for (int j = keys; j < s->nv * VL; ++j) row[j] = PAD_LOGIT;
    }
    return 0;
}

/* The logits of queries i0 .. i0 + n - 1 in s->p: the relative terms plus (q * scale) . k, whose queries the
 * caller left in s->qs. */
static int block_logits(Scratch *s, int64_t w, int i0, int n, const int32_t *base_h, const int32_t *base_w,
                        const T *mask_h, const T *mask_w, const T *ph, const T *pw) {
    const int status = rel_logits(s, w, i0, n, base_h, base_w, mask_h, mask_w, ph, pw);
    if (status == 0) gemm(n, s->nv, s->d, s->qs + i0, 1, s->Q, s->k, s->nv, s->p, s->nv, 1);
    return status;
}

/* Window w's queries into s->qraw and, scaled, s->qs, its keys and values into the padded copies, and (TABLES) its
 * products with the tables; returns where the relative terms' products are. */
static void window_inputs(Scratch *s, const HaloArgs *a, int64_t w, const T **ph, const T **pw) {
    const int d = s->d, Q = s->Q, qv = s->qv, nvl = s->nv * VL;
    const T *rel_h = a->rel_h, *rel_w = a->rel_w, *qw = s->qraw;
    window_load(s->nh, s->nw, &a->lay.q, w, d, s->bq, s->bq, a->q, s->qraw, Q);
    for (int64_t x = 0; x < (int64_t)d * Q; ++x) s->qs[x] = qw[x] * a->scale;
    window_load(s->nh, s->nw, &a->lay.k, w, d, s->kh, s->kw, a->k, (T *)s->k, nvl);
    window_load(s->nh, s->nw, &a->lay.v, w, s->dv, s->kh, s->kw, a->v, (T *)s->v, nvl);
    if (s->mode == TABLES) {  /* (rows, Q) = table (rows, d) . q (d, Q) */
        for (int c = 0; c < d; ++c) memcpy(s->qp + (size_t)c * qv, qw + (size_t)c * Q, sizeof(T) * (size_t)Q);
        gemm(s->rows_h, qv, d, rel_h, d, 1, s->qp, qv, s->ph, qv, 0);
        gemm(s->rows_w, qv, d, rel_w, d, 1, s->qp, qv, s->pw, qv, 0);
        *ph = (const T *)s->ph;
        *pw = (const T *)s->pw;
    } else {
        *ph = rel_h + w * s->rows_h * Q;
        *pw = rel_w + w * s->rows_w * Q;
    }
}

/* TABLES, backward of window_inputs' products: dq (d, Q) += table^T . grad, this call's dtable (rows, d) += grad .
 * q^T; dq is s->dqp, q^T s->qt. */
static void table_products_backward(Scratch *s, int rows, const T *table, const vec *grad, vec *dtable) {
    const int qv = s->qv;
    gemm(s->d, qv, rows, table, 1, s->d, grad, qv, s->dqp, qv, 1);
    gemm(rows, s->dvec, s->Q, (const T *)grad, (int64_t)qv * VL, 1, s->qt, s->dvec, dtable, s->dvec, 1);
}

/* The forward (halo_fwd) keeps the queries across vector lanes: logits are (keys, query vectors), so the softmax runs
 * down the keys on whole vectors (no horizontal max or sum), and q . k and P v fill every lane whatever d and dv
 * are (small heads waste half a vector or more in the backward's key-major rows). Its logits are bit for bit those
 * the backward recomputes: the same terms added and multiplied in the same order. */
#define KB 8  /* keys per q . k tile: KB accumulators and one loaded query vector per channel */
#if REGISTERS == 32
#define CB 16 /* channels per P v tile */
#else
#define CB 8
#endif

typedef struct {
    int qv, ld;      /* vectors per row of Q queries; ld = qv * VL */
    vec *q, *qs;     /* the window's queries (d, qv) and times scale */
    vec *ph, *pw;    /* TABLES: the products with the tables (rows, qv) */
    T *k, *v;        /* (d, K), (dv, K) */
    vec *rh, *rw;    /* relative terms with masks per key row (kh, qv) and key column (kw, qv) */
    vec *logits;     /* one query vector's logits, then exp (K) */
    vec *out;        /* (dv, qv): unnormalised, then normalised */
    vec *stat;       /* max and 1 / sum of exp (2, qv) */
    void *mem;
} Lanes;

static int lanes_init(Lanes *s, const HaloArgs *a) {
    const size_t K = (size_t)a->kh * a->kw, qv = (size_t)(a->Q + VL - 1) / VL, tables = a->mode == TABLES;
    const size_t sizes[] = {(size_t)a->d * qv, (size_t)a->d * qv, tables * (size_t)(a->rows_h + a->rows_w) * qv,
                            ((size_t)a->d * K + VL - 1) / VL, ((size_t)a->dv * K + VL - 1) / VL,
                            (size_t)(a->kh + a->kw) * qv, K, (size_t)a->dv * qv, 2 * qv};
    size_t vectors = 0;
    for (size_t t = 0; t < sizeof sizes / sizeof sizes[0]; ++t) vectors += sizes[t];
    s->mem = aligned_alloc(VBYTES, vectors * VBYTES);
    if (!s->mem) return 0;
    memset(s->mem, 0, vectors * VBYTES);  /* pad lanes (queries past Q) stay 0 */
    vec *p = (vec *)s->mem;
    const size_t *z = sizes;
    s->qv = (int)qv;
    s->ld = (int)qv * VL;
    s->q = take(&p, *z++);
    s->qs = take(&p, *z++);
    s->ph = take(&p, *z++);
    s->pw = s->ph + (size_t)a->rows_h * qv;
    s->k = (T *)take(&p, *z++);
    s->v = (T *)take(&p, *z++);
    s->rh = take(&p, *z++);
    s->rw = s->rh + (size_t)a->kh * qv;
    s->logits = take(&p, *z++);
    s->out = take(&p, *z++);
    s->stat = take(&p, *z++);
    return 1;
}

/* dst[r * ld + i] = src[(base[t] + r) * stride + i] + mask[r] for r < n and queries i = (y, x) < Q, where t is y
 * (rows) or x (columns): one axis' relative terms of every query; 0, or 2 for a table row out of range. */
static int lanes_rel(const HaloArgs *a, int rows_axis, int n, int rows, const int32_t *base, const T *src,
                     int64_t stride, const T *mask, T *dst, int ld) {
    const int bq = a->bq;
    for (int t = 0; t < bq; ++t)
        if (base[t] < 0 || base[t] + n > rows) return 2;
    for (int r = 0; r < n; ++r)
        for (int t = 0; t < bq; ++t) {  /* query row t (rows_axis): bq queries in a row; else column t */
            const int64_t step = rows_axis ? 1 : bq, first = rows_axis ? (int64_t)t * bq : t;
            const T *from = src + (base[t] + r) * stride + first;
            T *to = dst + (size_t)r * ld + first;
            for (int64_t e = 0; e < bq; ++e) to[e * step] = from[e * step] + mask[r];
        }
    return 0;
}

/* logits[j] += sum_c qs[c] * k[c, j] for keys j0 .. j0 + kb - 1, one query vector (qs: stride qv) */
static inline __attribute__((always_inline)) void lanes_qk(const int kb, int d, const vec *qs, int qv, const T *k,
                                                           int64_t K, vec *logits, vec *max) {
    vec acc[KB];
    for (int r = 0; r < kb; ++r) acc[r] = logits[r];
    for (int c = 0; c < d; ++c) {
        const vec qc = qs[(size_t)c * qv];
        for (int r = 0; r < kb; ++r) acc[r] += qc * splat(k[c * K + r]);
    }
    vec m = acc[0];
    for (int r = 0; r < kb; ++r) {
        logits[r] = acc[r];
        m = vmax(m, acc[r]);
    }
    *max = vmax(*max, m);
}

/* out[c] = sum_j p[j] * v[c, j] for channels c < cb, one query vector (out: stride qv) */
static inline __attribute__((always_inline)) void lanes_pv(const int cb, int64_t K, const vec *p, const T *v,
                                                           vec *out, int qv) {
    vec acc[CB];
    for (int c = 0; c < cb; ++c) acc[c] = splat(0);
    for (int64_t j = 0; j < K; ++j)
        for (int c = 0; c < cb; ++c) acc[c] += p[j] * splat(v[c * K + j]);
    for (int c = 0; c < cb; ++c) out[(size_t)c * qv] = acc[c];
}

int halo_fwd(const HaloArgs *a, int64_t start, int64_t stop) {
    Lanes s;
    if (!lanes_init(&s, a)) return 1;
    const int d = a->d, dv = a->dv, Q = a->Q, kh = a->kh, kw = a->kw, bq = a->bq, nh = a->nh, nw = a->nw;
    const int qv = s.qv, ld = s.ld;
    const int64_t K = (int64_t)kh * kw;
    int status = 0;
    for (int64_t w = start; w < stop && !status; ++w) {
        const int by = (int)(w / nw % nh), bx = (int)(w % nw);
        window_load(nh, nw, &a->lay.q, w, d, bq, bq, a->q, (T *)s.q, ld);
        for (int x = 0; x < d * qv; ++x) s.qs[x] = s.q[x] * a->scale;
        window_load(nh, nw, &a->lay.k, w, d, kh, kw, a->k, s.k, K);
        window_load(nh, nw, &a->lay.v, w, dv, kh, kw, a->v, s.v, K);
        const T *ph = a->rel_h + w * a->rows_h * Q, *pw = a->rel_w + w * a->rows_w * Q;
        int64_t stride = Q;
        if (a->mode == TABLES) {  /* (rows, qv) = table (rows, d) . q (d, qv) */
            gemm(a->rows_h, qv, d, a->rel_h, d, 1, s.q, qv, s.ph, qv, 0);
            gemm(a->rows_w, qv, d, a->rel_w, d, 1, s.q, qv, s.pw, qv, 0);
            ph = (const T *)s.ph;
            pw = (const T *)s.pw;
            stride = ld;
        }
        status = lanes_rel(a, 1, kh, a->rows_h, a->base_h + (size_t)by * bq, ph, stride, a->mask_h + (size_t)by * kh,
                           (T *)s.rh, ld);
        if (!status)
            status = lanes_rel(a, 0, kw, a->rows_w, a->base_w + (size_t)bx * bq, pw, stride,
                               a->mask_w + (size_t)bx * kw, (T *)s.rw, ld);
        if (status) break;
        for (int u = 0; u < qv; ++u) {
            vec *l = s.logits;
            for (int jh = 0; jh < kh; ++jh)
                for (int jw = 0; jw < kw; ++jw) l[jh * kw + jw] = s.rw[jw * qv + u] + s.rh[jh * qv + u];
            int64_t j = 0;
            vec m = splat(-INFINITY);  /* a NaN logit may be skipped by the max; it makes its query's sum NaN */
            for (; j + KB <= K; j += KB) lanes_qk(KB, d, s.qs + u, qv, s.k + j, K, l + j, &m);
            for (; j < K; ++j) lanes_qk(1, d, s.qs + u, qv, s.k + j, K, l + j, &m);
            vec sum = {0};
            for (j = 0; j < K; ++j) {
                l[j] = exp_nonpos(l[j] - m);
                sum += l[j];
            }
            for (int c = 0, cb; c < dv; c += cb) {  /* the widest tile that fits: independent accumulators */
                cb = dv - c >= CB ? CB : dv - c >= 8 ? 8 : dv - c >= 4 ? 4 : 1;
                vec *o = s.out + (size_t)c * qv + u;
                if (cb == CB) lanes_pv(CB, K, l, s.v + c * K, o, qv);
                else if (cb == 8) lanes_pv(8, K, l, s.v + c * K, o, qv);
                else if (cb == 4) lanes_pv(4, K, l, s.v + c * K, o, qv);
                else lanes_pv(1, K, l, s.v + c * K, o, qv);
            }
            const vec inv = splat(1) / sum;
            for (int c = 0; c < dv; ++c) s.out[(size_t)c * qv + u] *= inv;
            s.stat[u] = m;
            s.stat[qv + u] = inv;
        }
        T *lw = a->stats + w * Q * 2;
        const T *stat = (const T *)s.stat;
        for (int i = 0; i < Q; ++i) {
            lw[2 * i] = stat[i];
            lw[2 * i + 1] = stat[ld + i];
        }
        window_copy(nh, nw, &a->lay.out, w, dv, bq, bq, a->out, (T *)s.out, ld, 1);
    }
    free(s.mem);
    return status;
}

/* grad_rel_h / grad_rel_w: PRODUCTS: (n, rows, Q) like rel_h / rel_w; TABLES: (calls, rows, d), one accumulator
 * per call (concurrent calls never share one; the caller sums them). */
int halo_bwd(const HaloArgs *a, int64_t start, int64_t stop) {
    const T scale = a->scale, *rel_h = a->rel_h, *rel_w = a->rel_w;
    const T *mask_h = a->mask_h, *mask_w = a->mask_w, *stats = a->stats;
    const int32_t *base_h = a->base_h, *base_w = a->base_w;
    T *grad_k = a->grad_k, *grad_v = a->grad_v;
    T *grad_rel_h = a->grad_rel_h, *grad_rel_w = a->grad_rel_w;
    if (a->mode == TABLES) {
        if (a->calls_stride < 1) return 3;
        const int64_t call = start / a->calls_stride;
        grad_rel_h += call * a->rows_h * a->d;
        grad_rel_w += call * a->rows_w * a->d;
    }
    Scratch s;
    if (!scratch_init(&s, a)) return 1;
    const int d = s.d, dv = s.dv, Q = s.Q, kh = s.kh, kw = s.kw, keys = s.nv * VL, width = s.dvec;
    const int64_t K = (int64_t)kh * kw;
    const int nv = s.nv, rwv = s.rwv, stride = s.pstride;
    for (int64_t w = start; w < stop; ++w) {
        const T *qw = s.qraw, *ph, *pw;
        const T *ow = s.oraw, *lw = stats + w * Q * 2, *gw = s.graw;
        T *gq = s.gqraw;
        T *gph = grad_rel_h + w * s.rows_h * Q, *gpw = grad_rel_w + w * s.rows_w * Q;
        window_inputs(&s, a, w, &ph, &pw);
        window_load(s.nh, s.nw, &a->lay.out, w, dv, s.bq, s.bq, a->out, s.oraw, Q);
        window_load(s.nh, s.nw, &a->lay.out, w, dv, s.bq, s.bq, a->grad_out, s.graw, Q);
        if (s.mode == TABLES) {
            gph = (T *)s.gph;
            gpw = (T *)s.gpw;
        }
        memset(gph, 0, sizeof(T) * (size_t)s.rows_h * stride);  /* rows no query reads get 0 */
        memset(gpw, 0, sizeof(T) * (size_t)s.rows_w * stride);
        key_major(&s, d, s.k, s.keys_t, width);
        for (int i0 = 0; i0 < Q; i0 += QB) {
            const int n = Q - i0 < QB ? Q - i0 : QB;
            if (block_logits(&s, w, i0, n, base_h, base_w, mask_h, mask_w, ph, pw)) {
                scratch_free(&s);
                return 2;
            }
            gemm(n, nv, dv, gw + i0, 1, Q, s.v, nv, s.ds, nv, 0);  /* dP = dO . v */
            for (int t = 0; t < n; ++t) {
                const int i = i0 + t;
                vec *row = s.p + (size_t)t * nv, *dp = s.ds + (size_t)t * nv;
                T delta = 0;  /* rowsum(dP * P) == dO . O per query (the flash-attention identity) */
                for (int c = 0; c < dv; ++c) delta += gw[(size_t)c * Q + i] * ow[(size_t)c * Q + i];
                const T m = lw[2 * i], inv_sum = lw[2 * i + 1];
                for (int j = 0; j < nv; ++j) {
                    row[j] = exp_nonpos(row[j] - m) * inv_sum;
                    dp[j] = row[j] * (dp[j] - delta);  /* now the logits' gradient */
                }
                /* per-axis sums of the logits' gradient: rel_h over each key row, rel_w over each key column */
                RelRows r;
                rel_rows(&s, w, i, base_h, base_w, mask_h, mask_w, &r);  /* in range: block_logits checked */
                vec *colsum = s.colsum;
                for (int u = 0; u < rwv; ++u) colsum[u] = splat(0);
                for (int jh = 0; jh < kh; ++jh) {  /* key row jh: the kw values from jh * kw (see rel_logits) */
                    vec acc = {0};
                    for (int u = 0; u < rwv; ++u) {
                        vec x;
                        memcpy(&x, (const T *)dp + (size_t)jh * kw + (size_t)u * VL, sizeof x);
                        x = vselect(s.in_row[u], x, splat(0));
                        acc += x;
                        colsum[u] += x;
                    }
                    s.gh[jh] = hsum(acc);
                }
                const T *gcol = (const T *)colsum;
                T *gh_i = gph + (size_t)r.row_h * stride + i, *gw_i = gpw + (size_t)r.row_w * stride + i;
                for (int jh = 0; jh < kh; ++jh) gh_i[(size_t)jh * stride] = s.gh[jh];
                for (int jw = 0; jw < kw; ++jw) gw_i[(size_t)jw * stride] = gcol[jw];
            }
            gemm(n, width, keys, (const T *)s.ds, keys, 1, s.keys_t, width, s.per_query + (size_t)i0 * width, width,
                 0);                                                   /* dq = dS . k */
            gemm(dv, nv, n, gw + i0, Q, 1, s.p, nv, s.gv, nv, i0 > 0);    /* dv = dO . P */
            gemm(d, nv, n, s.qs + i0, Q, 1, s.ds, nv, s.gk, nv, i0 > 0);  /* dk = (q * scale) . dS */
        }
        for (int x = 0; x < Q * width; ++x) s.per_query[x] *= scale;
        if (s.mode == TABLES) {  /* dq and the table gradients through the window's products, padded */
            transpose(Q, d, (const T *)s.per_query, (int64_t)width * VL, (T *)s.dqp, (int64_t)s.qv * VL);
            transpose(d, Q, qw, Q, (T *)s.qt, (int64_t)width * VL);
            table_products_backward(&s, s.rows_h, rel_h, s.gph, s.gtab_h);
            table_products_backward(&s, s.rows_w, rel_w, s.gpw, s.gtab_w);
            for (int c = 0; c < d; ++c)
                for (int i = 0; i < Q; ++i) gq[(size_t)c * Q + i] = ((const T *)s.dqp)[(size_t)c * s.qv * VL + i];
        } else {
            transpose(Q, d, (const T *)s.per_query, (int64_t)width * VL, gq, Q);
        }
        window_copy(s.nh, s.nw, &a->lay.q, w, d, s.bq, s.bq, a->grad_q, gq, Q, 1);
        unpad_rows(&s, d, s.gk, grad_k + w * d * K);
        unpad_rows(&s, dv, s.gv, grad_v + w * dv * K);
    }
    if (s.mode == TABLES) {  /* this call's table gradients, unpadded */
        const size_t bytes = sizeof(T) * (size_t)d;
        for (int r = 0; r < s.rows_h; ++r) memcpy(grad_rel_h + (size_t)r * d, s.gtab_h + (size_t)r * width, bytes);
        for (int r = 0; r < s.rows_w; ++r) memcpy(grad_rel_w + (size_t)r * d, s.gtab_w + (size_t)r * width, bytes);
    }
    scratch_free(&s);
    return 0;
}

/* All ranges of chunk windows on the caller's OpenMP team: the library is linked against PyTorch's own OpenMP
 * runtime (fused_cpu.py), so these are ATen's threads, hot from the op before (its threads spin a while after each
 * parallel region, and a pool of our own would compete with them for the cores). Returns the first error. */
static int run_ranges(int (*fn)(const HaloArgs *, int64_t, int64_t), const HaloArgs *a, int64_t n, int64_t chunk,
                      int threads) {
    int status = 0;
    const int64_t ranges = (n + chunk - 1) / chunk;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
    for (int64_t r = 0; r < ranges; ++r) {
        int seen;
#ifdef _OPENMP
#pragma omp atomic read
#endif
        seen = status;
        if (seen) continue; /* an error: no new range starts */
        const int got = fn(a, r * chunk, (r + 1) * chunk < n ? (r + 1) * chunk : n);
        if (got) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            status = got;
        }
    }
    (void)threads;
    return status;
}

int halo_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int halo_fwd_all(const HaloArgs *a, int64_t n, int64_t chunk, int threads) {
    return run_ranges(halo_fwd, a, n, chunk, threads);
}

int halo_bwd_all(const HaloArgs *a, int64_t n, int64_t chunk, int threads) {
    return run_ranges(halo_bwd, a, n, chunk, threads);
}
