/* test_qwen3_vl_moe.c — the qwen3_vl_moe model plugin (vision tower + MoE language model) against transformers.
 *
 * The fixture (tools/reference/qwen3_vl_moe_fixture.py) holds transformers'
 * Qwen3VLMoeForConditionalGeneration with the tiny text config (vocab 512) run in float64 on a
 * text-only batch of 2 with right padding, -100 labels, 3-row MRoPE position ids whose axes differ,
 * and experts that receive no token: inputs, logits, CE / aux / total loss, every layer's router
 * top-k, and every parameter gradient. This test dlopens the built plugin, runs its units forward /
 * loss / backward over the CPU ops table (the host's local MoE exchange) in float64 and float32 and
 * compares per tensor; checks that experts without tokens get exactly zero gradient; checks
 * gradients against central finite differences in float64; and checks the 30B-A3B preset's
 * parameter count, config and batch errors, init determinism and synthetic samples, and LoRA
 * (frozen base, adapter finite differences, merged and PEFT exports). It also replays the fixture's
 * 3 torch AdamW steps through the host's optimizer (losses at each step, parameters after step 3).
 *
 * A second fixture runs the vision tower: two images of different grids in one sample, one in
 * another, an image and a 2-frame video in the third; merged image/video tokens, DeepStack
 * injection into LM layers 0 and 1 in the joint image/video order, per-frame attention and the
 * 3-D MRoPE positions transformers derives from the grids; compared the same way, plus finite
 * differences through the tower.
 *
 * Usage: test_qwen3_vl_moe MODULE.so TEXT_FIXTURE.safetensors IMAGE_FIXTURE.safetensors */
#include <dlfcn.h>

#include "cpu_ops.h"
#include "model_test.h"

static st_result (*ROUTING)(void *ctx, void *bctx, int layer, int32_t *idx, int64_t n);
static st_safetensors *FXV; /* the image fixture (FX: the text-only one) */

static bool is_visual(const char *name) { return !strncmp(name, "model.visual.", 13); }

/* every parameter the fixture holds ("param.<name>"); with fx2, vision parameters come from it */
static int load_params_from(qrun *r, st_safetensors *fx2) {
  int missing = 0;
  for (int u = 0; u < r->d->n_units; u++)
    for (int k = 0; k < r->d->units[u].n_params; k++) {
      const st_param_desc *p = &r->d->units[u].params[k];
      char name[600];
      snprintf(name, sizeof name, "param.%s", p->name);
      if (is_visual(p->name) && !fx2) continue; /* text-only fixture: the tower is never run */
      if (p->flags & ST_PARAM_LORA) continue;  /* adapters: init_param */
      st_safetensors *src = is_visual(p->name) ? fx2 : FX;
      const st_st_entry *e = st_safetensors_find(src, name);
      if (!e || e->ndim != p->ndim || numel(e->shape, e->ndim) != numel(p->shape, p->ndim)) {
        fprintf(stderr, "fixture lacks %s (or its shape differs)\n", name);
        missing++;
        continue;
      }
      for (int d = 0; d < p->ndim; d++) missing += e->shape[d] != p->shape[d];
      const void *data = st_safetensors_data(src, e);
      for (int64_t i = 0; i < numel(p->shape, p->ndim); i++)
        set(r->dt, r->P[u][k].data, i, e->dtype == ST_F32 ? ((const float *)data)[i] : ((const double *)data)[i]);
    }
  return missing;
}

static int load_params(qrun *r) { return load_params_from(r, NULL); }

/* ---- the fixture batch as samples ---- */
typedef struct fbatch {
  st_sample samples[2];
  st_tensor t[2][4];
  const char *names[2][4];
  int64_t *buf[2][4];
} fbatch;

/* sample 0: all S tokens with its position_ids [3, S]; sample 1: only its valid tokens, or
 * (padded_mask) all S rows with the attention mask */
static void fbatch_make(fbatch *fb, bool padded_mask) {
  memset(fb, 0, sizeof *fb);
  const st_st_entry *ids = fx("in.input_ids"), *lab = fx("in.labels"), *mk = fx("in.attention_mask");
  const st_st_entry *pos = fx("in.position_ids");
  int64_t S = ids->shape[1];
  for (int i = 0; i < 2; i++) {
    int64_t n = S;
    if (i == 1 && !padded_mask)
      for (n = 0; n < S && fx_at(mk, i * S + n) != 0; n++) {
      }
    int nt = 0;
    fb->names[i][nt] = "input_ids";
    fb->buf[i][nt] = malloc(sizeof(int64_t) * (size_t)n);
    for (int64_t t = 0; t < n; t++) fb->buf[i][nt][t] = (int64_t)fx_at(ids, i * S + t);
    fb->t[i][nt] = st_tensor_make(fb->buf[i][nt], ST_I64, CPU, 1, (int64_t[]){n});
    nt++;
    fb->names[i][nt] = "labels";
    fb->buf[i][nt] = malloc(sizeof(int64_t) * (size_t)n);
    for (int64_t t = 0; t < n; t++) fb->buf[i][nt][t] = (int64_t)fx_at(lab, i * S + t);
    fb->t[i][nt] = st_tensor_make(fb->buf[i][nt], ST_I64, CPU, 1, (int64_t[]){n});
    nt++;
    if (i == 0) {
      fb->names[i][nt] = "position_ids";
      fb->buf[i][nt] = malloc(sizeof(int64_t) * (size_t)(3 * n));
      for (int ax = 0; ax < 3; ax++)
        for (int64_t t = 0; t < n; t++) fb->buf[i][nt][ax * n + t] = (int64_t)fx_at(pos, (ax * 2 + 0) * S + t);
      fb->t[i][nt] = st_tensor_make(fb->buf[i][nt], ST_I64, CPU, 2, (int64_t[]){3, n});
      nt++;
    }
    if (i == 1 && padded_mask) {
      fb->names[i][nt] = "attention_mask";
      fb->buf[i][nt] = malloc(sizeof(int64_t) * (size_t)n);
      for (int64_t t = 0; t < n; t++) fb->buf[i][nt][t] = (int64_t)fx_at(mk, i * S + t);
      fb->t[i][nt] = st_tensor_make(fb->buf[i][nt], ST_I64, CPU, 1, (int64_t[]){n});
      nt++;
    }
    fb->samples[i] = (st_sample){.id = i ? "fixture/1" : "fixture/0", .n_tensors = nt, .names = fb->names[i],
                                 .tensors = fb->t[i]};
  }
}

static void fbatch_free(fbatch *fb) {
  for (int i = 0; i < 2; i++)
    for (int j = 0; j < 4; j++) free(fb->buf[i][j]);
}

/* one step: forward every unit, loss, and (when backward) every unit's backward. Scratch and
 * gradient carries start as NaN so that reading anything unwritten poisons the result. logits
 * (if not NULL) receives the last carry as doubles; routing (if not NULL) every layer's top-k ids. */
static st_result step(qrun *r, const st_sample *samples, int n, bool backward, st_loss *lo, double *logits,
                      int32_t *routing, int64_t routing_n, st_error *err) {
  st_batch batch = {.n_samples = n, .samples = samples, .seed = 1234, .training = true};
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
  if (lo) *lo = l;
  if (res == ST_OK && logits)
    for (int64_t q = 0; q < st_tensor_numel(&carry[U][0]); q++) logits[q] = get(r->dt, carry[U][0].data, q);
  for (int layer = 0; routing && res == ST_OK && layer < 2; layer++)
    res = ROUTING(r->ctx, bctx, layer, routing + layer * routing_n, routing_n);
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
  snprintf(buf, sizeof buf, "{\"model\": {\"name\": \"qwen3_vl_moe\", \"preset\": \"tiny\", \"dtype\": \"%s\", "
                            "\"overrides\": {\"vocab_size\": 512, \"image_token_id\": 489, \"video_token_id\": 490}}}", dtype);
  return buf;
}

