/* test_qwen_image.c — the qwen_image model plugin against diffusers.
 *
 * The fixture (tools/reference/qwen_image_fixture.py) holds the tiny Qwen-Image config run by
 * diffusers in float64: inputs, prediction, loss, every parameter gradient and the parameters
 * after 3 torch AdamW steps. This test dlopens the built plugin, runs its units forward / loss /
 * backward over the CPU ops table in float64 and float32 and compares per tensor; checks that the
 * last block's dead text tail gets exactly zero gradient; replays the 3 AdamW steps through the
 * host's optimizer; checks gradients (base and LoRA) against central finite differences in
 * float64; and checks the 20B preset's parameter count, config errors, init determinism,
 * synthetic samples and the exporters.
 *
 * Usage: test_qwen_image MODULE.so FIXTURE.safetensors */
#include <dlfcn.h>

#include "cpu_ops.h"
#include "model_test.h"

/* loads "<prefix><name>" for every non-LoRA parameter; returns how many were missing */
static int load_params(qrun *r, const char *prefix) {
  int missing = 0;
  for (int u = 0; u < r->d->n_units; u++)
    for (int k = 0; k < r->d->units[u].n_params; k++) {
      const st_param_desc *p = &r->d->units[u].params[k];
      if (p->flags & ST_PARAM_LORA) continue;
      char name[600];
      snprintf(name, sizeof name, "%s%s", prefix, p->name);
      const st_st_entry *e = st_safetensors_find(FX, name);
      if (!e || numel(e->shape, e->ndim) != numel(p->shape, p->ndim)) {
        fprintf(stderr, "fixture lacks %s (or its size differs)\n", name);
        missing++;
        continue;
      }
      for (int64_t i = 0; i < numel(p->shape, p->ndim); i++) set(r->dt, r->P[u][k].data, i, fx_at(e, i));
    }
  return missing;
}

/* ---- the fixture batch as samples ---- */
typedef struct fbatch {
  st_sample samples[2];
  st_tensor t[2][5];
  const char *names[5];
  double *buf[2][5];
} fbatch;

/* padded_mask: sample 1 carries all 7 rows and a 0/1 mask; otherwise only its 4 valid rows */
static void fbatch_make(fbatch *fb, bool padded_mask) {
  static const char *names[5] = {"latents", "prompt_emb", "prompt_mask", "noise", "sigma"};
  memset(fb, 0, sizeof *fb);
  const st_st_entry *lat = fx("in.latents"), *pe = fx("in.prompt_emb"), *mk = fx("in.prompt_mask");
  const st_st_entry *nz = fx("in.noise"), *sg = fx("in.sigma");
  int64_t C = lat->shape[1], H = lat->shape[2], W = lat->shape[3], NT = pe->shape[1], J = pe->shape[2];
  for (int i = 0; i < 2; i++) {
    int64_t nt = NT;
    if (!padded_mask)
      for (nt = 0; nt < NT && fx_at(mk, i * NT + nt) != 0; nt++) {
      }
    int64_t n[5] = {C * H * W, nt * J, nt, C * H * W, 1};
    for (int j = 0; j < 5; j++) fb->buf[i][j] = malloc(sizeof(double) * (size_t)n[j]);
    for (int64_t q = 0; q < C * H * W; q++) {
      fb->buf[i][0][q] = fx_at(lat, i * C * H * W + q);
      fb->buf[i][3][q] = fx_at(nz, i * C * H * W + q);
    }
    for (int64_t q = 0; q < nt * J; q++) fb->buf[i][1][q] = fx_at(pe, i * NT * J + q);
    for (int64_t q = 0; q < nt; q++) fb->buf[i][2][q] = fx_at(mk, i * NT + q);
    fb->buf[i][4][0] = fx_at(sg, i);
    fb->t[i][0] = st_tensor_make(fb->buf[i][0], ST_F64, CPU, 3, (int64_t[]){C, H, W});
    fb->t[i][1] = st_tensor_make(fb->buf[i][1], ST_F64, CPU, 2, (int64_t[]){nt, J});
    fb->t[i][2] = st_tensor_make(fb->buf[i][2], ST_F64, CPU, 1, (int64_t[]){nt});
    fb->t[i][3] = st_tensor_make(fb->buf[i][3], ST_F64, CPU, 3, (int64_t[]){C, H, W});
    fb->t[i][4] = st_tensor_make(fb->buf[i][4], ST_F64, CPU, 0, NULL);
    fb->samples[i] = (st_sample){.id = i ? "fixture/1" : "fixture/0", .n_tensors = 5, .names = names,
                                 .tensors = fb->t[i]};
  }
}

