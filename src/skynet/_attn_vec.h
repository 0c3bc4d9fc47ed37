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
    FN(weigh)(sc, 1.0f / fold(acc), V, D, T, att + (size_t)j * D);
}

