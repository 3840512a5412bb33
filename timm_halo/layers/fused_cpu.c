/* Fused windowed attention for CPUs: each query's row of logits lives in an L1 buffer and never reaches memory.
 *
 * Built on first use by fused_cpu.py, once for float and once for double (-DHALO_DOUBLE), and called through
 * ctypes on a range of windows; the caller runs ranges on its own threads (ctypes releases the GIL).
 * Layouts, window w (n windows; nh x nw blocks per image and head, window w is block (w / nw % nh, w % nw)):
 *   q (d, Q), k (d, K), v (dv, K), out (dv, Q), stats (Q, 2);  K = kh * kw, Q = bq * bq,
 *   rel_h, rel_w: the relative terms' source, either (mode PRODUCTS) per window (Rh, Q) / (Rw, Q): each query's
 *     dot products with every row of the two tables, or (mode TABLES) the tables themselves, (Rh, d) / (Rw, d),
 *     whose products with q the kernel takes itself (no per-query products in memory),
 *   base_h (nh, bq), base_w (nw, bq): the table row of key row / column 0 for each block and query row / column,
 *   mask_h (nh, kh), mask_w (nw, kw): additive border masks (0 or a very negative number),
 * query i = (y, x) and key j = (jh, jw) row-major. With P_h[r, i] = q[:, i] . table_h[r] (likewise P_w), the logit
 * of (i, j) in block (by, bx) is
 *   scale * q[:, i] . k[:, j] + P_h[base_h[by, y] + jh, i] + mask_h[by, jh] + P_w[base_w[bx, x] + jw, i]
 *   + mask_w[bx, jw].
 * Each window's keys and values are first copied into rows of kwp >= kw columns, a whole number of vectors; pad
 * columns get a very negative logit, hence probability exactly 0. Rows are then processed as GCC/Clang vector
 * types (64 bytes: AVX-512, or two AVX2 / four SSE / NEON registers), so no loop has a scalar tail and the code
 * does not depend on the auto-vectoriser. The forward saves each query's max logit and 1 / sum of exp (stats); the
 * backward recomputes the very same probabilities from them (flash-attention style) and accumulates a window's
 * dk, dv in L1.
 * Functions return 0, 1 when out of memory, 2 when a table row lies outside its table (a caller's bug).
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

#ifndef VBYTES
#define VBYTES 64
#endif
#define VL ((int)(VBYTES / sizeof(T)))
#define QB 4 /* queries per step of the backward: a window's dk and dv accumulators are read and written once per QB */
typedef T vec __attribute__((vector_size(VBYTES)));
enum { G_D, G_DV, G_Q, G_KH, G_KW, G_RH, G_RW, G_NH, G_NW, G_BQ, G_MODE, G_COUNT };  /* the caller's geometry */
enum { PRODUCTS = 0, TABLES = 1 };  /* G_MODE: what rel_h / rel_w point to (see the top comment) */
typedef I ivec __attribute__((vector_size(VBYTES)));

static inline vec splat(T x) { return (vec){0} + x; }
static inline vec vselect(ivec mask, vec a, vec b) { return (vec)((mask & (ivec)a) | (~mask & (ivec)b)); }
typedef T half_vec __attribute__((vector_size(VBYTES / 2)));
typedef T quarter_vec __attribute__((vector_size(VBYTES / 4)));
static inline T hsum(vec x) {  /* halving steps: a few shuffles and adds, not VL dependent scalar adds */
    half_vec h0, h1;
    memcpy(&h0, &x, sizeof h0);
    memcpy(&h1, (char *)&x + sizeof h0, sizeof h1);
    h0 += h1;
    quarter_vec q0, q1;
    memcpy(&q0, &h0, sizeof q0);
    memcpy(&q1, (char *)&h0 + sizeof q0, sizeof q1);
    q0 += q1;
    T s = 0;
    for (int l = 0; l < (int)(sizeof q0 / sizeof(T)); ++l) s += q0[l];
    return s;
}

/* exp for x <= 0 (a logit minus its row's max), on whole vectors: exactly 0 below the smallest normal number's log
 * (masked keys get zero probability, as in ATen's softmax), NaN stays NaN. Range reduction by ln 2 (split in a
 * high and low part), then a polynomial on |r| <= ln(2) / 2: degree 6 (about 1 ulp) in fp32, 13 (Taylor) in fp64. */
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
#else
    const vec lo = splat(-87.0f), magic = splat(12582912.0f);  /* 1.5 * 2^23: adding it rounds to an integer */
    const ivec under = x < lo;
    const vec xc = vselect(under, lo, x);
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
    const ivec two_n = (__builtin_convertvector(n, ivec) + 127) << 23;