static void fbatch_free(fbatch *fb) {
  for (int i = 0; i < 2; i++)
    for (int j = 0; j < 5; j++) free(fb->buf[i][j]);
}

/* one step: forward every unit, loss, and (when backward) every unit's backward. Scratch and
 * gradient carries start as NaN so that reading anything unwritten poisons the result. pred (if
 * not NULL) receives the prediction as doubles. */
static uint64_t step_seed = 1234; /* draws sigma/noise for samples that do not pin them */

static st_result step(qrun *r, const st_sample *samples, int n, bool backward, double *loss, double *pred,
                      st_error *err) {
  st_batch batch = {.n_samples = n, .samples = samples, .seed = step_seed, .training = true};
  void *bctx = NULL;
  ST_CHECK(PL->batch_prepare(r->ctx, &batch, &bctx, err));
  int U = r->d->n_units;
  st_carry_layout *lay = calloc((size_t)U + 1, sizeof *lay);
  st_tensor(*carry)[ST_MAX_CARRY] = calloc((size_t)U + 1, sizeof *carry);
  st_tensor(*dcarry)[ST_MAX_CARRY] = calloc((size_t)U + 1, sizeof *dcarry);
  void **saved = calloc((size_t)U, sizeof *saved);
  void *work = NULL;
  size_t work_max = 0;
  st_result res = ST_OK;
  for (int b = 0; b <= U && res == ST_OK; b++) {
    res = PL->carry_layout(r->ctx, bctx, b, &lay[b], err);
    for (int i = 0; res == ST_OK && i < lay[b].n; i++) {
      carry[b][i] = dcarry[b][i] = lay[b].t[i];
      carry[b][i].data = malloc(st_tensor_nbytes(&lay[b].t[i]) + 8);
      dcarry[b][i].data = malloc(st_tensor_nbytes(&lay[b].t[i]) + 8);
      for (int64_t q = 0; q < st_tensor_numel(&lay[b].t[i]); q++) set(r->dt, dcarry[b][i].data, q, NAN);
    }
  }
  for (int u = 0; u < U && res == ST_OK; u++) {
    size_t sb = 0, wb = 0;
    res = PL->unit_memory(r->ctx, bctx, u, &sb, &wb, err);
    saved[u] = malloc(sb + 8);
    if (wb > work_max) work_max = wb;
  }
  if (res == ST_OK) {
    work = malloc(work_max + 8);
    for (size_t q = 0; q < work_max / st_dtype_size(r->dt); q++) set(r->dt, work, (int64_t)q, NAN);
  }
  for (int u = 0; u < U && res == ST_OK; u++)
    res = PL->unit_forward(r->ctx, bctx, u, r->P[u], carry[u], carry[u + 1], saved[u], work, err);
  st_loss l = {0};
  if (res == ST_OK) res = qrun_loss(r, bctx, carry[U], backward ? dcarry[U] : NULL, &l, err);
  if (loss) *loss = l.loss;
  if (res == ST_OK && pred)
    for (int64_t q = 0; q < st_tensor_numel(&carry[U][0]); q++) pred[q] = get(r->dt, carry[U][0].data, q);
  for (int u = U - 1; u >= 0 && backward && res == ST_OK; u--)
    res = PL->unit_backward(r->ctx, bctx, u, r->P[u], r->G[u], carry[u], saved[u], dcarry[u + 1],
                            u ? dcarry[u] : NULL, work, err);
  for (int b = 0; b <= U; b++)
    for (int i = 0; i < lay[b].n; i++) {
      free(carry[b][i].data);
      free(dcarry[b][i].data);
    }
  for (int u = 0; u < U; u++) free(saved[u]);
  free(saved);
  free(work);
  free(lay);
  free(carry);
  free(dcarry);
  PL->batch_release(r->ctx, bctx);
  return res;
}

static const char *tiny_json(const char *dtype) {
  static char buf[512];
  snprintf(buf, sizeof buf, "{\"model\": {\"name\": \"qwen_image\", \"preset\": \"tiny\", \"dtype\": \"%s\"}}", dtype);
  return buf;
}

/* forward, loss and every gradient against diffusers; tolerances are relative to each tensor's
 * largest magnitude: float64 agrees to ~1e-12 (the fixture's parameters are exact), the 1e-9
 * bound leaves room for summation order; float32 outputs 1e-5 and gradients 1e-4 (accumulated
 * rounding through 2 blocks of float32 GEMMs and softmax). */
