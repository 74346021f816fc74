/* Attention of the CPU table: forward (out and lse) against a naive double implementation written
 * here, backward (dq, dk, dv) against central differences of the F64 forward, F32 against F64.
 * Covers GQA (3 query heads on 1 kv head), causal with seq_q != seq_k, key masks, segment ids,
 * fully masked queries (out 0, lse -inf, zero gradients) and more queries than one block (300).
 * Tolerances: F64 forward 1e-12; FD 1e-6 relative + 1e-8; F32 1e-5 relative + 1e-5 absolute
 * (outputs are O(1); float exp and d-term dot products). */
#include "test_ops_common.h"

static const st_ops *ops;

typedef struct attn_case {
  int64_t B, Sq, Sk, H, KVH, d;
  bool causal, use_mask, use_seg;
} attn_case;

typedef struct attn_data {
  attn_case c;
  double *q, *k, *v, *out, *lse, *r;
  uint8_t *mask;
  int32_t *seg;
  st_attn_desc desc;
} attn_data;

static bool allowed(const attn_data *a, int64_t b, int64_t i, int64_t j) {
  const attn_case *c = &a->c;
  if (c->causal && j > i + (c->Sk - c->Sq)) return false;
  if (a->mask && !a->mask[b * c->Sk + j]) return false;
  if (a->seg && a->seg[b * c->Sq + i] != a->seg[b * c->Sk + j]) return false;
  return true;
}

static void naive_forward(const attn_data *a, double *out, double *lse) {
  const attn_case *c = &a->c;
  double scale = 1 / sqrt((double)c->d);
  double *s = malloc(sizeof(double) * (size_t)c->Sk);
  for (int64_t b = 0; b < c->B; b++)
    for (int64_t h = 0; h < c->H; h++) {
      int64_t kh = h / (c->H / c->KVH);
      for (int64_t i = 0; i < c->Sq; i++) {
        double m = -INFINITY;
        for (int64_t j = 0; j < c->Sk; j++) {
          s[j] = -INFINITY;
          if (!allowed(a, b, i, j)) continue;
          double dot = 0;
          for (int64_t t = 0; t < c->d; t++)
            dot += a->q[((b * c->Sq + i) * c->H + h) * c->d + t] * a->k[((b * c->Sk + j) * c->KVH + kh) * c->d + t];
          s[j] = dot * scale;
          m = fmax(m, s[j]);
        }
        double *o = out + ((b * c->Sq + i) * c->H + h) * c->d;
        for (int64_t t = 0; t < c->d; t++) o[t] = 0;
        if (m == -INFINITY) {
          lse[(b * c->H + h) * c->Sq + i] = -INFINITY;
          continue;
        }
        double z = 0;
        for (int64_t j = 0; j < c->Sk; j++) z += s[j] == -INFINITY ? 0 : exp(s[j] - m);
        for (int64_t j = 0; j < c->Sk; j++) {
          if (s[j] == -INFINITY) continue;
          double p = exp(s[j] - m) / z;
          for (int64_t t = 0; t < c->d; t++) o[t] += p * a->v[((b * c->Sk + j) * c->KVH + kh) * c->d + t];
        }
        lse[(b * c->H + h) * c->Sq + i] = m + log(z);
      }
    }
  free(s);
}

static double attn_loss(void *v) {
  attn_data *a = v;
  ops->attention_forward(ops, &a->desc);
  return test_dot(a->out, a->r, a->c.B * a->c.Sq * a->c.H * a->c.d);
}

/* FD on at most `limit` evenly spread elements of x */
static void fd_subset(attn_data *a, double *x, int64_t n, const double *grad, int64_t limit, const char *what) {
  int64_t step = n <= limit ? 1 : n / limit;
  int64_t cnt = 0;
  double *g = test_zerosd(limit + 1), *ref = test_zerosd(limit + 1);
  for (int64_t i = 0; i < n && cnt <= limit; i += step, cnt++) {
    test_fd(attn_loss, a, x + i, 1, &ref[cnt]);
    g[cnt] = grad[i];
  }
  CLOSE_D(what, g, ref, cnt, 1e-6, 1e-8);
  free(g);
  free(ref);
}

