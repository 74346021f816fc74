/* The SIMD level and the portable level of the CPU table must agree: two tables, one created with
 * STRATA_CPU_ISA=generic, one with the detected level, run the same F32 inputs through every op
 * that has per-ISA kernels. Both are float computations with different operation order, FMA and
 * exp implementations: 1e-5 relative + 1e-6 absolute (outputs are O(1)). Skips (77) on a CPU
 * without AVX2+FMA, where the two tables would be the same code. */
#include "test_ops_common.h"

static const st_ops *gen, *simd;

static double *widen(const float *x, int64_t n) {
  double *y = test_zerosd(n);
  for (int64_t i = 0; i < n; i++) y[i] = x[i];
  return y;
}

/* run `call` on both tables into two float buffers and compare them */
#define BOTH(what, n, out_g, out_s, call_g, call_s)                                                \
  do {                                                                                             \
    CHECK((call_g) == ST_OK);                                                                      \
    CHECK((call_s) == ST_OK);                                                                      \
    double *ref_ = widen(out_g, n);                                                                \
    CLOSE_F(what, out_s, ref_, n, 1e-5, 1e-6);                                                     \
    free(ref_);                                                                                    \
  } while (0)

static void test_elementwise(void) {
  const int64_t n = 10007;
  test_rng rg = {1};
  double *xd = test_randd(&rg, n, -8, 8), *yd = test_randd(&rg, n, -1, 1);
  float *x = test_tof(xd, n), *y = test_tof(yd, n), *a = test_zerosf(n), *b = test_zerosf(n);
  BOTH("add", n, a, b, gen->add(gen, ST_F32, x, y, a, n), simd->add(simd, ST_F32, x, y, b, n));
  BOTH("mul", n, a, b, gen->mul(gen, ST_F32, x, y, a, n), simd->mul(simd, ST_F32, x, y, b, n));
  memcpy(a, y, sizeof(float) * n);
  memcpy(b, y, sizeof(float) * n);
  BOTH("axpy", n, a, b, gen->axpy(gen, ST_F32, n, 0.3, x, a), simd->axpy(simd, ST_F32, n, 0.3, x, b));
  BOTH("scale", n, a, b, gen->scale(gen, ST_F32, a, n, -1.5), simd->scale(simd, ST_F32, b, n, -1.5));
  double s1 = 0, s2 = 0;
  CHECK(gen->sumsq(gen, ST_F32, x, n, &s1) == ST_OK && simd->sumsq(simd, ST_F32, x, n, &s2) == ST_OK);
  CHECK_CLOSE(s2, s1, 1e-12, 0);
  for (int k = 0; k <= ST_GELU_ERF; k++) {
    BOTH("gelu fwd", n, a, b, gen->gelu_forward(gen, ST_F32, (st_gelu_kind)k, x, a, n),
         simd->gelu_forward(simd, ST_F32, (st_gelu_kind)k, x, b, n));
    BOTH("gelu bwd", n, a, b, gen->gelu_backward(gen, ST_F32, (st_gelu_kind)k, x, y, a, n),
         simd->gelu_backward(simd, ST_F32, (st_gelu_kind)k, x, y, b, n));
  }
  BOTH("silu fwd", n, a, b, gen->silu_forward(gen, ST_F32, x, a, n), simd->silu_forward(simd, ST_F32, x, b, n));
  BOTH("silu bwd", n, a, b, gen->silu_backward(gen, ST_F32, x, y, a, n), simd->silu_backward(simd, ST_F32, x, y, b, n));
  /* swiglu: x as [rows, 2 * 77] */
  const int64_t rows = 64, cols = 77;
  BOTH("swiglu fwd", rows * cols, a, b, gen->swiglu_forward(gen, ST_F32, x, a, rows, cols),
       simd->swiglu_forward(simd, ST_F32, x, b, rows, cols));
  BOTH("swiglu bwd", rows * 2 * cols, a, b, gen->swiglu_backward(gen, ST_F32, x, y, a, rows, cols),
       simd->swiglu_backward(simd, ST_F32, x, y, b, rows, cols));
  free(xd); free(yd); free(x); free(y); free(a); free(b);
}