static void test_against_fixture(const char *dtype, double tol_out, double tol_grad) {
  st_error err_ = {0}, *err = &err_;
  qrun r;
  CHECK_OK(qrun_open(&r, tiny_json(dtype), err), err);
  if (!r.ctx) return;
  CHECK(load_params(&r, "param.") == 0);
  fbatch fb;
  fbatch_make(&fb, false);
  const st_st_entry *pe = fx("out.pred"), *le = fx("out.loss");
  int64_t npred = numel(pe->shape, pe->ndim);
  double *pred = calloc((size_t)npred, sizeof *pred), loss = 0;
  zero_grads(&r);
  CHECK_OK(step(&r, fb.samples, 2, true, &loss, pred, err), err);
  double num = 0, den = 0;
  for (int64_t i = 0; i < npred; i++) {
    num = fmax(num, fabs(pred[i] - fx_at(pe, i)));
    den = fmax(den, fabs(fx_at(pe, i)));
  }
  double out_err = num / den, loss_err = fabs(loss - fx_at(le, 0)) / fabs(fx_at(le, 0));
  CHECK_MSG(out_err <= tol_out, "%s prediction rel err %.3g > %.3g", dtype, out_err, tol_out);
  CHECK_MSG(loss_err <= tol_out, "%s loss %.15g vs diffusers %.15g", dtype, loss, fx_at(le, 0));
  double gmax = 0;
  const char *worst = "";
  int n_tensors = 0;
  for (int u = 0; u < r.d->n_units; u++)
    for (int k = 0; k < r.d->units[u].n_params; k++) {
      const st_param_desc *p = &r.d->units[u].params[k];
      char name[600];
      snprintf(name, sizeof name, "grad.%s", p->name);
      const st_st_entry *ge = fx(name);
      double refmax = 0, e = tensor_rel_err(r.dt, r.G[u][k].data, ge, numel(p->shape, p->ndim), &refmax);
      if (refmax == 0) e = e > 0 ? INFINITY : 0; /* an exactly-zero reference must be matched exactly */
      CHECK_MSG(e <= tol_grad, "%s grad %s rel err %.3g > %.3g", dtype, p->name, e, tol_grad);
      if (e > gmax) {
        gmax = e;
        worst = p->name;
      }
      n_tensors++;
    }
  CHECK(n_tensors == 2 * 32 + 13); /* every parameter of the tiny model has a fixture gradient */
  fprintf(stderr, "%s: prediction rel err %.3g, loss rel err %.3g, worst of %d gradients %.3g (%s)\n", dtype, out_err,
          loss_err, n_tensors, gmax, worst);

  /* the same batch with sample 1 padded explicitly (7 rows, mask 1111000) must give the same loss */
  fbatch fb2;
  fbatch_make(&fb2, true);
  double loss2 = 0;
  CHECK_OK(step(&r, fb2.samples, 2, false, &loss2, NULL, err), err);
  CHECK_CLOSE(loss2, loss, 1e-12, 0);
  fbatch_free(&fb2);

  if (!strcmp(dtype, "fp64")) {
    /* dead text tail (pitfall 13): in the last block, everything that only feeds the dropped text
     * stream gets exactly zero gradient — and diffusers agrees */
    static const char *dead[] = {"attn.to_add_out.weight", "attn.to_add_out.bias", "txt_mlp.net.0.proj.weight",
                                 "txt_mlp.net.0.proj.bias", "txt_mlp.net.2.weight", "txt_mlp.net.2.bias",
                                 "attn.add_q_proj.weight", "attn.add_q_proj.bias", "attn.norm_added_q.weight"};
    int last = r.d->n_units - 2, live_nonzero = 0;
    for (size_t i = 0; i < sizeof dead / sizeof dead[0]; i++) {
      char name[256];
      int u, k;
      snprintf(name, sizeof name, "transformer_blocks.%d.%s", last - 1, dead[i]);
      bool found = find_param(&r, name, &u, &k);
      CHECK_MSG(found, "no parameter %s", name);
      if (!found) continue;
      double mx = 0;
      for (int64_t q = 0; q < st_tensor_numel(&r.G[u][k]); q++) mx = fmax(mx, fabs(get(r.dt, r.G[u][k].data, q)));
      CHECK_MSG(mx == 0.0, "%s has gradient %.3g, expected exactly 0", name, mx);
    }
    char name[256];
    int u, k;
    snprintf(name, sizeof name, "transformer_blocks.%d.txt_mod.1.weight", last - 1);
    CHECK(find_param(&r, name, &u, &k));
    int64_t D = r.G[u][k].shape[1];
    for (int64_t q = 0; q < 6 * D * D; q++) {
      double g = get(r.dt, r.G[u][k].data, q);
      if (q >= 2 * D * D) CHECK_MSG(g == 0.0, "txt_mod.1 row %lld (gate1/shift2/scale2/gate2) has gradient %.3g",
                                    (long long)(q / D), g);
      else live_nonzero += g != 0.0;
    }
    CHECK_MSG(live_nonzero > 0, "txt_mod.1 shift1/scale1 rows of the last block must get gradient (text K/V)");
  }
  fbatch_free(&fb);
  free(pred);
  qrun_close(&r);
}