static double metric(const st_loss *l, const char *name) {
  for (int i = 0; i < l->n_metrics; i++)
    if (!strcmp(l->metric_names[i], name)) return l->metric_values[i];
  fprintf(stderr, "no metric %s\n", name);
  return NAN;
}

/* forward, losses, routing and every gradient against transformers. Tolerances are relative to
 * each tensor's largest magnitude: float64 agrees to ~1e-14 (the fixture's parameters are exact
 * float32 values; only summation order differs), the 1e-10 bound leaves room for that; float32
 * outputs 1e-5 and gradients 1e-4 (rounding through 2 layers of float32 GEMMs, softmax and the
 * renormalised router; the routing itself is not near a tie in this batch). */
static void test_against_fixture(const char *dtype, double tol_out, double tol_grad) {
  st_error err_ = {0}, *err = &err_;
  qrun r;
  CHECK_OK(qrun_open(&r, tiny_json(dtype), err), err);
  if (!r.ctx) return;
  CHECK(load_params(&r) == 0);
  fbatch fb;
  fbatch_make(&fb, false);
  const st_st_entry *le = fx("out.logits");
  int64_t nlog = numel(le->shape, le->ndim), L = 2, Tk = 2 * le->shape[1] * 2;
  double *logits = calloc((size_t)nlog, sizeof *logits);
  int32_t *routing = calloc((size_t)(L * Tk), sizeof *routing);
  st_loss lo;
  zero_grads(&r);
  CHECK_OK(step(&r, fb.samples, 2, true, &lo, logits, routing, Tk, err), err);
  double num = 0, den = 0;
  for (int64_t i = 0; i < nlog; i++) {
    num = fmax(num, fabs(logits[i] - fx_at(le, i)));
    den = fmax(den, fabs(fx_at(le, i)));
  }
  double out_err = num / den;
  double loss_err = fabs(lo.loss - fx_at(fx("out.loss"), 0)) / fabs(fx_at(fx("out.loss"), 0));
  double ce_err = fabs(metric(&lo, "lm/ce_loss") - fx_at(fx("out.ce_loss"), 0)) / fx_at(fx("out.ce_loss"), 0);
  double aux_err = fabs(metric(&lo, "moe/aux_loss") - fx_at(fx("out.aux_loss"), 0)) / fx_at(fx("out.aux_loss"), 0);
  CHECK_MSG(out_err <= tol_out, "%s logits rel err %.3g > %.3g", dtype, out_err, tol_out);
  CHECK_MSG(loss_err <= tol_out, "%s loss %.15g vs transformers %.15g", dtype, lo.loss, fx_at(fx("out.loss"), 0));
  CHECK_MSG(ce_err <= tol_out, "%s CE loss rel err %.3g", dtype, ce_err);
  CHECK_MSG(aux_err <= tol_out, "%s aux loss %.15g vs transformers %.15g", dtype, metric(&lo, "moe/aux_loss"),
            fx_at(fx("out.aux_loss"), 0));
  /* 24 tokens (padding included: transformers routes padded rows too) x top-2 per layer */
  CHECK(lo.n_items == 9 + 6); /* shifted non-ignored labels: sample 0 has 12-3-1, sample 1 8-2-1 */
  int route_mismatch = 0;
  for (int64_t l = 0; l < L; l++) {
    char name[64];
    snprintf(name, sizeof name, "out.router_topk.%lld", (long long)l);
    const st_st_entry *re = fx(name);
    CHECK(numel(re->shape, re->ndim) == Tk);
    for (int64_t i = 0; i < Tk; i++) route_mismatch += routing[l * Tk + i] != (int32_t)fx_at(re, i);
  }
  CHECK_MSG(route_mismatch == 0, "%s: %d router top-k choices differ from transformers", dtype, route_mismatch);
  double gmax = 0;
  const char *worst = "";
  int n_tensors = 0;
  for (int u = 0; u < r.d->n_units; u++)
    for (int k = 0; k < r.d->units[u].n_params; k++) {
      const st_param_desc *p = &r.d->units[u].params[k];
      char name[600];
      if (is_visual(p->name)) { /* no image in this batch: the tower gets exactly nothing */
        double mx = 0;
        for (int64_t q = 0; q < st_tensor_numel(&r.G[u][k]); q++) mx = fmax(mx, fabs(get(r.dt, r.G[u][k].data, q)));
        CHECK_MSG(mx == 0.0, "%s: text-only batch, yet gradient %.3g", p->name, mx);
        continue;
      }
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
  CHECK(n_tensors == 1 + 2 * 11 + 2);
  fprintf(stderr, "%s: logits rel err %.3g, loss %.3g, CE %.3g, aux %.3g, routing mismatches %d, worst of %d "
          "gradients %.3g (%s)\n", dtype, out_err, loss_err, ce_err, aux_err, route_mismatch, n_tensors, gmax, worst);

  /* experts that received no token in layer 0 (padding counts: it is routed) get exactly zero
   * expert gradients, and transformers agrees; their router rows still learn (aux loss) */
  int u0, kgu, kdn, kg;
  CHECK(find_param(&r, "model.language_model.layers.0.mlp.experts.gate_up_proj", &u0, &kgu));
  CHECK(find_param(&r, "model.language_model.layers.0.mlp.experts.down_proj", &u0, &kdn));
  CHECK(find_param(&r, "model.language_model.layers.0.mlp.gate.weight", &u0, &kg));
  int n_empty = 0;
  for (int e = 0; e < 8; e++) {
    int hits = 0;
    for (int64_t i = 0; i < Tk; i++) hits += routing[i] == e;
    if (hits) continue;
    n_empty++;
    int64_t ngu = 64 * 64, ndn = 32 * 64;
    double mx = 0, gate = 0;
    for (int64_t q = 0; q < ngu; q++) mx = fmax(mx, fabs(get(r.dt, r.G[u0][kgu].data, e * ngu + q)));
    for (int64_t q = 0; q < ndn; q++) mx = fmax(mx, fabs(get(r.dt, r.G[u0][kdn].data, e * ndn + q)));
    for (int64_t q = 0; q < 64; q++) gate = fmax(gate, fabs(get(r.dt, r.G[u0][kg].data, e * 64 + q)));
    CHECK_MSG(mx == 0.0, "expert %d got no token but has gradient %.3g", e, mx);
    CHECK_MSG(gate > 0.0, "router row of the idle expert %d must get the aux-loss gradient", e);
  }
  CHECK_MSG(n_empty >= 1, "the fixture should leave an expert of layer 0 without tokens");

  /* the same batch with sample 1 padded explicitly (12 rows, attention_mask) gives the same loss */
  fbatch fb2;
  fbatch_make(&fb2, true);
  st_loss lo2;
  CHECK_OK(step(&r, fb2.samples, 2, false, &lo2, NULL, NULL, 0, err), err);
  CHECK_CLOSE(lo2.loss, lo.loss, 1e-12, 0);
  fbatch_free(&fb2);
  fbatch_free(&fb);
  free(logits);
  free(routing);
  qrun_close(&r);
}

/* An exchange that delivers the received rows in reverse order (an all-to-all delivers them by
 * [source rank][expert], not sorted as sent) and returns combined rows to their origin: the model
 * must regroup by expert and undo it, forward and backward. Results must not change. */
typedef struct rev_exchange {
  const st_ops *ops;
  int64_t n;
} rev_exchange;
static int rev_nle(st_moe_exchange *x, int e) { (void)x; return e; }
static int rev_fle(st_moe_exchange *x, int e) { (void)x; (void)e; return 0; }
static st_result rev_dispatch(st_moe_exchange *x, st_dtype dt, const void *tokens, const int32_t *expert_ids, int64_t n,
                              int64_t hidden, int num_experts, void *recv, int32_t *recv_expert, int64_t recv_cap,
                              int64_t *n_recv, st_error *err) {
  (void)num_experts;
  rev_exchange *r = (rev_exchange *)x;
  if (n > recv_cap) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "test", "recv_cap");
  size_t row = (size_t)hidden * st_dtype_size(dt);
  for (int64_t i = 0; i < n; i++) {
    memcpy((char *)recv + (size_t)i * row, (const char *)tokens + (size_t)(n - 1 - i) * row, row);
    recv_expert[i] = expert_ids[n - 1 - i];
  }
  r->n = *n_recv = n;
  return ST_OK;
}
static st_result rev_combine(st_moe_exchange *x, st_dtype dt, const void *processed, int64_t hidden, void *out,
                             st_error *err) {
  (void)err;
  rev_exchange *r = (rev_exchange *)x;
  size_t row = (size_t)hidden * st_dtype_size(dt);
  for (int64_t i = 0; i < r->n; i++)
    memcpy((char *)out + (size_t)(r->n - 1 - i) * row, (const char *)processed + (size_t)i * row, row);
  return ST_OK;
}

