/* The vector loops of _attn.c, included there once per vector width (so no include guard): VL
 * float lanes of type VT, functions named FN(name), attend_head compiled with VEC_TARGET. GCC does
 * not split a vector wider than the target's registers well: 16 lanes in the AVX2 clone ran the
 * attention 3-6x slower than 8 lanes do there. So AVX-512 gets 16 lanes and everything else 8.
 * Every operation is elementwise, so the bits do not depend on VL. */

/* sc[t] = (q . K[t]) * scale for t < T; kt holds K transposed, D rows of `cap` keys, cap a multiple
 * of 16 (model.KEY_RUN). Each score is the sum over d in order, in float: lanes run over keys, never
 * over d. The last run of 16 may read keys past T (within cap; whatever they hold): their scores
 * land in sc[T..] (sc has room for T rounded up to 16) and are never used. */
static inline void FN(scores)(const float *restrict q, const float *restrict kt, int cap, int D, int T, float scale,
                          float *restrict sc)
{
    int t = 0;
#ifdef SK_VEC
    for (; t + KEYS <= T; t += KEYS) {
        VT a[KEYS / VL] = {{0}};
        for (int d = 0; d < D; d++) {
            VT qd = (VT){0} + q[d];
            const VT *k = (const VT *)(kt + (size_t)d * cap + t);
            for (int i = 0; i < KEYS / VL; i++) a[i] += qd * k[i];
        }
        VT *o = (VT *)(sc + t);
        for (int i = 0; i < KEYS / VL; i++) o[i] = a[i] * scale;
    }
    int runs = (T - t + 15) / 16 * (16 / VL);   /* vectors of the last whole runs of 16 keys */
    if (runs > 0) {
        VT a[KEYS / VL] = {{0}};
        for (int d = 0; d < D; d++) {
            VT qd = (VT){0} + q[d];
            const VT *k = (const VT *)(kt + (size_t)d * cap + t);
            for (int i = 0; i < runs; i++) a[i] += qd * k[i];
        }
        VT *o = (VT *)(sc + t);
        for (int i = 0; i < runs; i++) o[i] = a[i] * scale;
    }
#else
    for (; t < T; t += KEYS) {
        int m = T - t < KEYS ? T - t : KEYS;
        float acc[KEYS] = {0};
        for (int d = 0; d < D; d++) {
            float qd = q[d];
            const float *k = kt + (size_t)d * cap + t;
            for (int l = 0; l < m; l++) acc[l] += qd * k[l];
        }
        for (int l = 0; l < m; l++) sc[t + l] = acc[l] * scale;
    }
#endif
}

/* o[d] = sum over t < T of w[t] * V[t][d] (w = sc * inv, rounded first): even and odd t are
 * summed apart, each in order, and then added (two chains, so the adds overlap). */
static inline void FN(weigh)(const float *restrict sc, float inv, const float *restrict V, int D, int T,
                         float *restrict o)
{
    int d = 0;
#ifdef SK_VEC
    for (; d + 64 <= D; d += 64) {
        VT a[64 / VL] = {{0}}, b[64 / VL] = {{0}};
        int u = 0;
        for (; u + 2 <= T; u += 2) {
            VT w = (VT){0} + sc[u] * inv, x = (VT){0} + sc[u + 1] * inv;
            const VT *v = (const VT *)(V + (size_t)u * D + d), *y = (const VT *)(V + (size_t)(u + 1) * D + d);
            for (int i = 0; i < 64 / VL; i++) {
                a[i] += w * v[i];
                b[i] += x * y[i];
            }
        }
        if (u < T) {
            VT w = (VT){0} + sc[u] * inv;
            const VT *v = (const VT *)(V + (size_t)u * D + d);
            for (int i = 0; i < 64 / VL; i++) a[i] += w * v[i];
        }
        VT *out = (VT *)(o + d);
        for (int i = 0; i < 64 / VL; i++) out[i] = a[i] + b[i];
    }
#endif
    if (d == D) return;
    float a[1024], b[1024];   /* the columns the vector loop did not take (all D <= 1024 without it) */
    int n = D - d, u = 0;
    for (int e = 0; e < n; e++) a[e] = b[e] = 0.0f;
    for (; u + 2 <= T; u += 2) {
        float w = sc[u] * inv, x = sc[u + 1] * inv;
        const float *v = V + (size_t)u * D + d, *y = V + (size_t)(u + 1) * D + d;
        for (int e = 0; e < n; e++) {
            a[e] += w * v[e];
            b[e] += x * y[e];
        }
    }
    if (u < T) {
        float w = sc[u] * inv;
        const float *v = V + (size_t)u * D + d;
        for (int e = 0; e < n; e++) a[e] += w * v[e];
    }
    for (int e = 0; e < n; e++) o[d + e] = a[e] + b[e];
}