/* Three AdamW steps through host->optim_update (torch defaults, lr 1e-3, weight decay 0.01 on
 * every tensor), recomputing the gradients at each step's parameters, against torch. Adam moments
 * are float32 in strata and the fixture stores parameters as float32, so 2e-7 absolute (updates
 * are ~1e-3) is the bound; a missing bias correction or decay term is off by >1e-5. */
static void test_adamw_replay(void) {
  st_error err_ = {0}, *err = &err_;
  qrun r;
  CHECK_OK(qrun_open(&r, tiny_json("fp64"), err), err);
  if (!r.ctx) return;
  CHECK(load_params(&r, "param.") == 0);
  fbatch fb;
  fbatch_make(&fb, false);
  int U = r.d->n_units;
  float **m1 = calloc((size_t)U * 64, sizeof *m1), **m2 = calloc((size_t)U * 64, sizeof *m2);
  for (int u = 0; u < U; u++)
    for (int k = 0; k < r.d->units[u].n_params; k++) {
      m1[u * 64 + k] = calloc((size_t)st_tensor_numel(&r.P[u][k]), sizeof(float));
      m2[u * 64 + k] = calloc((size_t)st_tensor_numel(&r.P[u][k]), sizeof(float));
    }
  double worst = 0;
  for (int s = 1; s <= 3; s++) {
    zero_grads(&r);
    double loss = 0;
    CHECK_OK(step(&r, fb.samples, 2, true, &loss, NULL, err), err);
    char name[600];
    snprintf(name, sizeof name, "step%d.loss", s);
    CHECK_CLOSE(loss, fx_at(fx(name), 0), 1e-9, 0);
    for (int u = 0; u < U; u++)
      for (int k = 0; k < r.d->units[u].n_params; k++) {
        st_optim_desc od = {.n = st_tensor_numel(&r.P[u][k]), .param = r.P[u][k].data, .param_dtype = ST_F64,
                            .grad = r.G[u][k].data, .grad_dtype = ST_F64, .exp_avg = m1[u * 64 + k],
                            .exp_avg_sq = m2[u * 64 + k], .lr = 1e-3, .weight_decay = 1.0, .step = s,
                            .grad_scale = 1.0};
        CHECK_OK(HOST->optim_update(HOST, CPU, &od, err), err);
        snprintf(name, sizeof name, "step%d.%s", s, r.d->units[u].params[k].name);
        const st_st_entry *e = fx(name);
        for (int64_t q = 0; q < od.n; q++) worst = fmax(worst, fabs(get(ST_F64, r.P[u][k].data, q) - fx_at(e, q)));
      }
  }
  CHECK_MSG(worst <= 2e-7, "AdamW replay: max |param - torch| = %.3g", worst);
  fprintf(stderr, "AdamW replay: 3 steps, max |param - torch| %.3g\n", worst);
  for (int u = 0; u < U; u++)
    for (int k = 0; k < r.d->units[u].n_params; k++) {
      free(m1[u * 64 + k]);
      free(m2[u * 64 + k]);
    }
  free(m1);
  free(m2);
  fbatch_free(&fb);
  qrun_close(&r);
}

/* central differences in float64: (L(p + h) - L(p - h)) / 2h against the analytic gradient.
 * Truncation error is O(h^2 L''') ~ 1e-10 and rounding ~1e-16/h ~ 1e-11 for h = 1e-5, so a
 * relative error of 1e-6 (plus 1e-9 absolute for near-zero gradients) is a strict bound. */
static void fd_check(qrun *r, const st_sample *samples, const char *name, int64_t idx) {
  st_error err_ = {0}, *err = &err_;
  int u, k;
  if (!find_param(r, name, &u, &k)) {
    CHECK_MSG(false, "no parameter %s", name);
    return;
  }
  zero_grads(r);
  double l0;
  CHECK_OK(step(r, samples, 2, true, &l0, NULL, err), err);
  double g = get(r->dt, r->G[u][k].data, idx), p0 = get(r->dt, r->P[u][k].data, idx), h = 1e-5, lp, lm;
  set(r->dt, r->P[u][k].data, idx, p0 + h);
  CHECK_OK(step(r, samples, 2, false, &lp, NULL, err), err);
  set(r->dt, r->P[u][k].data, idx, p0 - h);
  CHECK_OK(step(r, samples, 2, false, &lm, NULL, err), err);
  set(r->dt, r->P[u][k].data, idx, p0);
  double fd = (lp - lm) / (2 * h);
  CHECK_MSG(fabs(fd - g) <= 1e-6 * fabs(fd) + 1e-9, "FD %s[%lld]: analytic %.12g, numeric %.12g", name,
            (long long)idx, g, fd);
}