static void test_permuting_exchange(void) {
  st_error err_ = {0}, *err = &err_;
  rev_exchange rx = {.ops = OPS};
  st_moe_api api = {.self = (st_moe_exchange *)&rx, .num_local_experts = rev_nle, .first_local_expert = rev_fle,
                    .dispatch = rev_dispatch, .combine = rev_combine};
  const st_moe_api *local = HOST->moe(HOST);
  HOST->set_moe(HOST, &api);
  qrun r;
  CHECK_OK(qrun_open(&r, tiny_json("fp64"), err), err);
  if (r.ctx) {
    CHECK(load_params(&r) == 0);
    fbatch fb;
    fbatch_make(&fb, false);
    st_loss lo;
    zero_grads(&r);
    CHECK_OK(step(&r, fb.samples, 2, true, &lo, NULL, NULL, 0, err), err);
    CHECK_CLOSE(lo.loss, fx_at(fx("out.loss"), 0), 1e-12, 0);
    double worst = 0;
    for (int u = 0; u < r.d->n_units; u++)
      for (int k = 0; k < r.d->units[u].n_params; k++) {
        char name[600];
        if (is_visual(r.d->units[u].params[k].name)) continue;
        snprintf(name, sizeof name, "grad.%s", r.d->units[u].params[k].name);
        worst = fmax(worst, tensor_rel_err(r.dt, r.G[u][k].data, fx(name), st_tensor_numel(&r.G[u][k]), NULL));
      }
    CHECK_MSG(worst <= 1e-10, "permuting exchange: worst gradient rel err %.3g", worst);
    CHECK(rx.n == 2 * 12 * 2);
    fbatch_free(&fb);
  }
  qrun_close(&r);
  HOST->set_moe(HOST, local);
}

/* Three AdamW steps through host->optim_update (the host's default optimizer is torch.optim.AdamW:
 * lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on every tensor, so .weight_decay is 1 here),
 * float64, recomputing loss and gradients at each step's parameters, against the fixture's 3 torch
 * AdamW steps on the same batch. Checked: the loss before each step, and after step 3 every
 * language-model parameter's change (the fixture stores p3 - p0 in float32 for all but lm_head;
 * lm_head still moves the step-2/3 losses). The vision tower gets no gradient and is not stepped.
 * Tolerances: strata keeps the Adam moments in float32 (torch: float64), so each update carries
 * ~1e-7 relative rounding: ~1e-10 absolute per step at lr 1e-3, plus the fixture's float32 rounding
 * of changes <= 3e-3 (~2e-10). 1e-9 absolute on the parameters (~1e-9 relative to parameters of
 * magnitude ~0.1-1); a dropped bias correction (error ~2e-3), decay term (~1e-5 p) or a wrong
 * step count is far outside it. Losses: step 1 equals the forward test's (1e-12 relative); steps 2
 * and 3 move by ~grad . dp ~ 1e-11 from the parameter differences: 1e-10 relative. */
static void test_adamw_replay(void) {
  st_error err_ = {0}, *err = &err_;
  qrun r;
  CHECK_OK(qrun_open(&r, tiny_json("fp64"), err), err);
  if (!r.ctx) return;
  CHECK(load_params(&r) == 0);
  fbatch fb;
  fbatch_make(&fb, false);
  int U = r.d->n_units, NP = 0;
  for (int u = 0; u < U; u++) NP = r.d->units[u].n_params > NP ? r.d->units[u].n_params : NP;
  float **m1 = calloc((size_t)(U * NP), sizeof *m1), **m2 = calloc((size_t)(U * NP), sizeof *m2);
  double **p0 = calloc((size_t)(U * NP), sizeof *p0);
  for (int u = 0; u < U; u++)
    for (int k = 0; k < r.d->units[u].n_params; k++) {
      if (!r.G[u][k].data || is_visual(r.d->units[u].params[k].name)) continue;
      int64_t n = st_tensor_numel(&r.P[u][k]);
      m1[u * NP + k] = calloc((size_t)n, sizeof(float));
      m2[u * NP + k] = calloc((size_t)n, sizeof(float));
      p0[u * NP + k] = malloc((size_t)n * sizeof(double));
      memcpy(p0[u * NP + k], r.P[u][k].data, (size_t)n * sizeof(double));
    }
  double loss_err[3] = {0};
  int n_stepped = 0;
  for (int s = 1; s <= 3; s++) {
    zero_grads(&r);
    st_loss lo;
    CHECK_OK(step(&r, fb.samples, 2, true, &lo, NULL, NULL, 0, err), err);
    char name[64];
    snprintf(name, sizeof name, "step%d.loss", s);
    double ref = fx_at(fx(name), 0);
    loss_err[s - 1] = fabs(lo.loss - ref) / fabs(ref);
    CHECK_MSG(loss_err[s - 1] <= (s == 1 ? 1e-12 : 1e-10), "AdamW replay: loss before step %d %.15g vs torch %.15g", s,
              lo.loss, ref);
    for (int u = 0; u < U; u++)
      for (int k = 0; k < r.d->units[u].n_params; k++) {
        if (!m1[u * NP + k]) continue;
        st_optim_desc od = {.n = st_tensor_numel(&r.P[u][k]), .param = r.P[u][k].data, .param_dtype = ST_F64,
                            .grad = r.G[u][k].data, .grad_dtype = ST_F64, .exp_avg = m1[u * NP + k],
                            .exp_avg_sq = m2[u * NP + k], .lr = 1e-3, .weight_decay = 1.0, .step = s,
                            .grad_scale = 1.0};
        CHECK_OK(HOST->optim_update(HOST, CPU, &od, err), err);
        n_stepped += s == 1;
      }
  }
  CHECK(n_stepped == 1 + 2 * 11 + 2);
  double worst = 0, worst_rel = 0, dmax = 0;
  const char *worst_name = "";
  int n_cmp = 0;
  for (int u = 0; u < U; u++)
    for (int k = 0; k < r.d->units[u].n_params; k++) {
      const char *pn = r.d->units[u].params[k].name;
      if (!m1[u * NP + k] || !strcmp(pn, "lm_head.weight")) continue;
      char name[600];
      snprintf(name, sizeof name, "step3.delta.%s", pn);
      const st_st_entry *e = fx(name);
      int64_t n = st_tensor_numel(&r.P[u][k]);
      CHECK(numel(e->shape, e->ndim) == n);
      double err_t = 0, ref_t = 0;
      for (int64_t q = 0; q < n; q++) {
        double d = ((const double *)r.P[u][k].data)[q] - p0[u * NP + k][q];
        err_t = fmax(err_t, fabs(d - fx_at(e, q)));
        ref_t = fmax(ref_t, fabs(fx_at(e, q)));
      }
      CHECK_MSG(err_t <= 1e-9, "AdamW replay: %s after 3 steps off by %.3g (largest change %.3g)", pn, err_t, ref_t);
      CHECK_MSG(ref_t > 0, "AdamW replay: %s did not move in torch (decay alone should move it)", pn);
      if (err_t > worst) {
        worst = err_t;
        worst_name = pn;
      }
      worst_rel = fmax(worst_rel, err_t / ref_t);
      dmax = fmax(dmax, ref_t);
      n_cmp++;
    }
  CHECK(n_cmp == 2 * 11 + 2);
  fprintf(stderr, "AdamW replay: 3 steps, loss rel err %.3g / %.3g / %.3g; %d parameters after step 3: max |p - torch| "
          "%.3g (%s), worst per-tensor |err| / max |change| %.3g (changes up to %.3g)\n", loss_err[0], loss_err[1],
          loss_err[2], n_cmp, worst, worst_name, worst_rel, dmax);
  for (int i = 0; i < U * NP; i++) {
    free(m1[i]);
    free(m2[i]);
    free(p0[i]);
  }
  free(m1);
  free(m2);
  free(p0);
  fbatch_free(&fb);
  qrun_close(&r);
}