/* e^(sc[t] - max) in place for t < T; returns 1 / their sum (lanes of LANES, folded in a fixed tree). */
static inline float FN(softmax)(float *restrict sc, int T)
{
    float mx[LANES];
    for (int l = 0; l < LANES; l++) mx[l] = -INFINITY;
    int t = 0;
    for (; t + LANES <= T; t += LANES)
        for (int l = 0; l < LANES; l++) mx[l] = sc[t + l] > mx[l] ? sc[t + l] : mx[l];
    for (int l = 0; t + l < T; l++) mx[l] = sc[t + l] > mx[l] ? sc[t + l] : mx[l];
    float m = mx[0];
    for (int l = 1; l < LANES; l++) m = mx[l] > m ? mx[l] : m;
    for (t = 0; t < T; t++) sc[t] = sk_expf(sc[t] - m);
    float acc[LANES] = {0};
    for (t = 0; t + LANES <= T; t += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += sc[t + l];
    for (int l = 0; t + l < T; l++) acc[l] += sc[t + l];
    return 1.0f / fold(acc);
}

#ifdef SK_VEC
/* The query heads that share a kv head, GH at a time: each key vector (and value vector) loaded
 * once serves all of them, instead of once per head from L2. Per (head, key) and (head, column)
 * the operations are exactly those of scores() and weigh() above, in the same order, so the bits
 * are the same; only the loops are interleaved. GH and GK keep the accumulators in registers. */
#define GH (VL == 16 ? 4 : 2)   /* query heads per pass */
#define GK (4 * VL)             /* keys per pass of the scores */
#if VL == 16   /* x in every lane: one broadcast load, no arithmetic (x is a plain float lvalue) */
#define BCAST(x) ((VT){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x})
#else
#define BCAST(x) ((VT){x, x, x, x, x, x, x, x})
#endif

/* sc + h * ss: scores of head h (q + h * D, already 0 + q as scores() broadcasts it) for t < T;
 * as scores(), the last run of 16 may read keys past T and write sc[T..]. */
static inline __attribute__((always_inline)) void FN(scores_g)(const float *restrict q, int nq, const float *restrict kt,
                                                                int cap, int D, int T, float scale,
                                                                float *restrict sc, size_t ss)
{
    int t = 0;
    for (; t + GK <= T; t += GK) {
        VT acc[GH][GK / VL];
        for (int h = 0; h < nq; h++)
            for (int i = 0; i < GK / VL; i++) acc[h][i] = (VT){0};
        for (int d = 0; d < D; d++) {
            const VT *k = (const VT *)(kt + (size_t)d * cap + t);
            VT kv[GK / VL];
            for (int i = 0; i < GK / VL; i++) kv[i] = k[i];
            for (int h = 0; h < nq; h++) {
                VT qd = BCAST(q[h * D + d]);
                for (int i = 0; i < GK / VL; i++) acc[h][i] += qd * kv[i];
            }
        }
        for (int h = 0; h < nq; h++) {
            VT *o = (VT *)(sc + h * ss + t);
            for (int i = 0; i < GK / VL; i++) o[i] = acc[h][i] * scale;
        }
    }
    int runs = (T - t + 15) / 16 * (16 / VL);   /* vectors of the last whole runs of 16 keys (< GK / VL + 1) */
    if (runs > 0) {
        VT acc[GH][GK / VL];
        for (int h = 0; h < nq; h++)
            for (int i = 0; i < runs; i++) acc[h][i] = (VT){0};
        for (int d = 0; d < D; d++) {
            const VT *k = (const VT *)(kt + (size_t)d * cap + t);
            for (int h = 0; h < nq; h++) {
                VT qd = BCAST(q[h * D + d]);
                for (int i = 0; i < runs; i++) acc[h][i] += qd * k[i];
            }
        }
        for (int h = 0; h < nq; h++) {
            VT *o = (VT *)(sc + h * ss + t);
            for (int i = 0; i < runs; i++) o[i] = acc[h][i] * scale;
        }
    }
}

/* o + h * D: head h's weighted values, its weights sc + h * ss (already sc * inv, rounded, as
 * weigh() takes them; never -0), as weigh(): even and odd keys summed apart, each in order, then
 * added. */
static inline __attribute__((always_inline)) void FN(weigh_g)(const float *restrict sc, size_t ss, int nq,
                                                               const float *restrict V, int D, int T,
                                                               float *restrict o)
{
    int d = 0;
    for (; d + 2 * VL <= D; d += 2 * VL) {
        VT a[GH][2], b[GH][2];
        for (int h = 0; h < nq; h++) a[h][0] = a[h][1] = b[h][0] = b[h][1] = (VT){0};
        int u = 0;
        for (; u + 2 <= T; u += 2) {
            const VT *v = (const VT *)(V + (size_t)u * D + d), *y = (const VT *)(V + (size_t)(u + 1) * D + d);
            VT v0 = v[0], v1 = v[1], y0 = y[0], y1 = y[1];
            for (int h = 0; h < nq; h++) {
                VT w = BCAST(sc[h * ss + u]), x = BCAST(sc[h * ss + u + 1]);
                a[h][0] += w * v0;
                a[h][1] += w * v1;
                b[h][0] += x * y0;
                b[h][1] += x * y1;
            }
        }
        if (u < T) {
            const VT *v = (const VT *)(V + (size_t)u * D + d);
            VT v0 = v[0], v1 = v[1];
            for (int h = 0; h < nq; h++) {
                VT w = BCAST(sc[h * ss + u]);
                a[h][0] += w * v0;
                a[h][1] += w * v1;
            }
        }
        for (int h = 0; h < nq; h++) {
            VT *out = (VT *)(o + (size_t)h * D + d);
            out[0] = a[h][0] + b[h][0];
            out[1] = a[h][1] + b[h][1];
        }
    }
    for (int h = 0; d < D && h < nq; h++) {   /* the columns left, one head at a time */
        float a[2 * VL], b[2 * VL];
        int n = D - d, u = 0;
        const float *w = sc + h * ss;
        for (int e = 0; e < n; e++) a[e] = b[e] = 0.0f;
        for (; u + 2 <= T; u += 2) {
            float wu = w[u], xu = w[u + 1];
            const float *v = V + (size_t)u * D + d, *y = V + (size_t)(u + 1) * D + d;
            for (int e = 0; e < n; e++) {
                a[e] += wu * v[e];
                b[e] += xu * y[e];
            }
        }
        if (u < T) {
            float wu = w[u];
            const float *v = V + (size_t)u * D + d;
            for (int e = 0; e < n; e++) a[e] += wu * v[e];
        }
        for (int e = 0; e < n; e++) o[(size_t)h * D + d + e] = a[e] + b[e];
    }
}

/* attend_head for every query head of kv head g (heads g * grp .. (g + 1) * grp - 1), GH at a
 * time. sc: GH * ss floats of scratch, ss >= p + 1 rounded up to 16. */
VEC_TARGET
static void FN(attend_group)(const attn_shape *a, const float *restrict h, const float *restrict cs,
                             const float *restrict sn, int p, int g, const float *kc, const float *vc,
                             float *restrict sc, size_t ss, float *restrict att)
{
    int D = a->D, grp = a->nh / a->kvh, T = p + 1;
    size_t plane = (size_t)a->cap * D;
    float q[GH * 1024];
    const float *K = kc + ((size_t)a->layer * a->kvh + g) * plane;
    const float *V = vc + ((size_t)a->layer * a->kvh + g) * plane;
    for (int j = g * grp; j < (g + 1) * grp; j += GH) {
        int nq = (g + 1) * grp - j < GH ? (g + 1) * grp - j : GH;
        for (int k = 0; k < nq; k++) {
            float *qk = q + (size_t)k * D;
            rope_head(h + (size_t)(j + k) * D, cs, sn, D / 2, qk);
            for (int d = 0; d < D; d++) qk[d] = 0.0f + qk[d];   /* scores() broadcasts 0 + q[d] */
        }
        switch (nq) {   /* a constant count each, so the head loops unroll */
        case 1: FN(scores_g)(q, 1, K, a->cap, D, T, a->scale, sc, ss); break;
#if GH >= 2
        case 2: FN(scores_g)(q, 2, K, a->cap, D, T, a->scale, sc, ss); break;
#endif
#if GH >= 4
        case 3: FN(scores_g)(q, 3, K, a->cap, D, T, a->scale, sc, ss); break;
        case 4: FN(scores_g)(q, 4, K, a->cap, D, T, a->scale, sc, ss); break;
#endif
        }
        for (int k = 0; k < nq; k++) {   /* weigh()'s weights: sc * inv, rounded (exp > 0: never -0) */
            float *w = sc + k * ss, inv = FN(softmax)(w, T);
            for (int t = 0; t < T; t++) w[t] = w[t] * inv;
        }
        float *o = att + (size_t)j * D;
        switch (nq) {
        case 1: FN(weigh_g)(sc, ss, 1, V, D, T, o); break;
#if GH >= 2
        case 2: FN(weigh_g)(sc, ss, 2, V, D, T, o); break;
#endif
#if GH >= 4
        case 3: FN(weigh_g)(sc, ss, 3, V, D, T, o); break;
        case 4: FN(weigh_g)(sc, ss, 4, V, D, T, o); break;
#endif
        }
    }
}
#undef GH
#undef GK
#undef BCAST
#endif

/* att = softmax(q K^T * scale) V over cache positions 0..p for query head j (it reads kv head
 * j / (nh / kvh)), q roped from h; the cache holds this row's k, v and every earlier position's.
 * sc: p + 1 floats of scratch (rounded up to 16). att: the row's nh * D outputs. */
VEC_TARGET
static void FN(attend_head)(const attn_shape *a, const float *restrict h, const float *restrict cs,
                        const float *restrict sn, int p, int j, const float *kc, const float *vc,
                        float *restrict sc, float *restrict att)
{
    int D = a->D, grp = a->nh / a->kvh, T = p + 1;
    size_t plane = (size_t)a->cap * D;
    float q[1024];
    const float *K = kc + ((size_t)a->layer * a->kvh + j / grp) * plane;
    const float *V = vc + ((size_t)a->layer * a->kvh + j / grp) * plane;
    rope_head(h + (size_t)j * D, cs, sn, D / 2, q);
    FN(scores)(q, K, a->cap, D, T, a->scale, sc);
    FN(weigh)(sc, FN(softmax)(sc, T), V, D, T, att + (size_t)j * D);
}