static void test_finite_differences(void) {
  st_error err_ = {0}, *err = &err_;
  qrun r;
  CHECK_OK(qrun_open(&r, tiny_json("fp64"), err), err);
  if (!r.ctx) return;
  CHECK(load_params(&r, "param.") == 0);
  fbatch fb;
  fbatch_make(&fb, false);
  static const struct { const char *name; int64_t idx; } cases[] = {
      {"img_in.weight", 37},
      {"txt_norm.weight", 5},
      {"txt_in.bias", 3},
      {"time_text_embed.timestep_embedder.linear_1.weight", 300},
      {"transformer_blocks.0.img_mod.1.weight", 2 * 32 * 32 + 77},  /* gate1 rows */
      {"transformer_blocks.0.txt_mod.1.bias", 4 * 32 + 9},           /* scale2 of the text stream */
      {"transformer_blocks.0.attn.norm_added_q.weight", 11},
      {"transformer_blocks.0.attn.to_k.weight", 500},
      {"transformer_blocks.0.txt_mlp.net.2.weight", 1000},
      {"transformer_blocks.1.attn.add_k_proj.weight", 123},          /* dead block: text keys still matter */
      {"transformer_blocks.1.attn.norm_k.weight", 2},
      {"transformer_blocks.1.img_mlp.net.0.proj.bias", 17},
      {"norm_out.linear.weight", 40 * 32 + 3},
      {"proj_out.bias", 6},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) fd_check(&r, fb.samples, cases[i].name, cases[i].idx);
  fbatch_free(&fb);
  qrun_close(&r);
}

/* LoRA: B = 0 leaves the model unchanged, base weights get no gradient buffers, adapter gradients
 * match finite differences once B is non-zero. */
static void test_lora(void) {
  st_error err_ = {0}, *err = &err_;
  qrun r;
  const char *json = "{\"model\": {\"name\": \"qwen_image\", \"preset\": \"tiny\", \"dtype\": \"fp64\", "
                     "\"lora\": {\"rank\": 4, \"alpha\": 8}}}";
  CHECK_OK(qrun_open(&r, json, err), err);
  if (!r.ctx) return;
  CHECK(load_params(&r, "param.") == 0);
  int n_lora = 0, n_frozen_with_grad = 0;
  for (int u = 0; u < r.d->n_units; u++)
    for (int k = 0; k < r.d->units[u].n_params; k++) {
      const st_param_desc *p = &r.d->units[u].params[k];
      if (p->flags & ST_PARAM_LORA) {
        n_lora++;
        CHECK_OK(PL->init_param(r.ctx, 99, u, k, 0, st_tensor_numel(&r.P[u][k]), ST_F64, r.P[u][k].data, err), err);
      } else {
        n_frozen_with_grad += (p->flags & ST_PARAM_TRAINABLE) != 0;
      }
    }
  /* DiffSynth's 12 targets in each of 2 blocks, A and B each */
  CHECK_MSG(n_lora == 2 * 12 * 2, "LoRA tensors: %d", n_lora);
  CHECK(n_frozen_with_grad == 0);
  fbatch fb;
  fbatch_make(&fb, false);
  double loss = 0;
  CHECK_OK(step(&r, fb.samples, 2, true, &loss, NULL, err), err);
  CHECK_CLOSE(loss, fx_at(fx("out.loss"), 0), 1e-12, 0);
  /* give B non-zero values so that A's gradient is non-zero too */
  for (int u = 0; u < r.d->n_units; u++)
    for (int k = 0; k < r.d->units[u].n_params; k++)
      if (strstr(r.d->units[u].params[k].name, "lora_B"))
        HOST->rng->normal(7, (uint64_t)(u * 100 + k), 0, st_tensor_numel(&r.P[u][k]), 0.0, 0.05, ST_F64,
                          r.P[u][k].data);
  fd_check(&r, fb.samples, "transformer_blocks.0.attn.to_q.lora_A.weight", 21);
  fd_check(&r, fb.samples, "transformer_blocks.0.attn.to_q.lora_B.weight", 9);
  fd_check(&r, fb.samples, "transformer_blocks.0.img_mod.1.lora_B.weight", 2 * 32 * 4 + 5);
  fd_check(&r, fb.samples, "transformer_blocks.1.txt_mod.1.lora_A.weight", 33);
  fd_check(&r, fb.samples, "transformer_blocks.1.img_mlp.net.2.lora_A.weight", 200);
  fd_check(&r, fb.samples, "transformer_blocks.0.attn.add_v_proj.lora_B.weight", 50);
  fbatch_free(&fb);
  qrun_close(&r);
}