static void run_case(attn_case c, int64_t fd_limit) {
  test_rng rg = {(uint64_t)(c.Sq * 131 + c.Sk * 7 + c.H + c.causal * 3 + c.use_mask * 5 + c.use_seg * 11)};
  int64_t nq = c.B * c.Sq * c.H * c.d, nk = c.B * c.Sk * c.KVH * c.d, nl = c.B * c.H * c.Sq;
  attn_data a = {.c = c};
  a.q = test_randd(&rg, nq, -1.5, 1.5);
  a.k = test_randd(&rg, nk, -1.5, 1.5);
  a.v = test_randd(&rg, nk, -1, 1);
  a.r = test_randd(&rg, nq, -1, 1);
  a.out = test_zerosd(nq);
  a.lse = test_zerosd(nl);
  int64_t fully_masked_b = -1, fully_masked_i = -1;
  if (c.use_mask) {
    a.mask = malloc((size_t)(c.B * c.Sk));
    for (int64_t i = 0; i < c.B * c.Sk; i++) a.mask[i] = (i * 7 % 5) != 0;
  }
  if (c.use_seg) {
    a.seg = malloc(sizeof(int32_t) * (size_t)(c.B * c.Sq));
    for (int64_t b = 0; b < c.B; b++)
      for (int64_t i = 0; i < c.Sq; i++) a.seg[b * c.Sq + i] = (int32_t)(i * 3 / c.Sq + b);
    if (a.mask) { /* mask every key of batch 1's first segment: its queries see nothing */
      for (int64_t j = 0; j < c.Sk; j++)
        if (a.seg[1 * c.Sq + j] == a.seg[1 * c.Sq]) a.mask[1 * c.Sk + j] = 0;
      fully_masked_b = 1;
      fully_masked_i = 0;
    }
  }
  a.desc = (st_attn_desc){.dtype = ST_F64, .batch = c.B, .seq_q = c.Sq, .seq_k = c.Sk, .heads = c.H,
                          .kv_heads = c.KVH, .head_dim = c.d, .scale = 1 / sqrt((double)c.d), .causal = c.causal,
                          .key_mask = a.mask, .segment_ids = a.seg, .q = a.q, .k = a.k, .v = a.v, .out = a.out,
                          .lse = a.lse};
  double *ref_out = test_zerosd(nq), *ref_lse = test_zerosd(nl);
  naive_forward(&a, ref_out, ref_lse);
  CHECK(ops->attention_forward(ops, &a.desc) == ST_OK);
  CLOSE_D("attn out f64", a.out, ref_out, nq, 1e-12, 1e-13);
  int64_t n_inf = 0;
  for (int64_t i = 0; i < nl; i++) {
    if (ref_lse[i] == -INFINITY) {
      n_inf++;
      CHECK(a.lse[i] == -INFINITY);
      ref_lse[i] = a.lse[i] = 0; /* so the closeness check below sees finite numbers */
    }
  }
  CLOSE_D("attn lse f64", a.lse, ref_lse, nl, 1e-12, 1e-13);
  if (fully_masked_b >= 0 || (c.causal && c.Sq > c.Sk)) CHECK_MSG(n_inf > 0, "case meant to have fully masked rows");
  if (fully_masked_b >= 0) {
    const double *o = a.out + ((fully_masked_b * c.Sq + fully_masked_i) * c.H) * c.d;
    for (int64_t t = 0; t < c.H * c.d; t++) CHECK(o[t] == 0);
  }
  ops->attention_forward(ops, &a.desc); /* restore the real lse for backward */

  double *dq = test_zerosd(nq), *dk = test_randd(&rg, nk, -1, 1), *dv = test_randd(&rg, nk, -1, 1);
  CHECK(ops->attention_backward(ops, &a.desc, a.r, dq, dk, dv) == ST_OK); /* dk, dv garbage in: written */
  /* FD needs the forward to rewrite out each time; save the op's out/lse first */
  double *out_keep = test_dupd(a.out, nq), *lse_keep = test_dupd(a.lse, nl);
  fd_subset(&a, a.q, nq, dq, fd_limit, "attn dq vs fd");
  fd_subset(&a, a.k, nk, dk, fd_limit, "attn dk vs fd");
  fd_subset(&a, a.v, nk, dv, fd_limit, "attn dv vs fd");
  if (fully_masked_b >= 0) {
    const double *g = dq + ((fully_masked_b * c.Sq + fully_masked_i) * c.H) * c.d;
    for (int64_t t = 0; t < c.H * c.d; t++) CHECK(g[t] == 0);
  }

  /* F32 against F64 */
  float *qf = test_tof(a.q, nq), *kf = test_tof(a.k, nk), *vf = test_tof(a.v, nk), *rf = test_tof(a.r, nq);
  float *of = test_zerosf(nq), *lf = test_zerosf(nl), *dqf = test_zerosf(nq), *dkf = test_zerosf(nk), *dvf = test_zerosf(nk);
  st_attn_desc df = a.desc;
  df.dtype = ST_F32;
  df.q = qf; df.k = kf; df.v = vf; df.out = of; df.lse = lf;
  CHECK(ops->attention_forward(ops, &df) == ST_OK);
  CLOSE_F("attn out f32", of, out_keep, nq, 1e-5, 1e-5);
  for (int64_t i = 0; i < nl; i++) {
    if (lse_keep[i] == -INFINITY) CHECK(lf[i] == -INFINITY);
    else CHECK_CLOSE(lf[i], lse_keep[i], 1e-5, 1e-5);
  }
  CHECK(ops->attention_backward(ops, &df, rf, dqf, dkf, dvf) == ST_OK);
  CLOSE_F("attn dq f32", dqf, dq, nq, 1e-5, 1e-5);
  CLOSE_F("attn dk f32", dkf, dk, nk, 1e-5, 1e-5);
  CLOSE_F("attn dv f32", dvf, dv, nk, 1e-5, 1e-5);

  free(qf); free(kf); free(vf); free(rf); free(of); free(lf); free(dqf); free(dkf); free(dvf);
  free(a.q); free(a.k); free(a.v); free(a.r); free(a.out); free(a.lse); free(a.mask); free(a.seg);
  free(ref_out); free(ref_lse); free(dq); free(dk); free(dv); free(out_keep); free(lse_keep);
}