/* central differences in float64: (L(p + h) - L(p - h)) / 2h against the analytic gradient.
 * Truncation O(h^2 L''') ~ 1e-10 and rounding ~1e-16/h ~ 1e-11 for h = 1e-5 (the routing does not
 * flip at this step size), so 1e-6 relative plus 1e-9 absolute is strict. */
static void fd_check(qrun *r, const st_sample *samples, int n_samples, const char *name, int64_t idx) {
  st_error err_ = {0}, *err = &err_;
  int u, k;
  if (!find_param(r, name, &u, &k)) {
    CHECK_MSG(false, "no parameter %s", name);
    return;
  }
  zero_grads(r);
  st_loss l0, lp, lm;
  CHECK_OK(step(r, samples, n_samples, true, &l0, NULL, NULL, 0, err), err);
  double g = get(r->dt, r->G[u][k].data, idx), p0 = get(r->dt, r->P[u][k].data, idx), h = 1e-5;
  set(r->dt, r->P[u][k].data, idx, p0 + h);
  CHECK_OK(step(r, samples, n_samples, false, &lp, NULL, NULL, 0, err), err);
  set(r->dt, r->P[u][k].data, idx, p0 - h);
  CHECK_OK(step(r, samples, n_samples, false, &lm, NULL, NULL, 0, err), err);
  set(r->dt, r->P[u][k].data, idx, p0);
  double fd = (lp.loss - lm.loss) / (2 * h);
  CHECK_MSG(fabs(fd - g) <= 1e-6 * fabs(fd) + 1e-9, "FD %s[%lld]: analytic %.12g, numeric %.12g", name,
            (long long)idx, g, fd);
}

static void test_finite_differences(void) {
  st_error err_ = {0}, *err = &err_;
  qrun r;
  CHECK_OK(qrun_open(&r, tiny_json("fp64"), err), err);
  if (!r.ctx) return;
  CHECK(load_params(&r) == 0);
  fbatch fb;
  fbatch_make(&fb, false);
  static const struct { const char *name; int64_t idx; } cases[] = {
      {"model.language_model.embed_tokens.weight", 0}, /* replaced below by a used token's row */
      {"model.language_model.layers.0.input_layernorm.weight", 5},
      {"model.language_model.layers.0.self_attn.q_proj.weight", 700},
      {"model.language_model.layers.0.self_attn.k_proj.weight", 1234},
      {"model.language_model.layers.0.self_attn.q_norm.weight", 3},   /* MRoPE pairs (j, j+16) */
      {"model.language_model.layers.0.self_attn.k_norm.weight", 20},
      {"model.language_model.layers.0.mlp.gate.weight", 7 * 64 + 9},  /* an idle expert: aux only */
      {"model.language_model.layers.0.mlp.gate.weight", 2 * 64 + 30}, /* main loss + aux */
      {"model.language_model.layers.1.mlp.experts.gate_up_proj", 3 * 64 * 64 + 5 * 64 + 10}, /* gate half */
      {"model.language_model.layers.1.mlp.experts.gate_up_proj", 1 * 64 * 64 + 7 * 64 + 40}, /* up half */
      {"model.language_model.layers.1.mlp.experts.down_proj", 0 * 32 * 64 + 11 * 64 + 3},
      {"model.language_model.layers.1.self_attn.o_proj.weight", 999},
      {"model.language_model.layers.1.post_attention_layernorm.weight", 17},
      {"model.language_model.norm.weight", 40},
      {"lm_head.weight", 77 * 64 + 3},
  };
  char used[600];
  int64_t tok = (int64_t)fx_at(fx("in.input_ids"), 5);
  snprintf(used, sizeof used, "%s", cases[0].name);
  fd_check(&r, fb.samples, 2, used, tok * 64 + 11);
  for (size_t i = 1; i < sizeof cases / sizeof cases[0]; i++) fd_check(&r, fb.samples, 2, cases[i].name, cases[i].idx);
  fbatch_free(&fb);
  qrun_close(&r);
}

/* ---- images: the vision tower, the merged image tokens, DeepStack, 3-D positions ---- */
typedef struct vbatch {
  int n;
  st_sample samples[3];
  st_tensor t[3][6];
  const char *names[3][6];
  void *buf[3][6];
} vbatch;

/* one sample's items of one kind (images or videos) from the fixture's concatenated tensors */
static int vbatch_items(vbatch *vb, int i, int nt, const char *px_name, const char *gr_name, const char *per_name,
                        int64_t *item0, int64_t *patch0) {
  const st_st_entry *px = fx(px_name), *gr = fx(gr_name), *per = fx(per_name);
  int64_t ni = (int64_t)fx_at(per, i), np = 0, pd = px->shape[1];
  if (!ni) return nt;
  for (int64_t g = *item0; g < *item0 + ni; g++)
    np += (int64_t)(fx_at(gr, 3 * g) * fx_at(gr, 3 * g + 1) * fx_at(gr, 3 * g + 2));
  double *pp = malloc(sizeof(double) * (size_t)(np * pd));
  int64_t *pg = malloc(sizeof(int64_t) * (size_t)(3 * ni));
  for (int64_t q = 0; q < np * pd; q++) pp[q] = fx_at(px, *patch0 * pd + q);
  for (int64_t q = 0; q < 3 * ni; q++) pg[q] = (int64_t)fx_at(gr, 3 * *item0 + q);
  vb->names[i][nt] = !strcmp(px_name, "in.pixel_values") ? "pixel_values" : "pixel_values_videos";
  vb->buf[i][nt] = pp;
  vb->t[i][nt++] = st_tensor_make(pp, ST_F64, CPU, 2, (int64_t[]){np, pd});
  vb->names[i][nt] = !strcmp(gr_name, "in.image_grid_thw") ? "image_grid_thw" : "video_grid_thw";
  vb->buf[i][nt] = pg;
  vb->t[i][nt++] = st_tensor_make(pg, ST_I64, CPU, 2, (int64_t[]){ni, 3});
  *item0 += ni;
  *patch0 += np;
  return nt;
}

/* built from FX (pointing at the image fixture): sample 0 holds image 0, sample 1 images 1 and 2,
 * sample 2 image 3 and the video */