/* the released 20B config, described without allocating a parameter */
static void test_preset_20b(void) {
  st_error err_ = {0}, *err = &err_;
  qrun r = {0};
  CHECK_OK(st_config_load_string("{\"model\": {\"name\": \"qwen_image\"}}", "test", &r.cfg, err), err);
  void *ctx = NULL;
  CHECK_OK(PL->init(HOST, st_config_node(r.cfg, "model"), &ctx, err), err);
  if (!ctx) return;
  const st_model_desc *d = PL->describe(ctx);
  int64_t total = 0;
  int tensors = 0;
  for (int u = 0; u < d->n_units; u++)
    for (int k = 0; k < d->units[u].n_params; k++, tensors++)
      total += numel(d->units[u].params[k].shape, d->units[u].params[k].ndim);
  CHECK(total == 20430401088LL); /* reference §1 (also an independent meta-device count) */
  CHECK(d->n_params_total == 20430401088LL);
  CHECK(tensors == 1933);
  CHECK(d->n_units == 62);
  CHECK(d->hidden_size == 3072);
  CHECK(!strcmp(d->units[1].params[0].name, "transformer_blocks.0.img_mod.1.weight"));
  CHECK(d->units[1].params[0].shape[0] == 18432 && d->units[1].params[0].shape[1] == 3072);
  PL->finalize(ctx);
  st_config_free(r.cfg);
}

static void test_config_errors(void) {
  expect_config_error("{\"model\": {\"name\": \"qwen_image\", \"presett\": \"tiny\"}}", "presett");
  expect_config_error("{\"model\": {\"name\": \"qwen_image\", \"overrides\": {\"num_layer\": 3}}}", "num_layer");
  expect_config_error("{\"model\": {\"name\": \"qwen_image\", \"preset\": \"tiny\", \"overrides\": "
                      "{\"axes_dims_rope\": [4, 6, 8]}}}", "axes_dims_rope");
  expect_config_error("{\"model\": {\"name\": \"qwen_image\", \"preset\": \"tiny\", \"lora\": "
                      "{\"target_modules\": [\"to_qq\"]}}}", "to_qq");
  expect_config_error("{\"model\": {\"name\": \"qwen_image\", \"preset\": \"tiny\", \"options\": "
                      "{\"gelu\": \"erf\"}}}", "gelu");
  expect_config_error("{\"model\": {\"name\": \"qwen_image\", \"preset\": \"large\"}}", "preset");
}

/* init_param is a pure function of (seed, unit, param, index): any shard split agrees */
static void test_init_param(void) {
  st_error err_ = {0}, *err = &err_;
  qrun r;
  CHECK_OK(qrun_open(&r, tiny_json("fp32"), err), err);
  if (!r.ctx) return;
  int u, k;
  CHECK(find_param(&r, "transformer_blocks.1.attn.to_v.weight", &u, &k));
  float whole[1024], a[1024];
  CHECK_OK(PL->init_param(r.ctx, 5, u, k, 0, 1024, ST_F32, whole, err), err);
  CHECK_OK(PL->init_param(r.ctx, 5, u, k, 0, 300, ST_F32, a, err), err);
  CHECK_OK(PL->init_param(r.ctx, 5, u, k, 300, 724, ST_F32, a + 300, err), err);
  CHECK(memcmp(whole, a, sizeof a) == 0);
  double s2 = 0;
  for (int i = 0; i < 1024; i++) s2 += (double)whole[i] * whole[i];
  CHECK_CLOSE(sqrt(s2 / 1024), 0.02, 0.1, 0); /* std 0.02 within sampling noise */
  CHECK(find_param(&r, "transformer_blocks.1.attn.norm_q.weight", &u, &k));
  CHECK_OK(PL->init_param(r.ctx, 5, u, k, 0, 16, ST_F32, a, err), err);
  CHECK(a[0] == 1.0f && a[15] == 1.0f);
  qrun_close(&r);
}

/* ---- synthetic samples, batch errors ---- */

