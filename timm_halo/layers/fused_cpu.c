/* Fused windowed attention for CPUs: each query's row of logits lives in an L1 buffer and never reaches memory.
 *
 * Built on first use by fused_cpu.py, once for float and once for double (-DHALO_DOUBLE), and called through
 * ctypes on a range of windows; the caller runs ranges on its own threads (ctypes releases the GIL).
 * Layouts, window w:
 *   q (d, Q), k (d, K), v (dv, K), out (dv, Q), stats (Q, 2), rel_h (Q, kh), rel_w (Q, kw);  K = kh * kw,
 * query i = (yi, xi) and key j = (jh, jw) row-major. The logit of (i, j) is
 *   scale * q[:, i] . k[:, j] + rel_h[i, jh] + rel_w[i, jw].
 * Each window's keys and values are first copied into rows of kwp >= kw columns, a whole number of vectors; pad
 * columns get a very negative logit, hence probability exactly 0. Rows are then processed as GCC/Clang vector
 * types (64 bytes: AVX-512, or two AVX2 / four SSE / NEON registers), so no loop has a scalar tail and the code
 * does not depend on the auto-vectoriser. The forward saves each query's max logit and log-sum-exp (stats); the
 * backward recomputes the probabilities from them (flash-attention style) and accumulates a window's dk, dv in L1.
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

/* exp for x <= 0 (a logit minus its row's max): exactly 0 below -87, as ATen's softmax gives for masked keys;
 * NaN stays NaN. fp32: range reduction by ln 2 and a degree-6 polynomial (about 1 ulp); fp64: libm. */
static inline vec exp_nonpos(vec x) {
#ifdef HALO_DOUBLE
    for (int l = 0; l < VL; ++l) x[l] = exp(x[l]);
    return x;
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
    return vselect(under, splat(0), p * (vec)two_n);
#endif
}

typedef struct {
    int d, dv, Q, kh, kw, kwp, nv; /* nv: vectors per padded row of kh * kwp keys */
    vec *k, *v, *rw, *colsum;      /* padded copies: k (d, nv), v (dv, nv); a rel_w row; column sums (bwd) */
    vec *row, *dp, *gk, *gv;       /* QB rows each of probabilities and their gradient; padded dk, dv (backward) */
    void *mem;
} Scratch;

static int scratch_init(Scratch *s, int d, int dv, int Q, int kh, int kw, int backward) {
    s->d = d; s->dv = dv; s->Q = Q; s->kh = kh; s->kw = kw;
    s->kwp = (kw + VL - 1) / VL * VL;
    s->nv = kh * s->kwp / VL;
    const size_t nv = (size_t)s->nv, rwv = (size_t)(s->kwp / VL);
    const size_t vectors = (size_t)(d + dv) * nv * (backward ? 2 : 1) + 2 * QB * nv + 2 * rwv;
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
    for (int jw = kw; jw < s->kwp; ++jw) ((T *)s->rw)[jw] = PAD_LOGIT;
    s->gk = backward ? p : NULL;
    s->gv = backward ? p + (size_t)d * nv : NULL;
    return 1;
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

/* The padded row of logits of query i (see the top comment) in row. */
static void logits_row(const Scratch *s, const T *q, const T *rh, const T *rw, T scale, int i, vec *row) {
    const int rwv = s->kwp / VL;
    memcpy(s->rw, rw + (size_t)i * s->kw, sizeof(T) * (size_t)s->kw);
    for (int jh = 0; jh < s->kh; ++jh) {
        const T a = rh[(size_t)i * s->kh + jh];
        for (int u = 0; u < rwv; ++u) row[jh * rwv + u] = s->rw[u] + a;
    }
    rows_combination(row, s->k, s->d, s->nv, q + i, s->Q, scale);
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

int halo_fwd(int64_t start, int64_t stop, int d, int dv, int Q, int kh, int kw, T scale,
             const T *q, const T *k, const T *v, const T *rel_h, const T *rel_w, T *out, T *stats) {
    Scratch s;
    if (!scratch_init(&s, d, dv, Q, kh, kw, 0)) return 1;
    const int64_t K = (int64_t)kh * kw;
    const int nv = s.nv;
    vec *row = s.row;
    for (int64_t w = start; w < stop; ++w) {
        const T *qw = q + w * d * Q, *rh = rel_h + w * Q * kh, *rw = rel_w + w * Q * kw;
        T *ow = out + w * dv * Q, *lw = stats + w * Q * 2;
        pad_rows(&s, d, k + w * d * K, s.k);
        pad_rows(&s, dv, v + w * dv * K, s.v);
        for (int i = 0; i < Q; ++i) {
            logits_row(&s, qw, rh, rw, scale, i, row);
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
            lw[2 * i] = m;  /* max and log-sum apart: m + log(sum) would round to m where every key is masked */
            lw[2 * i + 1] = (T)log((double)sum);
            rows_dot(row, s.v, dv, nv, (T)1 / sum, ow + i, Q);
        }
    }
    free(s.mem);
    return 0;
}

int halo_bwd(int64_t start, int64_t stop, int d, int dv, int Q, int kh, int kw, T scale,
             const T *q, const T *k, const T *v, const T *rel_h, const T *rel_w, const T *out, const T *stats,
             const T *grad_out, T *grad_q, T *grad_k, T *grad_v, T *grad_rel_h, T *grad_rel_w) {
    Scratch s;
    if (!scratch_init(&s, d, dv, Q, kh, kw, 1)) return 1;
    const int64_t K = (int64_t)kh * kw;
    const int nv = s.nv, rwv = s.kwp / VL;
    for (int64_t w = start; w < stop; ++w) {
        const T *qw = q + w * d * Q, *rh = rel_h + w * Q * kh, *rw = rel_w + w * Q * kw;
        const T *ow = out + w * dv * Q, *lw = stats + w * Q * 2, *gw = grad_out + w * dv * Q;
        T *gq = grad_q + w * d * Q, *grh = grad_rel_h + w * Q * kh, *grw = grad_rel_w + w * Q * kw;
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
                logits_row(&s, qw, rh, rw, scale, i, row);
                T delta = 0;  /* rowsum(dP * P) == dO . O per query (the flash-attention identity) */
                for (int c = 0; c < dv; ++c) delta += gw[(size_t)c * Q + i] * ow[(size_t)c * Q + i];
                const T m = lw[2 * i], log_sum = lw[2 * i + 1];
                for (int j = 0; j < nv; ++j) {
                    row[j] = exp_nonpos(row[j] - m - log_sum);
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
                    grh[(size_t)i * kh + jh] = hsum(acc);
                }
                memcpy(grw + (size_t)i * kw, colsum, sizeof(T) * (size_t)kw);
                rows_dot(dp, s.k, d, nv, scale, gq + i, Q);
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
    }
    free(s.mem);
    return 0;
}