static void vbatch_make(vbatch *vb) {
  static const char *ids_ids[3] = {"vision/0", "vision/1", "vision/2"};
  memset(vb, 0, sizeof *vb);
  const st_st_entry *ids = fx("in.input_ids"), *lab = fx("in.labels");
  int64_t S = ids->shape[1], img0 = 0, ipatch0 = 0, vid0 = 0, vpatch0 = 0;
  vb->n = (int)ids->shape[0];
  for (int i = 0; i < vb->n; i++) {
    int64_t *pi = malloc(sizeof(int64_t) * (size_t)S), *pl = malloc(sizeof(int64_t) * (size_t)S);
    for (int64_t t = 0; t < S; t++) pi[t] = (int64_t)fx_at(ids, i * S + t), pl[t] = (int64_t)fx_at(lab, i * S + t);
    int nt = 0;
    vb->names[i][nt] = "input_ids", vb->buf[i][nt] = pi;
    vb->t[i][nt++] = st_tensor_make(pi, ST_I64, CPU, 1, (int64_t[]){S});
    vb->names[i][nt] = "labels", vb->buf[i][nt] = pl;
    vb->t[i][nt++] = st_tensor_make(pl, ST_I64, CPU, 1, (int64_t[]){S});
    nt = vbatch_items(vb, i, nt, "in.pixel_values", "in.image_grid_thw", "in.images_per_sample", &img0, &ipatch0);
    nt = vbatch_items(vb, i, nt, "in.pixel_values_videos", "in.video_grid_thw", "in.videos_per_sample", &vid0, &vpatch0);
    vb->samples[i] = (st_sample){.id = ids_ids[i], .n_tensors = nt, .names = vb->names[i], .tensors = vb->t[i]};
  }
}

static void vbatch_free(vbatch *vb) {
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < 6; j++) free(vb->buf[i][j]);
}

/* against transformers with images, same tolerances and reasoning as the text-only comparison; every
 * gradient but lm_head's (checked by the text fixture) is in the file */