#endif
    return vselect(under, splat(0), p * (vec)two_n);
}

typedef struct {
    int d, dv, Q, kh, kw, kwp, nv; /* nv: vectors per padded row of kh * kwp keys */
    int rows_h, rows_w, nh, nw, bq, mode; /* table rows per axis, blocks per axis, queries per block side */
    T *hv, *gh;                           /* one query's rel_h terms and their gradient (kh) */
    T *ph, *pw, *gph, *gpw;               /* TABLES: one window's products (rows, Q) and their gradients (bwd) */
    vec *k, *v, *rw, *colsum;      /* padded copies: k (d, nv), v (dv, nv); a rel_w row; column sums (bwd) */
    vec *row, *dp, *gk, *gv;       /* QB rows each of probabilities and their gradient; padded dk, dv (backward) */
    void *mem, *tables;
} Scratch;

static int scratch_init(Scratch *s, const int32_t *g, int backward) {
    const int d = g[G_D], dv = g[G_DV], kh = g[G_KH], kw = g[G_KW];
    s->d = d; s->dv = dv; s->Q = g[G_Q]; s->kh = kh; s->kw = kw;
    s->rows_h = g[G_RH]; s->rows_w = g[G_RW]; s->nh = g[G_NH]; s->nw = g[G_NW]; s->bq = g[G_BQ];
    s->mode = g[G_MODE];
    s->kwp = (kw + VL - 1) / VL * VL;
    s->nv = kh * s->kwp / VL;
    const size_t nv = (size_t)s->nv, rwv = (size_t)(s->kwp / VL);
    const size_t small = (size_t)(2 * kh + VL - 1) / VL;  /* hv, gh */
    const size_t vectors = (size_t)(d + dv) * nv * (backward ? 2 : 1) + 2 * QB * nv + 2 * rwv + small;
    s->mem = aligned_alloc(VBYTES, vectors * VBYTES);
    if (!s->mem) return 0;
    memset(s->mem, 0, vectors * VBYTES);  /* the pad columns of k and v stay 0 */
    vec *p = (vec *)s->mem;
    s->k = p; p += (size_t)d * nv;
    s->v = p; p += (size_t)dv * nv;
    s->row = p; p += QB * nv;
    s->dp = p; p += QB * nv;
    s->rw = p; p += rwv;
    s->colsum = p; p += rwv;
    s->hv = (T *)p; s->gh = s->hv + kh; p += small;
    for (int jw = kw; jw < s->kwp; ++jw) ((T *)s->rw)[jw] = PAD_LOGIT;
    s->gk = backward ? p : NULL;
    s->gv = backward ? p + (size_t)d * nv : NULL;
    s->ph = s->pw = s->gph = s->gpw = NULL;
    if (s->mode == TABLES) {  /* small: (rows, Q) per table, twice in the backward */
        const size_t th = (size_t)s->rows_h * s->Q, tw = (size_t)s->rows_w * s->Q;
        s->tables = malloc(sizeof(T) * (th + tw) * (backward ? 2 : 1));
        if (!s->tables) {
            free(s->mem);
            return 0;
        }
        s->ph = (T *)s->tables; s->pw = s->ph + th;
        if (backward) {
            s->gph = s->pw + tw; s->gpw = s->gph + th;
        }
    }
    return 1;
}

static void scratch_free(Scratch *s) {
    free(s->mem);
    if (s->mode == TABLES) free(s->tables);
}

/* dst (rows, Q) = table (rows, d) . q (d, Q): AXPYs along the window's queries. */
static void table_products(int rows, int d, int Q, const T *table, const T *q, T *dst) {
    for (int r = 0; r < rows; ++r) {
        T *out = dst + (size_t)r * Q;
        memset(out, 0, sizeof(T) * (size_t)Q);
        for (int c = 0; c < d; ++c) {
            const T a = table[(size_t)r * d + c], *qc = q + (size_t)c * Q;
            for (int i = 0; i < Q; ++i) out[i] += a * qc[i];
        }
    }
}

/* The backward of table_products for one window: dq (d, Q) += table^T . grad, dtable (rows, d) += grad . q^T. */
static void table_products_backward(int rows, int d, int Q, const T *table, const T *q, const T *grad, T *dq,
                                    T *dtable) {
    for (int r = 0; r < rows; ++r) {
        const T *g = grad + (size_t)r * Q;
        for (int c = 0; c < d; ++c) {
            const T a = table[(size_t)r * d + c], *qc = q + (size_t)c * Q;
            T *dqc = dq + (size_t)c * Q, acc = 0;
            for (int i = 0; i < Q; ++i) {
                dqc[i] += a * g[i];
                acc += g[i] * qc[i];
            }
            dtable[(size_t)r * d + c] += acc;
        }
    }
}