static void test_norms(void) {
  const int64_t rows = 37, cols = 301, n = rows * cols;
  test_rng rg = {2};
  double *xd = test_randd(&rg, n, -2, 3), *dyd = test_randd(&rg, n, -1, 1), *wd = test_randd(&rg, cols, 0.5, 1.5);
  float *x = test_tof(xd, n), *dy = test_tof(dyd, n), *w = test_tof(wd, cols);
  float *ya = test_zerosf(n), *yb = test_zerosf(n), *ma = test_zerosf(rows), *mb = test_zerosf(rows);
  float *ra = test_zerosf(rows), *rb = test_zerosf(rows), *dwa = test_zerosf(cols), *dwb = test_zerosf(cols);
  BOTH("ln fwd", n, ya, yb, gen->layernorm_forward(gen, ST_F32, x, ya, ma, ra, rows, cols, 1e-5),
       simd->layernorm_forward(simd, ST_F32, x, yb, mb, rb, rows, cols, 1e-5));
  BOTH("ln bwd", n, ya, yb, gen->layernorm_backward(gen, ST_F32, dy, x, ma, ra, ya, rows, cols),
       simd->layernorm_backward(simd, ST_F32, dy, x, ma, ra, yb, rows, cols));
  BOTH("rms fwd", n, ya, yb, gen->rmsnorm_forward(gen, ST_F32, x, w, ya, ra, rows, cols, 1e-6),
       simd->rmsnorm_forward(simd, ST_F32, x, w, yb, rb, rows, cols, 1e-6));
  BOTH("rms bwd", n, ya, yb, gen->rmsnorm_backward(gen, ST_F32, dy, x, w, ra, ya, dwa, rows, cols),
       simd->rmsnorm_backward(simd, ST_F32, dy, x, w, ra, yb, dwb, rows, cols));
  double *ref = widen(dwa, cols);
  CLOSE_F("rms dw", dwb, ref, cols, 1e-5, 1e-5);
  free(ref); free(xd); free(dyd); free(wd); free(x); free(dy); free(w); free(ya); free(yb); free(ma); free(mb);
  free(ra); free(rb); free(dwa); free(dwb);
}

static void test_attention(void) {
  const int64_t B = 1, S = 67, H = 4, KVH = 2, d = 16, nq = B * S * H * d, nk = B * S * KVH * d;
  test_rng rg = {3};
  double *qd = test_randd(&rg, nq, -2, 2), *kd = test_randd(&rg, nk, -2, 2), *vd = test_randd(&rg, nk, -1, 1);
  double *dod = test_randd(&rg, nq, -1, 1);
  float *q = test_tof(qd, nq), *k = test_tof(kd, nk), *v = test_tof(vd, nk), *dout = test_tof(dod, nq);
  float *oa = test_zerosf(nq), *ob = test_zerosf(nq), *la = test_zerosf(B * H * S), *lb = test_zerosf(B * H * S);
  float *dqa = test_zerosf(nq), *dqb = test_zerosf(nq), *dka = test_zerosf(nk), *dkb = test_zerosf(nk);
  float *dva = test_zerosf(nk), *dvb = test_zerosf(nk);
  st_attn_desc da = {.dtype = ST_F32, .batch = B, .seq_q = S, .seq_k = S, .heads = H, .kv_heads = KVH, .head_dim = d,
                     .scale = 0.25, .causal = true, .q = q, .k = k, .v = v, .out = oa, .lse = la};
  st_attn_desc db = da;
  db.out = ob;
  db.lse = lb;
  BOTH("attn out", nq, oa, ob, gen->attention_forward(gen, &da), simd->attention_forward(simd, &db));
  double *ref = widen(la, B * H * S);
  CLOSE_F("attn lse", lb, ref, B * H * S, 1e-5, 1e-6);
  free(ref);
  BOTH("attn dq", nq, dqa, dqb, gen->attention_backward(gen, &da, dout, dqa, dka, dva),
       simd->attention_backward(simd, &db, dout, dqb, dkb, dvb));
  ref = widen(dka, nk);
  CLOSE_F("attn dk", dkb, ref, nk, 1e-5, 1e-5);
  free(ref);
  ref = widen(dva, nk);
  CLOSE_F("attn dv", dvb, ref, nk, 1e-5, 1e-5);
  free(ref);
  free(qd); free(kd); free(vd); free(dod); free(q); free(k); free(v); free(dout); free(oa); free(ob); free(la);
  free(lb); free(dqa); free(dqb); free(dka); free(dkb); free(dva); free(dvb);
}