int main(void) {
  ops = test_ops_create(2);
  /*        B  Sq  Sk  H KVH d  causal mask  seg */
  run_case((attn_case){2, 7, 7, 3, 1, 5, false, false, false}, 1000);
  run_case((attn_case){2, 7, 7, 3, 1, 5, true, false, false}, 1000);
  run_case((attn_case){2, 9, 9, 3, 1, 4, true, true, true}, 1000);   /* with a fully masked query */
  run_case((attn_case){2, 9, 9, 4, 2, 4, false, true, true}, 1000);
  run_case((attn_case){2, 5, 3, 2, 2, 4, true, false, false}, 1000);  /* causal, seq_q > seq_k */
  run_case((attn_case){1, 3, 8, 2, 1, 6, true, true, false}, 1000);   /* causal, seq_q < seq_k */
  run_case((attn_case){2, 300, 300, 2, 1, 8, true, true, false}, 40); /* two query blocks */
  /* errors */
  st_attn_desc d = {.dtype = ST_F32, .batch = 1, .seq_q = 1, .seq_k = 1, .heads = 3, .kv_heads = 2, .head_dim = 4};
  float x[16];
  d.q = d.k = d.v = x; d.out = d.lse = x;
  CHECK(ops->attention_forward(ops, &d) == ST_ERR_INVALID_ARGUMENT); /* 2 does not divide 3 */
  d.dtype = ST_BF16;
  d.kv_heads = 1;
  CHECK(ops->attention_forward(ops, &d) == ST_ERR_UNSUPPORTED);
  st_cpu_ops_destroy(ops);
  return st_test_finish("test_ops_attention");
}
