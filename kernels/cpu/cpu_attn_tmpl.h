/* cpu_attn_tmpl.h — attention forward/backward for one element type; included by cpu_attn.c with
 * T, SFX, GEMM (cblas_sgemm / cblas_dgemm), EXP_SHIFT_SUM(kern, x, n, shift), SCALE_ROW(kern, x, n, a)
 * and LOGT defined.
 *
 * Per (batch, query head, block of ATTN_QB queries): S = scale Q K^T over the keys the block can
 * see (causal blocks stop early), mask, softmax row by row on the pool, O = P V. Backward recomputes
 * P = exp(S - lse) from the saved lse, then dP = dO V^T, dS = P (dP - rowsum(dO O)),
 * dQ = scale dS K, dK += scale dS^T Q, dV += P^T dO (dK, dV zeroed first: they are written). */

#define ST_ACAT2(a, b) a##_##b
#define ST_ACAT(a, b) ST_ACAT2(a, b)
#define A(name) ST_ACAT(name, SFX)

typedef struct A(attn_rows) {
  const st_attn_desc *d;
  const st_cpu_kern *k;
  int64_t b, q0, nk; /* batch, first query of the block, keys visible to the block */
  T *s;              /* [qb, nk] scores -> probabilities; in backward, dP -> dS */
  T *p;              /* backward: [qb, nk] probabilities */
  T *lse;            /* [seq_q] lse row for (b, h) */
  const T *dout, *out; /* backward: rows of this block at stride heads*d */
  int64_t h;
  bool fwd;
} A(attn_rows);

/* mask one row of scores in place; returns the number of allowed keys */
static int64_t A(mask_row)(const st_attn_desc *d, int64_t b, int64_t qi, T *row, int64_t nk) {
  int64_t lim = nk;
  if (d->causal) {
    int64_t last = qi + (d->seq_k - d->seq_q);
    if (last + 1 < lim) lim = last + 1 < 0 ? 0 : last + 1;
  }
  for (int64_t j = lim; j < nk; j++) row[j] = (T)-INFINITY;
  int64_t allowed = lim;
  if (d->key_mask || d->segment_ids) {
    const uint8_t *km = d->key_mask ? d->key_mask + b * d->seq_k : NULL;
    const int32_t *seg = d->segment_ids ? d->segment_ids + b * d->seq_k : NULL;
    int32_t my = seg ? d->segment_ids[b * d->seq_q + qi] : 0;
    for (int64_t j = 0; j < lim; j++)
      if ((km && !km[j]) || (seg && seg[j] != my)) {
        row[j] = (T)-INFINITY;
        allowed--;
      }
  }
  return allowed;
}

static void A(attn_row_task)(void *v, int64_t rb, int64_t re, int tid) {
  A(attn_rows) *c = v;
  const st_attn_desc *d = c->d;
  int64_t nk = c->nk, hd = d->head_dim, ld = d->heads * hd;
  for (int64_t r = rb; r < re; r++) {
    int64_t qi = c->q0 + r;
    if (c->fwd) {
      T *row = c->s + r * nk;
      int64_t allowed = nk ? A(mask_row)(d, c->b, qi, row, nk) : 0;
      T m = (T)-INFINITY;
      for (int64_t j = 0; j < nk; j++)
        if (row[j] > m) m = row[j];
      if (allowed == 0 || m == (T)-INFINITY) {
        for (int64_t j = 0; j < nk; j++) row[j] = 0;
        c->lse[qi] = (T)-INFINITY;
        continue;
      }
      T sum = EXP_SHIFT_SUM(c->k, row, nk, m);
      SCALE_ROW(c->k, row, nk, (T)1 / sum);
      c->lse[qi] = m + LOGT(sum);
    } else {
      T *prow = c->p + r * nk, *ds = c->s + r * nk;
      T lse = c->lse[qi];
      if (lse == (T)-INFINITY || nk == 0) {
        for (int64_t j = 0; j < nk; j++) prow[j] = ds[j] = 0;
        continue;
      }
      A(mask_row)(d, c->b, qi, prow, nk);
      EXP_SHIFT_SUM(c->k, prow, nk, lse);
      const T *dor = c->dout + ((c->b * d->seq_q + qi) * d->heads + c->h) * hd;
      const T *orow = c->out + ((c->b * d->seq_q + qi) * d->heads + c->h) * hd;
      double di = 0;
      for (int64_t t = 0; t < hd; t++) di += (double)dor[t] * (double)orow[t];
      (void)ld;
      for (int64_t j = 0; j < nk; j++) ds[j] = prow[j] * (ds[j] - (T)di);
    }
  }
}

static int64_t A(visible_keys)(const st_attn_desc *d, int64_t q_last) {
  int64_t nk = d->seq_k;
  if (d->causal) {
    int64_t last = q_last + (d->seq_k - d->seq_q);
    if (last + 1 < nk) nk = last + 1 < 0 ? 0 : last + 1;
  }
  return nk;
}