static void test_adamw(void) {
  const int64_t n = 4099;
  test_rng rg = {4};
  double *pd = test_randd(&rg, n, -1, 1);
  float *pa = test_tof(pd, n), *pb = test_tof(pd, n), *ma = test_zerosf(n), *mb = test_zerosf(n);
  float *va = test_zerosf(n), *vb = test_zerosf(n);
  for (int step = 1; step <= 3; step++) {
    double *gd = test_randd(&rg, n, -1, 1);
    float *g = test_tof(gd, n);
    st_optim_desc d = {.type = ST_OPTIM_ADAMW, .n = n, .param = pa, .param_dtype = ST_F32, .grad = g,
                       .grad_dtype = ST_F32, .exp_avg = ma, .exp_avg_sq = va, .lr = 1e-3, .beta1 = 0.9,
                       .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01, .step = step, .grad_scale = 1};
    CHECK(gen->optim_update(gen, &d) == ST_OK);
    d.param = pb; d.exp_avg = mb; d.exp_avg_sq = vb;
    CHECK(simd->optim_update(simd, &d) == ST_OK);
    free(gd); free(g);
  }
  double *ref = widen(pa, n);
  CLOSE_F("adamw param", pb, ref, n, 1e-6, 1e-7);
  free(ref);
  ref = widen(va, n);
  CLOSE_F("adamw v", vb, ref, n, 1e-5, 1e-12);
  free(ref); free(pd); free(pa); free(pb); free(ma); free(mb); free(va); free(vb);
}

int main(void) {
  st_error err;
  setenv("STRATA_CPU_ISA", "sse9", 1);
  const st_ops *bad = NULL;
  CHECK(st_cpu_ops_create(1, &bad, &err) == ST_ERR_CONFIG && bad == NULL);
  CHECK_CONTAINS(err.message, "STRATA_CPU_ISA");

  setenv("STRATA_CPU_ISA", "generic", 1);
  CHECK(strcmp(st_cpu_simd_level(), "generic") == 0);
  gen = test_ops_create(2);
  CHECK(strcmp(gen->name, "cpu-generic") == 0);
  unsetenv("STRATA_CPU_ISA");
  const char *level = st_cpu_simd_level();
  simd = test_ops_create(2);
  /* the level is read at create time: changing the variable afterwards changes nothing */
  setenv("STRATA_CPU_ISA", "generic", 1);
  char want[32];
  snprintf(want, sizeof want, "cpu-%s", level);
  CHECK(strcmp(simd->name, want) == 0);
  if (strcmp(level, "generic") == 0) {
    fprintf(stderr, "test_ops_isa: this CPU has no AVX2+FMA; both tables are the portable code\n");
    st_cpu_ops_destroy(gen);
    st_cpu_ops_destroy(simd);
    return ST_TEST_SKIP;
  }
  test_elementwise();
  test_norms();
  test_attention();
  test_adamw();
  st_cpu_ops_destroy(gen);
  st_cpu_ops_destroy(simd);
  return st_test_finish("test_ops_isa");
}