static void test_synth_and_batch_errors(void) {
  st_error err_ = {0}, *err = &err_;
  qrun r;
  CHECK_OK(qrun_open(&r, tiny_json("fp32"), err), err);
  if (!r.ctx) return;
  for (int u = 0; u < r.d->n_units; u++)
    for (int k = 0; k < r.d->units[u].n_params; k++)
      CHECK_OK(PL->init_param(r.ctx, 1, u, k, 0, st_tensor_numel(&r.P[u][k]), ST_F32, r.P[u][k].data, err), err);
  cap_sink cs[3];
  const char *nm[3][8];
  st_sample smp[3];
  for (int i = 0; i < 3; i++) {
    memset(&cs[i], 0, sizeof cs[i]);
    cs[i].pub = (st_tensor_sink){.self = &cs[i], .put = cap_put};
    CHECK_OK(PL->synth_sample(r.ctx, 42, i * 9, &cs[i].pub, err), err);
    for (int j = 0; j < cs[i].n; j++) nm[i][j] = cs[i].names[j];
    smp[i] = (st_sample){.id = i == 0 ? "synth/0" : i == 1 ? "synth/9" : "synth/18", .n_tensors = cs[i].n,
                         .names = nm[i], .tensors = cs[i].t};
  }
  CHECK(cs[0].n == 3 && !strcmp(cs[0].names[0], "latents"));
  CHECK(cs[0].t[1].shape[0] != cs[1].t[1].shape[0]); /* prompt lengths vary with the index */
  double loss = 0;
  CHECK_OK(step(&r, smp, 2, true, &loss, NULL, err), err);
  CHECK(isfinite(loss) && loss > 0);
  /* the same (seed, index) gives the same sample */
  cap_sink again = {.pub = {.self = &again, .put = cap_put}};
  CHECK_OK(PL->synth_sample(r.ctx, 42, 0, &again.pub, err), err);
  CHECK(memcmp(again.t[0].data, cs[0].t[0].data, st_tensor_nbytes(&cs[0].t[0])) == 0);
  for (int j = 0; j < again.n; j++) free(again.t[j].data);
  /* mixed latent sizes in one batch: an error naming both samples */
  st_tensor small = cs[2].t[0];
  small.shape[2] -= 2;
  cs[2].t[0] = small;
  void *bctx = NULL;
  st_batch bad = {.n_samples = 3, .samples = smp, .seed = 1};
  CHECK(PL->batch_prepare(r.ctx, &bad, &bctx, err) == ST_ERR_FORMAT);
  CHECK_CONTAINS(err->where, "synth/18");
  CHECK_CONTAINS(err->message, "synth/0");
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < cs[i].n; j++) free(cs[i].t[j].data);
  qrun_close(&r);
}

/* ---- exports ---- */
typedef struct list_sink {
  st_tensor_sink pub;
  int n;
  char (*names)[128];
  char file[4096];
  char file_name[64];
  double w_probe; /* value of the probed tensor element */
  const char *probe;
  int64_t probe_idx;
} list_sink;

static st_result list_put(st_tensor_sink *s, const char *name, const st_tensor *t, st_error *err) {
  (void)err;
  list_sink *l = s->self;
  snprintf(l->names[l->n++], 128, "%s", name);
  if (l->probe && !strcmp(name, l->probe)) l->w_probe = ((const float *)t->data)[l->probe_idx];
  return ST_OK;
}

static st_result list_put_file(st_tensor_sink *s, const char *filename, const void *bytes, size_t len, st_error *err) {
  (void)err;
  list_sink *l = s->self;
  snprintf(l->file_name, sizeof l->file_name, "%s", filename);
  snprintf(l->file, sizeof l->file, "%.*s", (int)len, (const char *)bytes);
  return ST_OK;
}