/* Rows of kw keys (channels, kh, kw) into rows of kwp (the pad columns were zeroed once). */
static void pad_rows(const Scratch *s, int channels, const T *src, vec *dst) {
    for (int c = 0; c < channels; ++c) {
        T *row = (T *)(dst + (size_t)c * s->nv);
        for (int jh = 0; jh < s->kh; ++jh)
            memcpy(row + (size_t)jh * s->kwp, src + ((size_t)c * s->kh + jh) * s->kw, sizeof(T) * (size_t)s->kw);
    }
}

/* Padded rows (channels, kh, kwp) back to rows of kw. */
static void unpad_rows(const Scratch *s, int channels, const vec *src, T *dst) {
    for (int c = 0; c < channels; ++c) {
        const T *row = (const T *)(src + (size_t)c * s->nv);
        for (int jh = 0; jh < s->kh; ++jh)
            memcpy(dst + ((size_t)c * s->kh + jh) * s->kw, row + (size_t)jh * s->kwp, sizeof(T) * (size_t)s->kw);
    }
}

/* dst[j] += sum_t src[t][j] * coef[t] for t < n (n <= 4): one load and store of dst per n FMAs. */
static inline void axpy_rows(vec *dst, const vec *const *src, const T *coef, int n, int nv) {
    if (n == 4) {
        const vec *s0 = src[0], *s1 = src[1], *s2 = src[2], *s3 = src[3];
        for (int j = 0; j < nv; ++j) dst[j] += s0[j] * coef[0] + s1[j] * coef[1] + s2[j] * coef[2] + s3[j] * coef[3];
    } else {
        for (int t = 0; t < n; ++t)
            for (int j = 0; j < nv; ++j) dst[j] += src[t][j] * coef[t];
    }
}

/* dst = sum_c src[c] * coef[c * coef_stride] over `channels` rows of nv vectors, four rows per pass. */
static void rows_combination(vec *dst, const vec *src, int channels, int nv, const T *coef, int coef_stride, T scale) {
    for (int c = 0; c < channels; c += 4) {
        const int n = channels - c < 4 ? channels - c : 4;
        const vec *rows[4];
        T w[4];
        for (int t = 0; t < n; ++t) {
            rows[t] = src + (size_t)(c + t) * nv;
            w[t] = coef[(size_t)(c + t) * coef_stride] * scale;
        }
        axpy_rows(dst, rows, w, n, nv);
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
    const T *h = ph + (size_t)r->row_h * s->Q + i, *wp = pw + (size_t)r->row_w * s->Q + i;
    for (int jh = 0; jh < s->kh; ++jh) s->hv[jh] = h[(size_t)jh * s->Q] + r->mask_h[jh];
    for (int jw = 0; jw < s->kw; ++jw) rw[jw] = wp[(size_t)jw * s->Q] + r->mask_w[jw];
}

/* The padded row of logits of query i (see the top comment) in row. */
static void logits_row(const Scratch *s, const RelRows *r, const T *q, const T *ph, const T *pw, T scale, int i,
                       vec *row) {
    const int rwv = s->kwp / VL, Q = s->Q;
    rel_values(s, r, i, ph, pw);
    for (int jh = 0; jh < s->kh; ++jh) {
        const T a = s->hv[jh];
        for (int u = 0; u < rwv; ++u) row[jh * rwv + u] = s->rw[u] + a;
    }
    rows_combination(row, s->k, s->d, s->nv, q + i, Q, scale);
}

/* dst[c * stride] = factor * sum_j p[j] * src[c, j], four channels at a time (independent accumulators). */
static void rows_dot(const vec *p, const vec *src, int channels, int nv, T factor, T *dst, int stride) {
    int c = 0;
    for (; c + 4 <= channels; c += 4) {
        const vec *s0 = src + (size_t)c * nv, *s1 = s0 + nv, *s2 = s1 + nv, *s3 = s2 + nv;
        vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int j = 0; j < nv; ++j) {
            a0 += p[j] * s0[j]; a1 += p[j] * s1[j]; a2 += p[j] * s2[j]; a3 += p[j] * s3[j];
        }
        dst[(size_t)c * stride] = hsum(a0) * factor;
        dst[(size_t)(c + 1) * stride] = hsum(a1) * factor;
        dst[(size_t)(c + 2) * stride] = hsum(a2) * factor;
        dst[(size_t)(c + 3) * stride] = hsum(a3) * factor;
    }
    for (; c < channels; ++c) {
        const vec *s0 = src + (size_t)c * nv;
        vec a0 = {0};
        for (int j = 0; j < nv; ++j) a0 += p[j] * s0[j];
        dst[(size_t)c * stride] = hsum(a0) * factor;
    }
}