static st_result A(attn_forward)(const st_ops *self, const st_attn_desc *d) {
  const st_cpu_impl *im = st_cpu_impl_of(self);
  int64_t H = d->heads, KVH = d->kv_heads, hd = d->head_dim, Sq = d->seq_q, Sk = d->seq_k;
  int64_t qb = Sq < ATTN_QB ? Sq : ATTN_QB;
  T *s = malloc(sizeof(T) * (size_t)(qb * (Sk > 0 ? Sk : 1)));
  if (!s) return ST_ERR_OUT_OF_MEMORY;
  const T *q = d->q, *kk = d->k, *vv = d->v;
  T *out = d->out, *lse = d->lse;
  for (int64_t b = 0; b < d->batch; b++)
    for (int64_t h = 0; h < H; h++) {
      int64_t kvh = h / (H / KVH);
      for (int64_t q0 = 0; q0 < Sq; q0 += qb) {
        int64_t rows = Sq - q0 < qb ? Sq - q0 : qb;
        int64_t nk = A(visible_keys)(d, q0 + rows - 1);
        const T *qp = q + ((b * Sq + q0) * H + h) * hd;
        const T *kp = kk + (b * Sk * KVH + kvh) * hd;
        const T *vp = vv + (b * Sk * KVH + kvh) * hd;
        T *op = out + ((b * Sq + q0) * H + h) * hd;
        if (nk > 0)
          GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)nk, (int)hd, (T)d->scale, qp, (int)(H * hd),
               kp, (int)(KVH * hd), (T)0, s, (int)nk);
        A(attn_rows) c = {.d = d, .k = &im->kern, .b = b, .q0 = q0, .nk = nk, .s = s,
                          .lse = lse + (b * H + h) * Sq, .h = h, .fwd = true};
        st_pool_for(im->pool, rows, 8, A(attn_row_task), &c);
        if (nk > 0)
          GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)hd, (int)nk, (T)1, s, (int)nk, vp,
               (int)(KVH * hd), (T)0, op, (int)(H * hd));
        else
          for (int64_t r = 0; r < rows; r++) memset(op + r * H * hd, 0, sizeof(T) * (size_t)hd);
      }
    }
  free(s);
  return ST_OK;
}

static st_result A(attn_backward)(const st_ops *self, const st_attn_desc *d, const T *dout, T *dq, T *dk, T *dv) {
  const st_cpu_impl *im = st_cpu_impl_of(self);
  int64_t H = d->heads, KVH = d->kv_heads, hd = d->head_dim, Sq = d->seq_q, Sk = d->seq_k;
  int64_t qb = Sq < ATTN_QB ? Sq : ATTN_QB;
  size_t blk = (size_t)(qb * (Sk > 0 ? Sk : 1));
  T *s = malloc(sizeof(T) * blk * 2);
  if (!s) return ST_ERR_OUT_OF_MEMORY;
  T *p = s + blk;
  const T *q = d->q, *kk = d->k, *vv = d->v;
  memset(dk, 0, sizeof(T) * (size_t)(d->batch * Sk * KVH * hd));
  memset(dv, 0, sizeof(T) * (size_t)(d->batch * Sk * KVH * hd));
  for (int64_t b = 0; b < d->batch; b++)
    for (int64_t h = 0; h < H; h++) {
      int64_t kvh = h / (H / KVH);
      for (int64_t q0 = 0; q0 < Sq; q0 += qb) {
        int64_t rows = Sq - q0 < qb ? Sq - q0 : qb;
        int64_t nk = A(visible_keys)(d, q0 + rows - 1);
        const T *qp = q + ((b * Sq + q0) * H + h) * hd;
        const T *dop = dout + ((b * Sq + q0) * H + h) * hd;
        const T *kp = kk + (b * Sk * KVH + kvh) * hd;
        const T *vp = vv + (b * Sk * KVH + kvh) * hd;
        T *dkp = dk + (b * Sk * KVH + kvh) * hd, *dvp = dv + (b * Sk * KVH + kvh) * hd;
        T *dqp = dq + ((b * Sq + q0) * H + h) * hd;
        if (nk == 0) {
          for (int64_t r = 0; r < rows; r++) memset(dqp + r * H * hd, 0, sizeof(T) * (size_t)hd);
          continue;
        }
        /* p = scale Q K^T (masked and exponentiated by the row task), s = dO V^T (-> dS) */
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)nk, (int)hd, (T)d->scale, qp, (int)(H * hd), kp,
             (int)(KVH * hd), (T)0, p, (int)nk);
        GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)nk, (int)hd, (T)1, dop, (int)(H * hd), vp,
             (int)(KVH * hd), (T)0, s, (int)nk);
        A(attn_rows) c = {.d = d, .k = &im->kern, .b = b, .q0 = q0, .nk = nk, .s = s, .p = p,
                          .lse = (T *)d->lse + (b * H + h) * Sq, .dout = dout, .out = d->out, .h = h, .fwd = false};
        st_pool_for(im->pool, rows, 8, A(attn_row_task), &c);
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)hd, (int)nk, (T)d->scale, s, (int)nk, kp,
             (int)(KVH * hd), (T)0, dqp, (int)(H * hd));
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, (int)nk, (int)hd, (int)rows, (T)d->scale, s, (int)nk, qp,
             (int)(H * hd), (T)1, dkp, (int)(KVH * hd));
        GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, (int)nk, (int)hd, (int)rows, (T)1, p, (int)nk, dop, (int)(H * hd),
             (T)1, dvp, (int)(KVH * hd));
      }
    }
  free(s);
  return ST_OK;
}

#undef A
#undef ST_ACAT
#undef ST_ACAT2
