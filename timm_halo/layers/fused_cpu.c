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
 * has a scalar tail and nothing depends on the auto-vectoriser. Per window, with the queries across vector lanes
 * (logits (K, Q)): forward, logits = relative terms + k^T (scale q), softmax down the keys, out = v P^T (halo_fwd);
 * backward (halo_bwd), the same logits, P recomputed from the forward's per-query max and 1 / sum of exp (stats:
 * flash-attention style), dP = v^T dO, dS = P (dP - colsum(dO O)), dq = scale k dS, then dk = (scale q) dS^T and
 * dv = dO P^T as register-blocked products over the queries (gemm), added into grad_k / grad_v.
 * Functions return 0, 1 when out of memory, 2 when a table row lies outside its table, 3 for operands that do
 * not fit together (2 and 3: a caller's bug).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef HALO_DOUBLE
typedef double T;
typedef int64_t I;
#else
typedef float T;
typedef int32_t I;
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
typedef T vec __attribute__((vector_size(VBYTES)));
#if defined(__AVX512F__) && VBYTES == 64
#include <immintrin.h>
#define HALO_AVX512 /* 64-byte vectors on AVX-512: max and scalef instructions */
#elif defined(__AVX2__) && VBYTES == 32
#include <immintrin.h>
#define HALO_AVX2
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

/* The layouts (mirrored by fused_cpu.py's Layouts): grad_q is laid out as q, grad_out as out, grad_k as k and grad_v
 * as v. The backward adds to grad_k / grad_v (the caller zeroes them); where windows overlap (key windows cut out of
 * maps), every range of windows must cover whole groups (calls_stride a multiple of nh * nw), so that concurrent
 * ranges never add to the same element. */
typedef struct {
    Layout q, k, v, out;
} Layouts;
/* One call's operands, named (mirrored field by field by fused_cpu.py's HaloArgs; halo_args_bytes lets the caller
 * check the layout). Backward reads out and stats and writes the grad_* fields; forward writes out and stats. */
typedef struct {
    int32_t d, dv, Q, kh, kw;       /* channels of q / k and of v, queries and key rows / columns per window */
    int32_t rows_h, rows_w;         /* rows of the two relative sources (tables, or per-window products) */
    int32_t nh, nw, bq, mode;       /* blocks per axis, queries per block side, PRODUCTS or TABLES */
    int64_t calls_stride;           /* backward: windows per call (calls start at its multiples); TABLES: call
                                     * start / calls_stride picks the call's own (rows, d) slice of grad_rel_h /
                                     * grad_rel_w */
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

/* Carves consecutive blocks of vectors out of one allocation. */
static vec *take(vec **cursor, size_t vectors) {
    vec *block = *cursor;
    *cursor += vectors;
    return block;
}

/* Window w's (channels, rows, cols) through layout l: load into dst[c * ldc + y * cols + x] (0 outside the image),
 * or store or add from there (inside the image only). */
enum { LOAD = 0, STORE = 1, ADD = 2 };
#if defined(HALO_AVX512) || defined(HALO_AVX2)
#define HALO_VECTOR_ROWS
/* A window row (14 keys at block 8, halo 3) moves as one or two vectors: a masked load reads only the image's
 * columns (others are 0, and never read, so never fault), with no branch and no memcpy / memset call per row (those
 * calls took a sixth of a stage-1 layer). AVX-512 also stores and adds through masks. Masked AVX2 stores are slow on
 * AMD CPUs (7.05 against 6.65 ms for a stage-1 layer): AVX2 loads only, and stores each loaded vector whole, so a
 * row's last store runs up to VL - 1 elements past it, writing zeros (masked lanes) that the next row overwrites or
 * that land in a buffer's zero padding or its vector of slack (lanes_init); its stores and adds stay scalar. */
#define MAX_ROW_VECS 8 /* rows of more vectors (128 floats on AVX-512, 64 on AVX2) take the scalar copies */
#if defined(HALO_AVX512) && defined(HALO_DOUBLE)
typedef __mmask8 lane_mask;
#define MASKZ_LOAD(m, p) ((vec)_mm512_maskz_loadu_pd((m), (p)))
#define MASK_STORE(p, m, v) _mm512_mask_storeu_pd((p), (m), (__m512d)(v))
#elif defined(HALO_AVX512)
typedef __mmask16 lane_mask;
#define MASKZ_LOAD(m, p) ((vec)_mm512_maskz_loadu_ps((m), (p)))
#define MASK_STORE(p, m, v) _mm512_mask_storeu_ps((p), (m), (__m512)(v))
#elif defined(HALO_DOUBLE)
typedef ivec lane_mask; /* AVX2: a lane's sign bit */
#define MASKZ_LOAD(m, p) ((vec)_mm256_maskload_pd((p), (__m256i)(m)))
#define STORE_WHOLE(p, v) _mm256_storeu_pd((p), (__m256d)(v))
#else
typedef ivec lane_mask;
#define MASKZ_LOAD(m, p) ((vec)_mm256_maskload_ps((p), (__m256i)(m)))
#define STORE_WHOLE(p, v) _mm256_storeu_ps((p), (__m256)(v))
#endif
/* lanes lo .. hi - 1, clipped to 0 .. VL - 1 */
static inline lane_mask lanes_between(int lo, int hi) {
#ifdef HALO_AVX512
    lo = lo < 0 ? 0 : lo;
    hi = hi > VL ? VL : hi;
    return lo >= hi ? 0 : (lane_mask)((((uint32_t)1 << hi) - 1) & ~(((uint32_t)1 << lo) - 1));
#else
    ivec lane;
    for (int i = 0; i < VL; ++i) lane[i] = i;
    return (lane >= lo) & (lane < hi);
#endif
}

/* window_copy's rows as vectors; 0 where it cannot (rows too wide, or an AVX2 store or add) */
static int window_copy_vectors(const Layout *l, int64_t origin, int y0, int x_lo, int x_hi, int channels, int rows,
                               int cols, T *map, T *dst, int64_t ldc, int mode) {
    const int vecs = (cols + VL - 1) / VL;
#ifdef HALO_AVX2
    if (mode != LOAD) return 0;
#endif
    if (vecs > MAX_ROW_VECS) return 0;
    const lane_mask none = {0};
    lane_mask inside[MAX_ROW_VECS], whole[MAX_ROW_VECS];  /* per vector of a row: the image's columns, all columns */
    for (int u = 0; u < vecs; ++u) {
        inside[u] = x_lo < x_hi ? lanes_between(x_lo - u * VL, x_hi - u * VL) : none;
        whole[u] = lanes_between(0, cols - u * VL);
    }
    (void)whole;
    const int y_lo = y0 < 0 ? -y0 : 0, y_hi = l->height - y0 < rows ? l->height - y0 : rows;
    for (int c = 0; c < channels; ++c)
        for (int y = 0; y < rows; ++y) {
            T *local = dst + c * ldc + (int64_t)y * cols;
            const int row_inside = y >= y_lo && y < y_hi;
            /* column x at map + row0 + x; column 0's address is formed in integers (it may lie outside the map) */
            const int64_t row0 = origin + c * l->channel + (int64_t)y * l->row;
            T *at = (T *)((uintptr_t)map + (uintptr_t)(row0 * (int64_t)sizeof(T)));
            for (int u = 0; u < vecs; ++u, at += VL) {
                const lane_mask valid = row_inside ? inside[u] : none;
#ifdef HALO_AVX512
                if (mode == LOAD)
                    MASK_STORE(local + u * VL, whole[u], MASKZ_LOAD(valid, at));
                else if (mode == STORE)
                    MASK_STORE(at, valid, MASKZ_LOAD(valid, local + u * VL));
                else
                    MASK_STORE(at, valid, MASKZ_LOAD(valid, at) + MASKZ_LOAD(valid, local + u * VL));
#else
                STORE_WHOLE(local + u * VL, MASKZ_LOAD(valid, at));
#endif
            }
        }
    return 1;
}
#endif

static void window_copy(int nh, int nw, const Layout *l, int64_t w, int channels, int rows, int cols, T *map,
                        T *dst, int64_t ldc, int mode) {
    const int64_t g = w / ((int64_t)nh * nw);
    const int by = (int)(w / nw % nh), bx = (int)(w % nw);
    const int y0 = by * l->step_y - l->pad_y, x0 = bx * l->step_x - l->pad_x;
    const int x_lo = x0 < 0 ? -x0 : 0, x_hi = l->width - x0 < cols ? l->width - x0 : cols;
    const int64_t origin = g * l->group + by * l->block_y + bx * l->block_x - l->pad_y * l->row - l->pad_x;
#ifdef HALO_VECTOR_ROWS
    if (window_copy_vectors(l, origin, y0, x_lo, x_hi, channels, rows, cols, map, dst, ldc, mode)) return;
#endif
    for (int c = 0; c < channels; ++c)
        for (int y = 0; y < rows; ++y) {
            T *local = dst + c * ldc + (int64_t)y * cols;
            const int inside = y0 + y >= 0 && y0 + y < l->height && x_lo < x_hi;
            /* the first column read or written: never formed outside the map */
            const int64_t at = origin + c * l->channel + (int64_t)y * l->row + x_lo;
            if (mode == ADD) {
                if (inside)
                    for (int x = x_lo; x < x_hi; ++x) map[at + x - x_lo] += local[x];
            } else if (mode == STORE) {
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
    window_copy(nh, nw, l, w, channels, rows, cols, (T *)map, dst, ldc, LOAD);
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

/* Forward and backward keep a window's queries across vector lanes: logits are (keys, query vectors), so the softmax
 * runs down the keys on whole vectors (no horizontal max or sum), and the products over channels fill every lane
 * whatever d and dv are (rows of d channels per key would fill half an AVX-512 vector at d = 8). Both build the
 * logits with lanes_logits, so the backward's are bit for bit the forward's. */
#define KB 8  /* keys per q . k tile: KB accumulators and one loaded query vector per channel */
#if REGISTERS == 32
#define CB 16 /* channels per P v tile */
#else
#define CB 8
#endif

typedef struct {
    int qv, ld, dvec, dvvec; /* vectors per row of Q queries (ld = qv * VL), per key of d and dv channels */
    vec *q, *qs;     /* the window's queries (d, qv) and times scale */
    vec *ph, *pw;    /* TABLES: the products with the tables (rows, qv) */
    T *k, *v;        /* (d, K), (dv, K) */
    vec *rh, *rw;    /* relative terms with masks per key row (kh, qv) and key column (kw, qv) */
    vec *logits;     /* one query vector's logits, then exp (fwd) or dP, then dS (bwd) (K) */
    vec *out;        /* (dv, qv): unnormalised, then normalised (fwd); O (bwd) */
    vec *stat;       /* max and 1 / sum of exp (2, qv) */
    /* the window's visible keys: rows jh .. jh + kh - 1 and columns jw .. jw + kw - 1 of its kh x kw, where both
     * masks are 0 (lanes_window); k, v and the relative terms hold only these, read through k_lay and v_lay */
    int kh, kw, jh, jw;
    Layout k_lay, v_lay;
    /* backward: dO (dv, qv); P and dS (K, qv); the relative terms' gradients (kh + kw, qv); dq (d, qv);
     * key-major q, scale q (Q, dvec) and dO (Q, dvvec); dk (K, dvec), dv (K, dvvec); TABLES: the products'
     * gradients (rows, qv) and this call's table gradients (rows, dvec) */
    vec *go, *pall, *sall, *grh, *grw, *gq, *qt, *qst, *got, *gkt, *gvt, *gph, *gpw, *gtab_h, *gtab_w;
    void *mem;
} Lanes;

static int lanes_init(Lanes *s, const HaloArgs *a, int bwd) {
    const size_t K = (size_t)a->kh * a->kw, qv = (size_t)(a->Q + VL - 1) / VL, tables = a->mode == TABLES;
    const size_t Q = (size_t)qv * VL, rows = (size_t)(a->rows_h + a->rows_w);
    const size_t dvec = (size_t)(a->d + VL - 1) / VL, dvvec = (size_t)(a->dv + VL - 1) / VL;
    /* + 1: a vector of slack after each buffer windows are loaded into (window_copy_vectors) */
    const size_t sizes[] = {(size_t)a->d * qv + 1, (size_t)a->d * qv, tables * rows * qv,         /* q, qs, ph + pw */
                            ((size_t)a->d * K + VL - 1) / VL + 1, ((size_t)a->dv * K + VL - 1) / VL + 1, /* k, v */
                            (size_t)(a->kh + a->kw) * qv, K, (size_t)a->dv * qv + 1, 2 * qv,    /* rh + rw ... */
                            bwd * (a->dv * qv + 1), bwd * K * qv, bwd * K * qv,                       /* go, pall, sall */
                            bwd * (a->kh + a->kw) * qv, bwd * a->d * qv,                        /* grh + grw, gq */
                            bwd * Q * dvec, bwd * Q * dvec, bwd * Q * dvvec,                    /* qt, qst, got */
                            bwd * K * dvec, bwd * K * dvvec,                                    /* gkt, gvt */
                            bwd * tables * rows * qv, bwd * tables * rows * dvec};              /* gph.., gtab.. */
    size_t vectors = 0;
    for (size_t t = 0; t < sizeof sizes / sizeof sizes[0]; ++t) vectors += sizes[t];
    s->mem = aligned_alloc(VBYTES, vectors * VBYTES);
    if (!s->mem) return 0;
    memset(s->mem, 0, vectors * VBYTES);  /* pad lanes (queries past Q) and pad channels stay 0 */
    vec *p = (vec *)s->mem;
    const size_t *z = sizes;
    s->qv = (int)qv;
    s->ld = (int)Q;
    s->dvec = (int)dvec;
    s->dvvec = (int)dvvec;
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
    s->go = take(&p, *z++);
    s->pall = take(&p, *z++);
    s->sall = take(&p, *z++);
    s->grh = take(&p, *z++);
    s->grw = s->grh + (size_t)a->kh * qv;
    s->gq = take(&p, *z++);
    s->qt = take(&p, *z++);
    s->qst = take(&p, *z++);
    s->got = take(&p, *z++);
    s->gkt = take(&p, *z++);
    s->gvt = take(&p, *z++);
    s->gph = take(&p, *z++);
    s->gpw = s->gph + (size_t)a->rows_h * qv;
    s->gtab_h = take(&p, *z++);
    s->gtab_w = s->gtab_h + (size_t)a->rows_h * dvec;
    return 1;
}

/* dst[r * ld + i] = src[(base[t] + first + r) * stride + i] + mask[r] for r < n and queries i = (y, x) < Q, where t
 * is y (rows) or x (columns): one axis' relative terms of every query, for key rows / columns first .. first + n - 1;
 * 0, or 2 for a table row out of range. With grad, the reverse (no mask): src[(base[t] + first + r) * stride + i] =
 * dst[r * ld + i], each element written once. */
static int lanes_rel(const HaloArgs *a, int rows_axis, int first, int n, int rows, const int32_t *base, T *src,
                     int64_t stride, const T *mask, T *dst, int ld, int grad) {
    const int bq = a->bq;
    for (int t = 0; t < bq; ++t)
        if (base[t] + first < 0 || base[t] + first + n > rows) return 2;
    for (int r = 0; r < n; ++r)
        for (int t = 0; t < bq; ++t) {  /* query row t (rows_axis): bq queries in a row; else column t */
            const int64_t step = rows_axis ? 1 : bq, at = rows_axis ? (int64_t)t * bq : t;
            T *from = src + (base[t] + first + r) * stride + at, *to = dst + (size_t)r * ld + at;
            for (int64_t e = 0; e < bq; ++e) {
                if (grad) from[e * step] = to[e * step];
                else to[e * step] = from[e * step] + mask[r];
            }
        }
    return 0;
}

/* logits[r] += sum_c x[c] * k[c, r] for keys r < kb, one query vector (x: stride qv), and the running max */
static inline __attribute__((always_inline)) void lanes_qk(const int kb, int d, const vec *x, int qv, const T *k,
                                                           int64_t K, vec *logits, vec *max) {
    vec acc[KB];
    for (int r = 0; r < kb; ++r) acc[r] = logits[r];
    for (int c = 0; c < d; ++c) {
        const vec xc = x[(size_t)c * qv];
        for (int r = 0; r < kb; ++r) acc[r] += xc * splat(k[c * K + r]);
    }
    vec m = acc[0];
    for (int r = 0; r < kb; ++r) {
        logits[r] = acc[r];
        m = vmax(m, acc[r]);
    }
    if (max) *max = vmax(*max, m);
}

/* logits[j] += sum_c x[c] * k[c, j] for all K keys (max: NULL, or the running max) */
static void lanes_qk_all(int d, const vec *x, int qv, const T *k, int64_t K, vec *logits, vec *max) {
    int64_t j = 0;
    for (; j + KB <= K; j += KB) lanes_qk(KB, d, x, qv, k + j, K, logits + j, max);
    for (; j < K; ++j) lanes_qk(1, d, x, qv, k + j, K, logits + j, max);
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

/* out[c] = sum_j p[j] * v[c, j] for all channels c < dv, in the widest tiles that fit (independent accumulators) */
static void lanes_pv_all(int dv, int64_t K, const vec *p, const T *v, vec *out, int qv) {
    for (int c = 0, cb; c < dv; c += cb) {
        cb = dv - c >= CB ? CB : dv - c >= 8 ? 8 : dv - c >= 4 ? 4 : 1;
        vec *o = out + (size_t)c * qv;
        if (cb == CB) lanes_pv(CB, K, p, v + c * K, o, qv);
        else if (cb == 8) lanes_pv(8, K, p, v + c * K, o, qv);
        else if (cb == 4) lanes_pv(4, K, p, v + c * K, o, qv);
        else lanes_pv(1, K, p, v + c * K, o, qv);
    }
}

/* The one run of 0s in mask[0 .. n - 1] (*first, *count): the visible key rows or columns of a window; all n where
 * the 0s are not one run or there are none. */
static void visible_run(const T *mask, int n, int *first, int *count) {
    int lo = 0, hi = n;
    while (lo < hi && mask[lo] != 0) ++lo;
    while (hi > lo && mask[hi - 1] != 0) --hi;
    for (int j = lo; j < hi; ++j)
        if (mask[j] != 0) lo = hi;
    if (lo == hi) lo = 0, hi = n;
    *first = lo;
    *count = hi - lo;
}

/* l, its windows moved by (dy, dx) */
static Layout layout_moved(const Layout *l, int dy, int dx) {
    Layout moved = *l;
    moved.pad_y -= dy;
    moved.pad_x -= dx;
    return moved;
}

/* Window w's queries (and times scale), visible keys and values, and their per-axis relative terms; 0, or 2 for a
 * table row out of range. PRODUCTS: the per-window products' rows and stride into *ph / *pw / *stride. Keys either
 * mask hides get exp(logit - max) == 0 exactly: leaving them out (at the image's border: a third of a 14 x 14
 * window at 16 x 16, two thirds at 8 x 8) changes no sum. */
static int lanes_window(Lanes *s, const HaloArgs *a, int64_t w, T **ph, T **pw, int64_t *stride) {
    const int d = a->d, bq = a->bq, nh = a->nh, nw = a->nw, qv = s->qv, ld = s->ld;
    const int by = (int)(w / nw % nh), bx = (int)(w % nw);
    const T *mask_h = a->mask_h + (size_t)by * a->kh, *mask_w = a->mask_w + (size_t)bx * a->kw;
    visible_run(mask_h, a->kh, &s->jh, &s->kh);
    visible_run(mask_w, a->kw, &s->jw, &s->kw);
    const int kh = s->kh, kw = s->kw;
    const int64_t K = (int64_t)kh * kw;
    s->k_lay = layout_moved(&a->lay.k, s->jh, s->jw);
    s->v_lay = layout_moved(&a->lay.v, s->jh, s->jw);
    window_load(nh, nw, &a->lay.q, w, d, bq, bq, a->q, (T *)s->q, ld);
    for (int x = 0; x < d * qv; ++x) s->qs[x] = s->q[x] * a->scale;
    window_load(nh, nw, &s->k_lay, w, d, kh, kw, a->k, s->k, K);
    window_load(nh, nw, &s->v_lay, w, a->dv, kh, kw, a->v, s->v, K);
    *ph = (T *)a->rel_h + w * a->rows_h * a->Q;
    *pw = (T *)a->rel_w + w * a->rows_w * a->Q;
    *stride = a->Q;
    if (a->mode == TABLES) {  /* (rows, qv) = table (rows, d) . q (d, qv) */
        gemm(a->rows_h, qv, d, a->rel_h, d, 1, s->q, qv, s->ph, qv, 0);
        gemm(a->rows_w, qv, d, a->rel_w, d, 1, s->q, qv, s->pw, qv, 0);
        *ph = (T *)s->ph;
        *pw = (T *)s->pw;
        *stride = ld;
    }
    const int status = lanes_rel(a, 1, s->jh, kh, a->rows_h, a->base_h + (size_t)by * bq, *ph, *stride,
                                 mask_h + s->jh, (T *)s->rh, ld, 0);
    if (status) return status;
    return lanes_rel(a, 0, s->jw, kw, a->rows_w, a->base_w + (size_t)bx * bq, *pw, *stride, mask_w + s->jw,
                     (T *)s->rw, ld, 0);
}

/* One query vector's logits into s->logits: relative terms, then q . k (and their max) */
static void lanes_logits(Lanes *s, const HaloArgs *a, int u, vec *max) {
    const int kh = s->kh, kw = s->kw, qv = s->qv;
    vec *l = s->logits;
    for (int jh = 0; jh < kh; ++jh)
        for (int jw = 0; jw < kw; ++jw) l[jh * kw + jw] = s->rw[jw * qv + u] + s->rh[jh * qv + u];
    lanes_qk_all(a->d, s->qs + u, qv, s->k, (int64_t)kh * kw, l, max);
}

int halo_fwd(const HaloArgs *a, int64_t start, int64_t stop) {
    Lanes s;
    if (!lanes_init(&s, a, 0)) return 1;
    const int dv = a->dv, Q = a->Q, qv = s.qv, ld = s.ld;
    int status = 0;
    for (int64_t w = start; w < stop && !status; ++w) {
        T *ph, *pw;
        int64_t stride;
        if ((status = lanes_window(&s, a, w, &ph, &pw, &stride))) break;
        const int64_t K = (int64_t)s.kh * s.kw;
        for (int u = 0; u < qv; ++u) {
            vec *l = s.logits, m = splat(-INFINITY);  /* the max may skip a NaN logit; it makes the sum NaN */
            lanes_logits(&s, a, u, &m);
            vec sum = {0};
            for (int64_t j = 0; j < K; ++j) {
                l[j] = exp_nonpos(l[j] - m);
                sum += l[j];
            }
            lanes_pv_all(dv, K, l, s.v, s.out + u, qv);
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
        window_copy(a->nh, a->nw, &a->lay.out, w, dv, a->bq, a->bq, a->out, (T *)s.out, ld, STORE);
    }
    free(s.mem);
    return status;
}

/* Backward, queries across lanes as in the forward: P and dS per query vector, dq, and the relative terms'
 * gradients on whole vectors; dk = dS^T (scale q) and dv = P^T dO as products over the queries (keys as rows).
 * grad_rel_h / grad_rel_w: PRODUCTS: (n, rows, Q) like rel_h / rel_w; TABLES: (calls, rows, d), one accumulator
 * per call (concurrent calls never share one; the caller sums them). */
int halo_bwd(const HaloArgs *a, int64_t start, int64_t stop) {
    T *grad_rel_h = a->grad_rel_h, *grad_rel_w = a->grad_rel_w;
    if (a->mode == TABLES) {
        if (a->calls_stride < 1) return 3;
        const int64_t call = start / a->calls_stride;
        grad_rel_h += call * a->rows_h * a->d;
        grad_rel_w += call * a->rows_w * a->d;
    }
    const Layout *lk = &a->lay.k;
    const int64_t group = (int64_t)a->nh * a->nw;
    if ((lk->step_y < a->kh || lk->step_x < a->kw) && (a->calls_stride < 1 || a->calls_stride % group || start % group))
        return 3;  /* overlapping windows in ranges that split a group: concurrent adds to one element */
    Lanes s;
    if (!lanes_init(&s, a, 1)) return 1;
    const int d = a->d, dv = a->dv, Q = a->Q, bq = a->bq, nh = a->nh, nw = a->nw;
    const int qv = s.qv, ld = s.ld, dvec = s.dvec, dvvec = s.dvvec, tables = a->mode == TABLES;
    int status = 0;
    for (int64_t w = start; w < stop && !status; ++w) {
        const int by = (int)(w / nw % nh), bx = (int)(w % nw);
        T *ph, *pw;
        int64_t stride;
        if ((status = lanes_window(&s, a, w, &ph, &pw, &stride))) break;
        /* the visible keys only: the hidden ones' P and dS are 0, so they add nothing to any gradient */
        const int kh = s.kh, kw = s.kw;
        const int64_t K = (int64_t)kh * kw;
        window_load(nh, nw, &a->lay.out, w, dv, bq, bq, a->out, (T *)s.out, ld);
        window_load(nh, nw, &a->lay.out, w, dv, bq, bq, a->grad_out, (T *)s.go, ld);
        const T *lw = a->stats + w * Q * 2;
        T *stat = (T *)s.stat;
        for (int i = 0; i < Q; ++i) {
            stat[i] = lw[2 * i];
            stat[ld + i] = lw[2 * i + 1];
        }
        for (int u = 0; u < qv; ++u) {
            vec *l = s.logits, *P = s.pall + u, *S = s.sall + u;
            lanes_logits(&s, a, u, NULL);
            const vec m = s.stat[u], inv = s.stat[qv + u];
            vec delta = {0};  /* rowsum(dP * P) == dO . O per query (the flash-attention identity) */
            for (int c = 0; c < dv; ++c) delta += s.go[(size_t)c * qv + u] * s.out[(size_t)c * qv + u];
            for (int64_t j = 0; j < K; ++j) {
                P[j * qv] = exp_nonpos(l[j] - m) * inv;
                l[j] = splat(0);
            }
            lanes_qk_all(dv, s.go + u, qv, s.v, K, l, NULL);  /* dP = dO . v */
            for (int jw = 0; jw < kw; ++jw) s.grw[jw * qv + u] = splat(0);
            for (int jh = 0; jh < kh; ++jh) {  /* dS = P (dP - delta); its sums over each key row and column */
                vec row = {0};
                for (int jw = 0; jw < kw; ++jw) {
                    const int64_t j = (int64_t)jh * kw + jw;
                    const vec ds = P[j * qv] * (l[j] - delta);
                    l[j] = S[j * qv] = ds;
                    row += ds;
                    s.grw[jw * qv + u] += ds;
                }
                s.grh[jh * qv + u] = row;
            }
            lanes_pv_all(d, K, l, s.k, s.gq + u, qv);  /* dq = dS . k, times scale */
            for (int c = 0; c < d; ++c) s.gq[(size_t)c * qv + u] *= a->scale;
        }
        /* the relative terms' gradients back to the products' rows (rows no query reads get 0) */
        T *gph = tables ? (T *)s.gph : grad_rel_h + w * a->rows_h * Q;
        T *gpw = tables ? (T *)s.gpw : grad_rel_w + w * a->rows_w * Q;
        memset(gph, 0, sizeof(T) * (size_t)a->rows_h * stride);
        memset(gpw, 0, sizeof(T) * (size_t)a->rows_w * stride);
        lanes_rel(a, 1, s.jh, kh, a->rows_h, a->base_h + (size_t)by * bq, gph, stride, NULL, (T *)s.grh, ld, 1);
        lanes_rel(a, 0, s.jw, kw, a->rows_w, a->base_w + (size_t)bx * bq, gpw, stride, NULL, (T *)s.grw, ld, 1);
        /* dk (K, d) = dS (K, Q) . scale q (Q, d), dv (K, dv) = P (K, Q) . dO (Q, dv): keys as rows */
        transpose(d, Q, (const T *)s.qs, ld, (T *)s.qst, (int64_t)dvec * VL);
        transpose(dv, Q, (const T *)s.go, ld, (T *)s.got, (int64_t)dvvec * VL);
        gemm((int)K, dvec, Q, (const T *)s.sall, ld, 1, s.qst, dvec, s.gkt, dvec, 0);
        gemm((int)K, dvvec, Q, (const T *)s.pall, ld, 1, s.got, dvvec, s.gvt, dvvec, 0);
        transpose((int)K, d, (const T *)s.gkt, (int64_t)dvec * VL, s.k, K);  /* s.k, s.v: read for w no more */
        transpose((int)K, dv, (const T *)s.gvt, (int64_t)dvvec * VL, s.v, K);
        window_copy(nh, nw, &s.k_lay, w, d, kh, kw, a->grad_k, s.k, K, ADD);
        window_copy(nh, nw, &s.v_lay, w, dv, kh, kw, a->grad_v, s.v, K, ADD);
        if (tables) {  /* through the products with the tables: dq += table^T . grad, dtable += grad . q^T */
            transpose(d, Q, (const T *)s.q, ld, (T *)s.qt, (int64_t)dvec * VL);
            gemm(d, qv, a->rows_h, a->rel_h, 1, d, s.gph, qv, s.gq, qv, 1);
            gemm(d, qv, a->rows_w, a->rel_w, 1, d, s.gpw, qv, s.gq, qv, 1);
            gemm(a->rows_h, dvec, Q, (const T *)s.gph, ld, 1, s.qt, dvec, s.gtab_h, dvec, 1);
            gemm(a->rows_w, dvec, Q, (const T *)s.gpw, ld, 1, s.qt, dvec, s.gtab_w, dvec, 1);
        }
        window_copy(nh, nw, &a->lay.q, w, d, bq, bq, a->grad_q, (T *)s.gq, ld, STORE);
    }
    if (tables && !status) {  /* this call's table gradients, unpadded */
        const size_t bytes = sizeof(T) * (size_t)d;
        for (int r = 0; r < a->rows_h; ++r) memcpy(grad_rel_h + (size_t)r * d, s.gtab_h + (size_t)r * dvec, bytes);
        for (int r = 0; r < a->rows_w; ++r) memcpy(grad_rel_w + (size_t)r * d, s.gtab_w + (size_t)r * dvec, bytes);
    }
    free(s.mem);
    return status;
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