int halo_fwd(int64_t start, int64_t stop, const int32_t *geom, T scale, const T *q, const T *k, const T *v,
             const T *rel_h, const T *rel_w, const int32_t *base_h, const int32_t *base_w, const T *mask_h,
             const T *mask_w, T *out, T *stats) {
    Scratch s;
    if (!scratch_init(&s, geom, 0)) return 1;
    const int d = s.d, dv = s.dv, Q = s.Q, kh = s.kh, kw = s.kw;
    const int64_t K = (int64_t)kh * kw;
    const int nv = s.nv;
    vec *row = s.row;
    for (int64_t w = start; w < stop; ++w) {
        const T *qw = q + w * d * Q, *ph = rel_h + w * s.rows_h * Q, *pw = rel_w + w * s.rows_w * Q;
        T *ow = out + w * dv * Q, *lw = stats + w * Q * 2;
        if (s.mode == TABLES) {
            table_products(s.rows_h, d, Q, rel_h, qw, s.ph);
            table_products(s.rows_w, d, Q, rel_w, qw, s.pw);
            ph = s.ph;
            pw = s.pw;
        }
        pad_rows(&s, d, k + w * d * K, s.k);
        pad_rows(&s, dv, v + w * dv * K, s.v);
        for (int i = 0; i < Q; ++i) {
            RelRows r;
            if (!rel_rows(&s, w, i, base_h, base_w, mask_h, mask_w, &r)) {
                scratch_free(&s);
                return 2;
            }
            logits_row(&s, &r, qw, ph, pw, scale, i, row);
            vec mv = row[0];
            ivec nan = row[0] != row[0];
            for (int j = 1; j < nv; ++j) {
                mv = vselect(row[j] > mv, row[j], mv);
                nan |= row[j] != row[j];
            }
            T m = mv[0];
            int any_nan = 0;
            for (int l = 0; l < VL; ++l) {
                m = mv[l] > m ? mv[l] : m;
                any_nan |= nan[l] != 0;
            }
            if (any_nan) m = NAN;  /* a NaN logit makes the whole row NaN, as in ATen's softmax */
            vec sv = {0};
            for (int j = 0; j < nv; ++j) {
                row[j] = exp_nonpos(row[j] - m);
                sv += row[j];
            }
            const T sum = hsum(sv);
            const T inv_sum = (T)1 / sum;
            lw[2 * i] = m;  /* the backward recomputes exactly these probabilities: exp(logit - m) * inv_sum */
            lw[2 * i + 1] = inv_sum;
            rows_dot(row, s.v, dv, nv, inv_sum, ow + i, Q);
        }
    }
    scratch_free(&s);
    return 0;
}

/* grad_rel_h / grad_rel_w: PRODUCTS: (n, rows, Q) like rel_h / rel_w; TABLES: (rows, d) accumulators of this
 * call alone (the caller gives each concurrent call its own and sums them). */