static void test_vision_fixture(const char *dtype, double tol_out, double tol_grad) {
  st_error err_ = {0}, *err = &err_;
  qrun r;
  CHECK_OK(qrun_open(&r, tiny_json(dtype), err), err);
  if (!r.ctx) return;
  CHECK(load_params_from(&r, FXV) == 0);
  st_safetensors *text_fx = FX;
  FX = FXV;
  vbatch vb;
  vbatch_make(&vb);
  const st_st_entry *le = fx("out.logits");
  int64_t nlog = numel(le->shape, le->ndim), Tk = le->shape[0] * le->shape[1] * 2;
  double *logits = calloc((size_t)nlog, sizeof *logits);
  int32_t *routing = calloc((size_t)(2 * Tk), sizeof *routing);
  st_loss lo;
  zero_grads(&r);
  CHECK(vb.n == 3 && vb.samples[2].n_tensors == 6); /* sample 2: an image and a video */
  CHECK_OK(step(&r, vb.samples, vb.n, true, &lo, logits, routing, Tk, err), err);
  double num = 0, den = 0;
  for (int64_t i = 0; i < nlog; i++) {
    num = fmax(num, fabs(logits[i] - fx_at(le, i)));
    den = fmax(den, fabs(fx_at(le, i)));
  }
  double out_err = num / den;
  double loss_err = fabs(lo.loss - fx_at(fx("out.loss"), 0)) / fabs(fx_at(fx("out.loss"), 0));
  double aux_err = fabs(metric(&lo, "moe/aux_loss") - fx_at(fx("out.aux_loss"), 0)) / fx_at(fx("out.aux_loss"), 0);
  CHECK_MSG(out_err <= tol_out, "%s image batch: logits rel err %.3g > %.3g", dtype, out_err, tol_out);
  CHECK_MSG(loss_err <= tol_out, "%s image batch: loss %.15g vs transformers %.15g", dtype, lo.loss,
            fx_at(fx("out.loss"), 0));
  CHECK_MSG(aux_err <= tol_out, "%s image batch: aux rel err %.3g", dtype, aux_err);
  int route_mismatch = 0;
  for (int64_t l = 0; l < 2; l++) {
    char name[64];
    snprintf(name, sizeof name, "out.router_topk.%lld", (long long)l);
    for (int64_t i = 0; i < Tk; i++) route_mismatch += routing[l * Tk + i] != (int32_t)fx_at(fx(name), i);
  }
  CHECK_MSG(route_mismatch == 0, "%s image batch: %d router choices differ", dtype, route_mismatch);
  double gmax = 0;
  const char *worst = "";
  int n_tensors = 0, n_visual = 0;
  for (int u = 0; u < r.d->n_units; u++)
    for (int k = 0; k < r.d->units[u].n_params; k++) {
      const st_param_desc *p = &r.d->units[u].params[k];
      char name[600];
      snprintf(name, sizeof name, "grad.%s", p->name);
      const st_st_entry *ge = st_safetensors_find(FX, name);
      if (!ge) {
        CHECK_MSG(!strcmp(p->name, "lm_head.weight"), "image fixture lacks %s", name);
        continue;
      }
      double refmax = 0, e = tensor_rel_err(r.dt, r.G[u][k].data, ge, numel(p->shape, p->ndim), &refmax);
      if (refmax == 0) e = e > 0 ? INFINITY : 0;
      CHECK_MSG(e <= tol_grad, "%s image batch: grad %s rel err %.3g > %.3g", dtype, p->name, e, tol_grad);
      if (e > gmax) {
        gmax = e;
        worst = p->name;
      }
      n_tensors++;
      n_visual += is_visual(p->name);
    }
  CHECK(n_tensors == 81 && n_visual == 3 + 3 * 12 + 2 * 6 + 6);
  /* the image-token id's embedding row gets nothing: those rows were replaced by vision features */
  int u, k;
  CHECK(find_param(&r, "model.language_model.embed_tokens.weight", &u, &k));
  double mx = 0;
  for (int64_t q = 0; q < 64; q++) mx = fmax(mx, fabs(get(r.dt, r.G[u][k].data, 489 * 64 + q)));
  CHECK_MSG(mx == 0.0, "image-token embedding row has gradient %.3g", mx);
  fprintf(stderr, "%s image batch: logits rel err %.3g, loss %.3g, aux %.3g, routing mismatches %d, worst of %d "
          "gradients (%d vision) %.3g (%s)\n", dtype, out_err, loss_err, aux_err, route_mismatch, n_tensors, n_visual,
          gmax, worst);
  if (!strcmp(dtype, "fp64")) {
    /* finite differences through the tower: patch embedding, resampled position table, a block's
     * norm / qkv (q, k and v rows) / MLP, the deepstack mergers (into LM layers 0 and 1), the merger */
    static const struct { const char *name; int64_t idx; } cases[] = {
        {"model.visual.patch_embed.proj.weight", 1000},
        {"model.visual.patch_embed.proj.bias", 7},
        {"model.visual.pos_embed.weight", 5 * 32 + 3},
        {"model.visual.blocks.0.norm1.weight", 4},
        {"model.visual.blocks.1.norm1.bias", 30},
        {"model.visual.blocks.0.attn.qkv.weight", 5 * 32 + 1},
        {"model.visual.blocks.1.attn.qkv.weight", 40 * 32 + 17},
        {"model.visual.blocks.2.attn.qkv.weight", 70 * 32 + 9},
        {"model.visual.blocks.2.attn.qkv.bias", 40},
        {"model.visual.blocks.2.mlp.linear_fc1.weight", 333},
        {"model.visual.blocks.1.norm2.weight", 12},
        {"model.visual.deepstack_merger_list.0.norm.weight", 77},
        {"model.visual.deepstack_merger_list.1.linear_fc1.bias", 5},
        {"model.visual.deepstack_merger_list.0.linear_fc2.weight", 3 * 128 + 100},
        {"model.visual.merger.norm.bias", 9},
        {"model.visual.merger.linear_fc1.weight", 2000},
        {"model.visual.merger.linear_fc2.bias", 60},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
      fd_check(&r, vb.samples, vb.n, cases[i].name, cases[i].idx);
  }
  FX = text_fx;
  vbatch_free(&vb);
  free(logits);
  free(routing);
  qrun_close(&r);
}

/* LoRA on the attention projections: B = 0 leaves the model unchanged, base tensors get no gradient
 * buffers, adapter gradients match finite differences once B is non-zero (text and image batches),
 * and the exports: PEFT keys / config, and the merged transformers tensor W + (alpha/r) B A */
typedef struct list_sink {
  st_tensor_sink pub;
  int n;
  char names[1024][128];
  char file[4096], file_name[64];
  const char *probe;
  int64_t probe_idx;
  double probe_val;
} list_sink;

static st_result list_put(st_tensor_sink *sk, const char *name, const st_tensor *t, st_error *err) {
  (void)err;
  list_sink *l = sk->self;
  if (l->n < 1024) snprintf(l->names[l->n], 128, "%s", name);
  l->n++;
  if (l->probe && !strcmp(name, l->probe)) l->probe_val = ((const float *)t->data)[l->probe_idx];
  return ST_OK;
}

static st_result list_put_file(st_tensor_sink *sk, const char *filename, const void *bytes, size_t len, st_error *err) {
  (void)err;
  list_sink *l = sk->self;
  snprintf(l->file_name, sizeof l->file_name, "%s", filename);
  snprintf(l->file, sizeof l->file, "%.*s", (int)len, (const char *)bytes);
  return ST_OK;
}

static void test_lora(void) {
  st_error err_ = {0}, *err = &err_;
  qrun r;
  const char *json = "{\"model\": {\"name\": \"qwen3_vl_moe\", \"preset\": \"tiny\", \"dtype\": \"fp64\", "
                     "\"overrides\": {\"vocab_size\": 512, \"image_token_id\": 489, \"video_token_id\": 490}, \"lora\": {\"rank\": 4, \"alpha\": 8}}}";
  CHECK_OK(qrun_open(&r, json, err), err);
  if (!r.ctx) return;
  CHECK(load_params_from(&r, FXV) == 0);
  int n_lora = 0, n_base_trainable = 0;
  for (int u = 0; u < r.d->n_units; u++)
    for (int k = 0; k < r.d->units[u].n_params; k++) {
      const st_param_desc *p = &r.d->units[u].params[k];
      if (p->flags & ST_PARAM_LORA) {
        n_lora++;
        CHECK((p->flags & ST_PARAM_TRAINABLE) && r.G[u][k].data);
        CHECK_OK(PL->init_param(r.ctx, 99, u, k, 0, st_tensor_numel(&r.P[u][k]), ST_F64, r.P[u][k].data, err), err);
      } else {
        n_base_trainable += (p->flags & ST_PARAM_TRAINABLE) != 0;
      }
    }
  CHECK_MSG(n_lora == 2 * 4 * 2, "LoRA tensors: %d", n_lora);
  CHECK(n_base_trainable == 0);
  fbatch fb;
  fbatch_make(&fb, false);
  st_loss lo;
  CHECK_OK(step(&r, fb.samples, 2, true, &lo, NULL, NULL, 0, err), err);
  CHECK_CLOSE(lo.loss, fx_at(fx("out.loss"), 0), 1e-12, 0); /* B = 0: the base model */
  for (int u = 0; u < r.d->n_units; u++)
    for (int k = 0; k < r.d->units[u].n_params; k++)
      if (strstr(r.d->units[u].params[k].name, "lora_B"))
        HOST->rng->normal(7, (uint64_t)(u * 100 + k), 0, st_tensor_numel(&r.P[u][k]), 0.0, 0.05, ST_F64,
                          r.P[u][k].data);
  const char *pre = "model.language_model.layers.";
  char nm[256];
  static const struct { int layer; const char *mod, *ab; int64_t idx; } cases[] = {
      {0, "q_proj", "lora_A", 21}, {0, "q_proj", "lora_B", 9},   {0, "k_proj", "lora_A", 100},
      {1, "v_proj", "lora_B", 50}, {1, "o_proj", "lora_A", 300}, {1, "o_proj", "lora_B", 70},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    snprintf(nm, sizeof nm, "%s%d.self_attn.%s.%s.weight", pre, cases[i].layer, cases[i].mod, cases[i].ab);
    fd_check(&r, fb.samples, 2, nm, cases[i].idx);
  }
  st_safetensors *text_fx = FX;
  FX = FXV;
  vbatch vb;
  vbatch_make(&vb);
  snprintf(nm, sizeof nm, "%s0.self_attn.v_proj.lora_A.weight", pre);
  fd_check(&r, vb.samples, vb.n, nm, 77);
  vbatch_free(&vb);
  FX = text_fx;
  /* exports */
  run_source src = {.pub = {.read = run_read}, .r = &r};
  src.pub.self = &src;
  list_sink *ls = calloc(1, sizeof *ls);
  ls->pub = (st_tensor_sink){.self = ls, .put = list_put, .put_file = list_put_file};
  int u, kw, ka, kb;
  snprintf(nm, sizeof nm, "%s1.self_attn.o_proj.weight", pre);
  CHECK(find_param(&r, nm, &u, &kw));
  snprintf(nm, sizeof nm, "%s1.self_attn.o_proj.lora_A.weight", pre);
  CHECK(find_param(&r, nm, &u, &ka));
  snprintf(nm, sizeof nm, "%s1.self_attn.o_proj.lora_B.weight", pre);
  CHECK(find_param(&r, nm, &u, &kb));
  /* o_proj [64, 128], A [4, 128], B [64, 4]: merged W[5][7] = W + 2 sum_c B[5][c] A[c][7] */
  const double *W = r.P[u][kw].data, *A = r.P[u][ka].data, *Bm = r.P[u][kb].data;
  double expect = W[5 * 128 + 7];
  for (int c = 0; c < 4; c++) expect += 2.0 * Bm[5 * 4 + c] * A[c * 128 + 7];
  snprintf(nm, sizeof nm, "%s1.self_attn.o_proj.weight", pre);
  ls->probe = nm;
  ls->probe_idx = 5 * 128 + 7;
  CHECK_OK(PL->export_weights(r.ctx, "transformers", true, &src.pub, &ls->pub, err), err);
  CHECK_CLOSE(ls->probe_val, expect, 1e-6, 1e-7);
  CHECK(fabs(expect - W[5 * 128 + 7]) > 1e-4); /* the merge changed it */
  int base = 0;
  for (int uu = 0; uu < r.d->n_units; uu++)
    for (int k = 0; k < r.d->units[uu].n_params; k++) base += !(r.d->units[uu].params[k].flags & ST_PARAM_LORA);
  CHECK_MSG(ls->n == base, "transformers export wrote %d tensors, the model has %d base tensors", ls->n, base);
  CHECK(!strcmp(ls->file_name, "config.json"));
  CHECK_CONTAINS(ls->file, "\"architectures\": [\"Qwen3VLMoeForConditionalGeneration\"]");
  CHECK_CONTAINS(ls->file, "\"mrope_section\": [6, 5, 5], \"mrope_interleaved\": true");
  CHECK_CONTAINS(ls->file, "\"deepstack_visual_indexes\": [0, 1]");
  CHECK_CONTAINS(ls->file, "\"image_token_id\": 489");
  ls->n = 0;
  snprintf(nm, sizeof nm, "base_model.model.%s1.self_attn.o_proj.lora_B.weight", pre);
  ls->probe_idx = 5;
  CHECK_OK(PL->export_weights(r.ctx, "peft", false, &src.pub, &ls->pub, err), err);
  CHECK_CLOSE(ls->probe_val, Bm[5], 1e-6, 1e-9);
  CHECK(ls->n == 16);
  CHECK(!strcmp(ls->names[0], "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"));
  CHECK(!strcmp(ls->file_name, "adapter_config.json"));
  CHECK_CONTAINS(ls->file, "\"r\": 4");
  CHECK_CONTAINS(ls->file, "\"lora_alpha\": 8");
  CHECK_CONTAINS(ls->file, "\"target_modules\": [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]");
  CHECK(PL->export_weights(r.ctx, "diffusers", false, &src.pub, &ls->pub, err) == ST_ERR_UNSUPPORTED);
  free(ls);
  fbatch_free(&fb);
  qrun_close(&r);
}

/* the released text model, described without allocating a parameter */
static void test_preset_30b(void) {
  st_error err_ = {0}, *err = &err_;
  st_config *cfg = NULL;
  CHECK_OK(st_config_load_string("{\"model\": {\"name\": \"qwen3_vl_moe\"}}", "test", &cfg, err), err);
  void *ctx = NULL;
  CHECK_OK(PL->init(HOST, st_config_node(cfg, "model"), &ctx, err), err);
  if (!ctx) return;
  const st_model_desc *d = PL->describe(ctx);
  int64_t total = 0, experts = 0;
  int tensors = 0;
  for (int u = 0; u < d->n_units; u++)
    for (int k = 0; k < d->units[u].n_params; k++, tensors++) {
      int64_t n = numel(d->units[u].params[k].shape, d->units[u].params[k].ndim);
      total += n;
      if (d->units[u].params[k].flags & ST_PARAM_EXPERT) experts += n;
    }
  /* independent count from reference §1-2: V=151936, H=2048, L=48, q 32x128, kv 4x128, E=128, I=768 */
  int64_t V = 151936, H = 2048, Lr = 48, Qd = 4096, KVd = 512, E = 128, I = 768;
  int64_t per_layer = 2 * H + Qd * H + 2 * KVd * H + H * Qd + 2 * 128 + E * H + E * H * 2 * I + E * I * H;
  int64_t text = 2 * V * H + H + Lr * per_layer;
  CHECK(text == 30532122624LL); /* ~30.53B text parameters (reference §1) */
  /* vision (reference §2): 27 blocks of 1152 wide, MLP 4304, patch 3x2x16x16, 48x48 grid, mergers 4608 */
  int64_t Hv = 1152, Vi = 4304, M4 = 4608;
  int64_t block = 4 * Hv + 3 * Hv * Hv + 3 * Hv + Hv * Hv + Hv + Vi * Hv + Vi + Hv * Vi + Hv;
  int64_t merger_main = 2 * Hv + M4 * M4 + M4 + H * M4 + H, merger_ds = 2 * M4 + M4 * M4 + M4 + H * M4 + H;
  int64_t vision = Hv * 1536 + Hv + 2304 * Hv + 27 * block + merger_main + 3 * merger_ds;
  CHECK(vision == 538631408LL); /* ~0.54B */
  int64_t expect = text + vision;
  CHECK(expect == 31070754032LL); /* the "31.07B" of the model card */
  CHECK(total == expect);
  CHECK(d->n_params_total == expect);
  CHECK(experts == 48LL * 128 * 3 * 2048 * 768); /* 28.99B in experts */
  CHECK(tensors == 1 + 48 * 11 + 2 + 3 + 27 * 12 + 3 * 6 + 6);
  CHECK(d->n_units == 29 + 50);
  CHECK(d->hidden_size == 2048);
  CHECK(!strcmp(d->units[0].name, "vision.patch_embed") && !strcmp(d->units[9].name, "vision.block.8") &&
        !strcmp(d->units[28].name, "vision.merger") && !strcmp(d->units[29].name, "embed") &&
        !strcmp(d->units[30].name, "layer.0") && !strcmp(d->units[78].name, "final"));
  /* deepstack mergers ride with the blocks that feed them: block 8 has 12 + 6 tensors */
  CHECK(d->units[9].n_params == 18 && d->units[8].n_params == 12);
  CHECK(!strcmp(d->units[9].params[12].name, "model.visual.deepstack_merger_list.0.norm.weight"));
  CHECK(d->units[0].params[0].ndim == 5 && d->units[0].params[0].shape[1] == 3 && d->units[0].params[0].shape[4] == 16);
  int u, k;
  qrun fake = {.d = d};
  CHECK(find_param(&fake, "model.language_model.layers.47.mlp.experts.gate_up_proj", &u, &k));
  const st_param_desc *gu = &d->units[u].params[k];
  CHECK(gu->ndim == 3 && gu->shape[0] == 128 && gu->shape[1] == 2048 && gu->shape[2] == 1536);
  CHECK(gu->flags & ST_PARAM_EXPERT);
  CHECK(find_param(&fake, "model.language_model.layers.47.mlp.gate.weight", &u, &k));
  CHECK(!(d->units[u].params[k].flags & ST_PARAM_EXPERT)); /* the router is a dense parameter */
  CHECK(find_param(&fake, "lm_head.weight", &u, &k) && u == 78);
  PL->finalize(ctx);
  st_config_free(cfg);
}

static void test_config_errors(void) {
  expect_config_error("{\"model\": {\"name\": \"qwen3_vl_moe\", \"presett\": \"tiny\"}}", "presett");
  expect_config_error("{\"model\": {\"name\": \"qwen3_vl_moe\", \"overrides\": {\"num_expert\": 3}}}", "num_expert");
  expect_config_error("{\"model\": {\"name\": \"qwen3_vl_moe\", \"preset\": \"tiny\", \"overrides\": "
                      "{\"mrope_section\": [6, 5, 6]}}}", "mrope_section");
  expect_config_error("{\"model\": {\"name\": \"qwen3_vl_moe\", \"preset\": \"tiny\", \"overrides\": "
                      "{\"num_key_value_heads\": 3}}}", "num_key_value_heads");
  expect_config_error("{\"model\": {\"name\": \"qwen3_vl_moe\", \"preset\": \"tiny\", \"overrides\": "
                      "{\"num_experts_per_tok\": 9}}}", "num_experts_per_tok");
  expect_config_error("{\"model\": {\"name\": \"qwen3_vl_moe\", \"preset\": \"large\"}}", "preset");
  expect_config_error("{\"model\": {\"name\": \"qwen3_vl_moe\", \"preset\": \"tiny\", \"lora\": "
                      "{\"target_modules\": [\"qkv\"]}}}", "qkv");
  expect_config_error("{\"model\": {\"name\": \"qwen3_vl_moe\", \"preset\": \"tiny\", \"lora\": "
                      "{\"rank\": 0}}}", "model.lora.rank");
  expect_config_error("{\"model\": {\"name\": \"qwen3_vl_moe\", \"preset\": \"tiny\", \"overrides\": "
                      "{\"vision_config\": {\"deepstack_visual_indexes\": [1, 0]}}}}", "deepstack_visual_indexes");
  expect_config_error("{\"model\": {\"name\": \"qwen3_vl_moe\", \"preset\": \"tiny\", \"overrides\": "
                      "{\"vision_config\": {\"num_position_embeddings\": 15}}}}", "square");
}

/* init_param is a pure function of (seed, unit, param, index): any shard split agrees */
static void test_init_param(void) {
  st_error err_ = {0}, *err = &err_;
  qrun r;
  CHECK_OK(qrun_open(&r, tiny_json("fp32"), err), err);
  if (!r.ctx) return;
  int u, k;
  CHECK(find_param(&r, "model.language_model.layers.1.mlp.experts.down_proj", &u, &k));
  float whole[1024], a[1024];
  CHECK_OK(PL->init_param(r.ctx, 5, u, k, 0, 1024, ST_F32, whole, err), err);
  CHECK_OK(PL->init_param(r.ctx, 5, u, k, 0, 300, ST_F32, a, err), err);
  CHECK_OK(PL->init_param(r.ctx, 5, u, k, 300, 724, ST_F32, a + 300, err), err);
  CHECK(memcmp(whole, a, sizeof a) == 0);
  double s2 = 0;
  for (int i = 0; i < 1024; i++) s2 += (double)whole[i] * whole[i];
  CHECK_CLOSE(sqrt(s2 / 1024), 0.02, 0.1, 0); /* std 0.02 within sampling noise */
  CHECK(find_param(&r, "model.language_model.layers.1.self_attn.k_norm.weight", &u, &k));
  CHECK_OK(PL->init_param(r.ctx, 5, u, k, 0, 32, ST_F32, a, err), err);
  CHECK(a[0] == 1.0f && a[31] == 1.0f);
  CHECK(r.d->units[u].params[k].flags & ST_PARAM_NO_DECAY);
  qrun_close(&r);
}

/* ---- synthetic samples, batch errors ---- */

static void test_synth_and_batch_errors(void) {
  st_error err_ = {0}, *err = &err_;
  qrun r;
  CHECK_OK(qrun_open(&r, "{\"model\": {\"name\": \"qwen3_vl_moe\", \"preset\": \"tiny\"}}", err), err);
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
    CHECK_OK(PL->synth_sample(r.ctx, 42, i * 9 + i, &cs[i].pub, err), err);
    for (int j = 0; j < cs[i].n; j++) nm[i][j] = cs[i].names[j];
    smp[i] = (st_sample){.id = i == 0 ? "synth/0" : i == 1 ? "synth/10" : "synth/20", .n_tensors = cs[i].n,
                         .names = nm[i], .tensors = cs[i].t};
  }
  CHECK(cs[0].n == 4 && !strcmp(cs[0].names[0], "input_ids") && !strcmp(cs[0].names[1], "labels") &&
        !strcmp(cs[0].names[2], "pixel_values") && !strcmp(cs[0].names[3], "image_grid_thw"));
  CHECK(cs[0].t[0].dtype == ST_I64 && cs[0].t[0].shape[0] == 32);
  CHECK(cs[1].t[0].shape[0] != cs[0].t[0].shape[0]); /* lengths vary: batches pad */
  CHECK(cs[0].t[2].shape[0] == 16 && cs[0].t[2].shape[1] == 3 * 2 * 4 * 4); /* one 4x4-patch image */
  const int64_t *lab = cs[0].t[1].data, *ids = cs[0].t[0].data;
  CHECK(ids[0] == 1001 && ids[3] == 1001 && ids[4] != 1001); /* 4 image tokens first */
  CHECK(lab[0] == -100 && lab[7] == -100 && lab[8] == ids[8]);
  CHECK(ids[12] == ids[4] && ids[13] == ids[5]); /* a period-8 cycle */
  st_loss lo;
  CHECK_OK(step(&r, smp, 3, true, &lo, NULL, NULL, 0, err), err);
  CHECK(isfinite(lo.loss) && lo.loss > 0);
  CHECK_CLOSE(metric(&lo, "lm/ce_loss"), log(1024.0), 0.05, 0); /* near-uniform at init */
  CHECK(metric(&lo, "moe/load_cv") >= 0 && isfinite(metric(&lo, "moe/load_cv")));
  /* the images reach the tower: its parameters get gradient */
  int u, k;
  CHECK(find_param(&r, "model.visual.blocks.2.attn.qkv.weight", &u, &k));
  double gmx = 0;
  for (int64_t q = 0; q < st_tensor_numel(&r.G[u][k]); q++) gmx = fmax(gmx, fabs(get(r.dt, r.G[u][k].data, q)));
  CHECK(gmx > 0);
  cap_sink again = {.pub = {.self = &again, .put = cap_put}};
  CHECK_OK(PL->synth_sample(r.ctx, 42, 0, &again.pub, err), err);
  CHECK(memcmp(again.t[0].data, cs[0].t[0].data, st_tensor_nbytes(&cs[0].t[0])) == 0);
  CHECK(memcmp(again.t[2].data, cs[0].t[2].data, st_tensor_nbytes(&cs[0].t[2])) == 0);
  for (int j = 0; j < again.n; j++) free(again.t[j].data);
  void *bctx = NULL;
  st_batch bad = {.n_samples = 3, .samples = smp, .seed = 1};
  /* a token id outside the vocabulary: an error naming the sample and the position */
  ((int64_t *)cs[2].t[0].data)[6] = 5000;
  CHECK(PL->batch_prepare(r.ctx, &bad, &bctx, err) == ST_ERR_FORMAT);
  CHECK_CONTAINS(err->where, "synth/20");
  CHECK_CONTAINS(err->message, "input_ids[6]");
  ((int64_t *)cs[2].t[0].data)[6] = 5;
  /* no input_ids at all */
  smp[2].names = (const char *const[]){"tokens", "labels", "pixel_values", "image_grid_thw"};
  CHECK(PL->batch_prepare(r.ctx, &bad, &bctx, err) == ST_ERR_FORMAT);
  CHECK_CONTAINS(err->message, "input_ids");
  /* pixel_values without image_grid_thw */
  smp[2].names = (const char *const[]){"input_ids", "labels", "pixel_values", "grid"};
  CHECK(PL->batch_prepare(r.ctx, &bad, &bctx, err) == ST_ERR_FORMAT);
  CHECK_CONTAINS(err->message, "image_grid_thw");
  /* image tokens without images */
  smp[2].names = (const char *const[]){"input_ids", "labels", "pix", "grid"};
  CHECK(PL->batch_prepare(r.ctx, &bad, &bctx, err) == ST_ERR_FORMAT);
  CHECK_CONTAINS(err->message, "image tokens");
  /* a grid that does not describe the pixel rows */
  smp[2].names = (const char *const[]){"input_ids", "labels", "pixel_values", "image_grid_thw"};
  ((int64_t *)cs[2].t[3].data)[2] = 6;
  CHECK(PL->batch_prepare(r.ctx, &bad, &bctx, err) == ST_ERR_FORMAT);
  CHECK_CONTAINS(err->message, "describes 24 patches");
  ((int64_t *)cs[2].t[3].data)[2] = 3;
  CHECK(PL->batch_prepare(r.ctx, &bad, &bctx, err) == ST_ERR_FORMAT);
  CHECK_CONTAINS(err->message, "multiples of spatial_merge_size");
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < cs[i].n; j++) free(cs[i].t[j].data);
  qrun_close(&r);
}