static void test_export(void) {
  st_error err_ = {0}, *err = &err_;
  qrun r;
  CHECK_OK(qrun_open(&r, "{\"model\": {\"name\": \"qwen_image\", \"preset\": \"tiny\", \"dtype\": \"fp32\", "
                         "\"lora\": {\"rank\": 2, \"alpha\": 4, \"target_modules\": [\"to_q\"]}}}", err), err);
  if (!r.ctx) return;
  for (int u = 0; u < r.d->n_units; u++)
    for (int k = 0; k < r.d->units[u].n_params; k++)
      HOST->rng->normal(3, (uint64_t)(u * 100 + k), 0, st_tensor_numel(&r.P[u][k]), 0.0, 0.1, ST_F32, r.P[u][k].data);
  run_source src = {.pub = {.read = run_read}, .r = &r};
  src.pub.self = &src;
  list_sink ls = {.pub = {.put = list_put, .put_file = list_put_file}, .names = calloc(2048, 128)};
  ls.pub.self = &ls;
  /* merged W[1][2] = W + (alpha/r) sum_q B[1][q] A[q][2] */
  int u, kw, ka, kb;
  CHECK(find_param(&r, "transformer_blocks.1.attn.to_q.weight", &u, &kw));
  CHECK(find_param(&r, "transformer_blocks.1.attn.to_q.lora_A.weight", &u, &ka));
  CHECK(find_param(&r, "transformer_blocks.1.attn.to_q.lora_B.weight", &u, &kb));
  const float *W = r.P[u][kw].data, *A = r.P[u][ka].data, *Bm = r.P[u][kb].data;
  double expect = W[1 * 32 + 2] + 2.0 * (Bm[1 * 2 + 0] * A[0 * 32 + 2] + Bm[1 * 2 + 1] * A[1 * 32 + 2]);
  ls.probe = "transformer_blocks.1.attn.to_q.weight";
  ls.probe_idx = 1 * 32 + 2;
  CHECK_OK(PL->export_weights(r.ctx, "diffusers", true, &src.pub, &ls.pub, err), err);
  int base = 0;
  for (int uu = 0; uu < r.d->n_units; uu++)
    for (int k = 0; k < r.d->units[uu].n_params; k++) base += !(r.d->units[uu].params[k].flags & ST_PARAM_LORA);
  CHECK_MSG(ls.n == base, "diffusers export wrote %d tensors, model has %d base tensors", ls.n, base);
  CHECK(!strcmp(ls.file_name, "config.json"));
  CHECK_CONTAINS(ls.file, "\"_class_name\": \"QwenImageTransformer2DModel\"");
  CHECK_CONTAINS(ls.file, "\"axes_dims_rope\": [4, 6, 6]");
  CHECK_CLOSE(ls.w_probe, expect, 1e-6, 1e-7);
  ls.n = 0;
  ls.probe = "transformer.transformer_blocks.1.attn.to_q.lora_B.weight";
  ls.probe_idx = 3;
  CHECK_OK(PL->export_weights(r.ctx, "peft", false, &src.pub, &ls.pub, err), err);
  CHECK_CLOSE(ls.w_probe, 2.0 * Bm[3], 1e-6, 0);
  CHECK(ls.n == 4);
  CHECK(!strcmp(ls.names[0], "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"));
  CHECK(!strcmp(ls.file_name, "adapter_config.json"));
  CHECK_CONTAINS(ls.file, "\"r\": 2");
  CHECK_CONTAINS(ls.file, "\"lora_alpha\": 2"); /* alpha/r = 2 is folded into B */
  CHECK_CONTAINS(ls.file, "\"target_modules\": [\"to_q\"]");
  free(ls.names);
  qrun_close(&r);
}

/* the shipped configs pass the core's schema and the plugin's own validation */
static void test_shipped_configs(void) {
  const char *root = getenv("ST_SOURCE_ROOT");
  if (!root) return;
  static const char *files[] = {"configs/demo/qwen_image_tiny.json", "configs/qwen_image/lora.json",
                                "configs/qwen_image/full.json"};
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    st_error err_ = {0}, *err = &err_;
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", root, files[i]);
    st_config *c = NULL;
    st_settings set;
    CHECK_OK(st_config_load(path, NULL, NULL, 0, &c, err), err);
    if (!c) continue;
    CHECK_OK(st_config_extract(c, &set, err), err);
    CHECK_OK(PL->validate(st_config_node(c, "model"), st_config_api(), err), err);
    st_config_free(c);
  }
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s MODULE.so FIXTURE.safetensors\n", argv[0]);
    return 1;
  }
  void *so = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!so) {
    fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror());
    return 1;
  }
  PL = dlsym(so, ST_MODEL_PLUGIN_SYMBOL_V1);
  st_error err_ = {0}, *err = &err_;
  CHECK(PL != NULL);
  if (!PL) return st_test_finish("qwen_image");
  CHECK(!strcmp(PL->header.name, "qwen_image") && PL->header.abi_version == ST_ABI_VERSION);
  CHECK_OK(st_cpu_ops_create(2, &OPS, err), err);
  CHECK_OK(st_host_create(&(st_host_options){.ops = OPS, .cpu_ops = OPS, .cfg = st_config_api()}, &HOST, err), err);
  CHECK_OK(st_safetensors_open(argv[2], &FX, err), err);
  if (!OPS || !HOST || !FX) return st_test_finish("qwen_image");

  test_preset_20b();
  test_config_errors();
  test_init_param();
  test_against_fixture("fp64", 1e-9, 1e-9);
  test_against_fixture("fp32", 1e-5, 1e-4);
  test_adamw_replay();
  test_finite_differences();
  test_lora();
  test_synth_and_batch_errors();
  test_export();
  test_shipped_configs();

  st_safetensors_close(FX);
  st_host_destroy(HOST);
  st_cpu_ops_destroy(OPS);
  dlclose(so);
  return st_test_finish("qwen_image");
}