int halo_bwd(int64_t start, int64_t stop, const int32_t *geom, T scale, const T *q, const T *k, const T *v,
             const T *rel_h, const T *rel_w, const int32_t *base_h, const int32_t *base_w, const T *mask_h,
             const T *mask_w, const T *out, const T *stats, const T *grad_out, T *grad_q, T *grad_k, T *grad_v,
             T *grad_rel_h, T *grad_rel_w) {
    Scratch s;
    if (!scratch_init(&s, geom, 1)) return 1;
    if (s.mode == TABLES) {
        memset(grad_rel_h, 0, sizeof(T) * (size_t)s.rows_h * s.d);
        memset(grad_rel_w, 0, sizeof(T) * (size_t)s.rows_w * s.d);
    }
    const int d = s.d, dv = s.dv, Q = s.Q, kh = s.kh, kw = s.kw;
    const int64_t K = (int64_t)kh * kw;
    const int nv = s.nv, rwv = s.kwp / VL;
    for (int64_t w = start; w < stop; ++w) {
        const T *qw = q + w * d * Q;
        const T *ow = out + w * dv * Q, *lw = stats + w * Q * 2, *gw = grad_out + w * dv * Q;
        T *gq = grad_q + w * d * Q;
        const T *ph = rel_h + w * s.rows_h * Q, *pw = rel_w + w * s.rows_w * Q;
        T *gph = grad_rel_h + w * s.rows_h * Q, *gpw = grad_rel_w + w * s.rows_w * Q;
        if (s.mode == TABLES) {
            table_products(s.rows_h, d, Q, rel_h, qw, s.ph);
            table_products(s.rows_w, d, Q, rel_w, qw, s.pw);
            ph = s.ph;
            pw = s.pw;
            gph = s.gph;
            gpw = s.gpw;
        }
        memset(gph, 0, sizeof(T) * (size_t)s.rows_h * Q);  /* rows no query reads get 0 */
        memset(gpw, 0, sizeof(T) * (size_t)s.rows_w * Q);
        pad_rows(&s, d, k + w * d * K, s.k);
        pad_rows(&s, dv, v + w * dv * K, s.v);
        memset(s.gk, 0, (size_t)(d + dv) * nv * VBYTES);  /* gk and gv are adjacent */
        for (int i0 = 0; i0 < Q; i0 += QB) {
            const int n = Q - i0 < QB ? Q - i0 : QB;
            const vec *probs[QB], *grads[QB];
            for (int t = 0; t < n; ++t) {
                const int i = i0 + t;
                vec *row = s.row + (size_t)t * nv, *dp = s.dp + (size_t)t * nv;
                probs[t] = row;
                grads[t] = dp;
                RelRows r;
                if (!rel_rows(&s, w, i, base_h, base_w, mask_h, mask_w, &r)) {
                    scratch_free(&s);
                    return 2;
                }
                logits_row(&s, &r, qw, ph, pw, scale, i, row);
                T delta = 0;  /* rowsum(dP * P) == dO . O per query (the flash-attention identity) */
                for (int c = 0; c < dv; ++c) delta += gw[(size_t)c * Q + i] * ow[(size_t)c * Q + i];
                const T m = lw[2 * i], inv_sum = lw[2 * i + 1];
                for (int j = 0; j < nv; ++j) {
                    row[j] = exp_nonpos(row[j] - m) * inv_sum;
                    dp[j] = splat(0);
                }
                rows_combination(dp, s.v, dv, nv, gw + i, Q, 1);  /* dP = dO . v */
                for (int j = 0; j < nv; ++j) dp[j] = row[j] * (dp[j] - delta);  /* now the logits' gradient */
                /* per-axis sums of the logits' gradient: rel_h over each key row, rel_w over each key column */
                vec *colsum = s.colsum;
                for (int u = 0; u < rwv; ++u) colsum[u] = splat(0);
                for (int jh = 0; jh < kh; ++jh) {
                    vec acc = {0};
                    for (int u = 0; u < rwv; ++u) {
                        acc += dp[jh * rwv + u];
                        colsum[u] += dp[jh * rwv + u];
                    }
                    s.gh[jh] = hsum(acc);
                }
                const T *gcol = (const T *)colsum;
                rows_dot(dp, s.k, d, nv, scale, gq + i, Q);
                T *gh_i = gph + (size_t)r.row_h * Q + i, *gw_i = gpw + (size_t)r.row_w * Q + i;
                for (int jh = 0; jh < kh; ++jh) gh_i[(size_t)jh * Q] = s.gh[jh];
                for (int jw = 0; jw < kw; ++jw) gw_i[(size_t)jw * Q] = gcol[jw];
            }
            /* dv[c] += sum_t P[t] dO[c, t] and dk[c] += sum_t dS[t] q[c, t] * scale: QB queries per pass */
            for (int c = 0; c < dv; ++c) axpy_rows(s.gv + (size_t)c * nv, probs, gw + (size_t)c * Q + i0, n, nv);
            for (int c = 0; c < d; ++c) {
                T coef[QB];
                for (int t = 0; t < n; ++t) coef[t] = qw[(size_t)c * Q + i0 + t] * scale;
                axpy_rows(s.gk + (size_t)c * nv, grads, coef, n, nv);
            }
        }
        unpad_rows(&s, d, s.gk, grad_k + w * d * K);
        unpad_rows(&s, dv, s.gv, grad_v + w * dv * K);
        if (s.mode == TABLES) {  /* through the window's products: into q and into this call's table gradients */
            table_products_backward(s.rows_h, d, Q, rel_h, qw, s.gph, gq, grad_rel_h);
            table_products_backward(s.rows_w, d, Q, rel_w, qw, s.gpw, gq, grad_rel_w);
        }
    }
    scratch_free(&s);
    return 0;
}