/* the shipped demo config passes the core's schema and the plugin's own validation */
static void test_shipped_configs(void) {
  const char *root = getenv("ST_SOURCE_ROOT");
  if (!root) return;
  static const char *files[] = {"configs/demo/qwen3_vl_moe_tiny.json"};
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
  if (argc < 4) {
    fprintf(stderr, "usage: %s MODULE.so TEXT_FIXTURE.safetensors IMAGE_FIXTURE.safetensors\n", argv[0]);
    return 1;
  }
  void *so = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!so) {
    fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror());
    return 1;
  }
  PL = dlsym(so, ST_MODEL_PLUGIN_SYMBOL_V1);
  *(void **)&ROUTING = dlsym(so, "strata_qwen3_vl_moe_routing");
  st_error err_ = {0}, *err = &err_;
  CHECK(PL != NULL && ROUTING != NULL);
  if (!PL || !ROUTING) return st_test_finish("qwen3_vl_moe");
  CHECK(!strcmp(PL->header.name, "qwen3_vl_moe") && PL->header.abi_version == ST_ABI_VERSION);
  CHECK_OK(st_cpu_ops_create(2, &OPS, err), err);
  CHECK_OK(st_host_create(&(st_host_options){.ops = OPS, .cpu_ops = OPS, .cfg = st_config_api()}, &HOST, err), err);
  CHECK_OK(st_safetensors_open(argv[2], &FX, err), err);
  CHECK_OK(st_safetensors_open(argv[3], &FXV, err), err);
  if (!OPS || !HOST || !FX || !FXV) return st_test_finish("qwen3_vl_moe");

  test_preset_30b();
  test_config_errors();
  test_init_param();
  test_against_fixture("fp64", 1e-10, 1e-10);
  test_against_fixture("fp32", 1e-5, 1e-4);
  test_vision_fixture("fp64", 1e-10, 1e-10);
  test_vision_fixture("fp32", 1e-5, 1e-4);
  test_permuting_exchange();
  test_adamw_replay();
  test_lora();
  test_finite_differences();
  test_synth_and_batch_errors();
  test_shipped_configs();

  st_safetensors_close(FX);
  st_safetensors_close(FXV);
  st_host_destroy(HOST);
  st_cpu_ops_destroy(OPS);
  dlclose(so);
  return st_test_finish("qwen3_vl_moe");
}
