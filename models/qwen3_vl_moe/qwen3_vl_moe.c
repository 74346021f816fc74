/* qwen3_vl_moe.c — transformers' Qwen3VLMoeForConditionalGeneration (Qwen3-VL-30B-A3B) as a strata
 * model plugin: parameter tables in the transformers state-dict naming (checkpoint expert layout),
 * hand-written forward and backward passes over the ops table for the vision tower and the MoE
 * language model, routed SwiGLU experts exchanged through host->moe, causal-LM cross-entropy plus
 * transformers' pooled load-balancing aux loss, LoRA on the attention projections, exports.
 *
 * Units and what flows between them (B batch, S padded length, T = B*S rows, H hidden, Np patches,
 * Nm = Np / merge^2 image tokens, n_ds DeepStack features):
 *   vision.patch_embed  batch -> v [Np,Hv] = patches W^T + b + bilinear(pos_embed); deepstack = 0
 *   vision.block.i      v -> v (LayerNorm, qkv, 2-D rotary, attention per frame, GELU-tanh MLP);
 *                       a block in deepstack_visual_indexes also writes deepstack[j] = merger_j(v)
 *   vision.merger       v -> img [Nm,H]
 *   embed               img -> h [B,S,H] = embed_tokens[input_ids], image-token rows = img
 *   layer.i             h -> h  (RMSNorm, GQA attention with q/k RMSNorm and interleaved MRoPE, RMSNorm,
 *                       softmax router -> top-k -> renormalise, experts, residuals; + deepstack[i] at
 *                       the image rows for i < n_ds)
 *   final               h -> logits [B,S,V] = lm_head(norm(h))
 * The deepstack carry [n_ds, Nm, H] travels from the tower to the last layer that adds it. Batch
 * constants (token ids, shifted labels, key mask, MRoPE and vision tables, interpolation taps, the
 * per-layer routing on the host and the router statistics of the aux loss) live in the batch
 * context. Math and sources: shared/reference/qwen3_vl_moe.md; comments here say why, not what. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include <strata/model.h>

#include "model_util.h"

#define QM_MAX_PARAMS 16

/* ---- configuration -------------------------------------------------------------------------- */

typedef struct qm_arch {
  int64_t vocab, hidden, layers, heads, kv_heads, head_dim, moe_inter, experts, top_k;
  int64_t mrope[3];
  double rope_theta, rms_eps, aux_coef;
} qm_arch;

/* reference §1 (text_config of Qwen/Qwen3-VL-30B-A3B-Instruct) and §6 (tiny) */
static const qm_arch preset_30b = {151936, 2048, 48, 32, 4, 128, 768, 128, 8, {24, 20, 20}, 5e6, 1e-6, 0.001};
static const qm_arch preset_tiny = {1024, 64, 2, 4, 2, 32, 32, 8, 2, {6, 5, 5}, 1e4, 1e-6, 0.01};

/* the vision tower (transformers Qwen3VLMoeVisionConfig) */
#define QM_MAX_DS 8
typedef struct qm_vision {
  int64_t depth, hidden, heads, inter, patch, tpatch, merge, in_ch, npos, n_ds;
  int64_t ds_idx[QM_MAX_DS];
  double rope_theta;
} qm_vision;

static const qm_vision vision_30b = {27, 1152, 16, 4304, 16, 2, 2, 3, 2304, 3, {8, 16, 24}, 1e4};
static const qm_vision vision_tiny = {3, 32, 2, 64, 4, 2, 2, 3, 16, 2, {0, 1}, 1e4};

typedef struct qm_settings {
  const char *preset;
  qm_arch a;
  qm_vision v;
  bool vision;
  int64_t image_token, video_token, vstart_token, vend_token; /* the vision start/end ids are only exported */
  st_dtype dt;
  int64_t synth_len, synth_prompt;
  bool synth_image;
  /* LoRA on the language model's attention projections (PEFT semantics: y = Wx + (alpha/r) B A x) */
  bool lora;
  int64_t rank;
  double alpha;
  const char *targets[8];
  size_t n_targets;
  bool lora_gaussian;
} qm_settings;

static const char *const lora_modules[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};

static const char *const top_keys[] = {"name", "plugin", "preset", "overrides", "dtype", "weights", "options", "lora",
                                       NULL};
static const char *const lora_keys[] = {"rank", "alpha", "target_modules", "init", NULL};
static const char *const override_keys[] = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                            "num_key_value_heads", "head_dim", "moe_intermediate_size",
                                            "num_experts", "num_experts_per_tok", "mrope_section", "rope_theta",
                                            "rms_norm_eps", "router_aux_loss_coef", "image_token_id", "video_token_id",
                                            "vision_start_token_id", "vision_end_token_id", "vision_config",
                                            NULL};
static const char *const vision_keys[] = {"depth", "hidden_size", "num_heads", "intermediate_size", "patch_size",
                                          "temporal_patch_size", "spatial_merge_size", "in_channels",
                                          "num_position_embeddings", "deepstack_visual_indexes", NULL};
static const char *const option_keys[] = {"synth_seq_len", "synth_prompt_len", "synth_image", "vision", NULL};

static st_result parse_settings(st_cfg *cfg, const st_cfg_api *api, qm_settings *s, st_error *err) {
  memset(s, 0, sizeof *s);
  ST_CHECK(api->check_keys(cfg, top_keys, err));
  ST_CHECK(api->get_enum(cfg, "preset", (const char *const[]){"qwen3-vl-30b-a3b", "tiny", NULL}, "qwen3-vl-30b-a3b",
                         &s->preset, err));
  bool tiny = !strcmp(s->preset, "tiny");
  s->a = tiny ? preset_tiny : preset_30b;
  s->v = tiny ? vision_tiny : vision_30b;
  s->image_token = tiny ? 1001 : 151655;
  s->video_token = tiny ? 1002 : 151656;
  s->vstart_token = tiny ? 1000 : 151652;
  s->vend_token = tiny ? 1003 : 151653;
  qm_arch *a = &s->a;
  qm_vision *v = &s->v;
  st_cfg *ov = NULL;
  ST_CHECK(api->get_object(cfg, "overrides", false, &ov, err));
  if (ov) {
    ST_CHECK(api->check_keys(ov, override_keys, err));
    ST_CHECK(api->get_int(ov, "vocab_size", a->vocab, &a->vocab, err));
    ST_CHECK(api->get_int(ov, "hidden_size", a->hidden, &a->hidden, err));
    ST_CHECK(api->get_int(ov, "num_hidden_layers", a->layers, &a->layers, err));
    ST_CHECK(api->get_int(ov, "num_attention_heads", a->heads, &a->heads, err));
    ST_CHECK(api->get_int(ov, "num_key_value_heads", a->kv_heads, &a->kv_heads, err));
    ST_CHECK(api->get_int(ov, "head_dim", a->head_dim, &a->head_dim, err));
    ST_CHECK(api->get_int(ov, "moe_intermediate_size", a->moe_inter, &a->moe_inter, err));
    ST_CHECK(api->get_int(ov, "num_experts", a->experts, &a->experts, err));
    ST_CHECK(api->get_int(ov, "num_experts_per_tok", a->top_k, &a->top_k, err));
    ST_CHECK(api->get_number(ov, "rope_theta", a->rope_theta, &a->rope_theta, err));
    ST_CHECK(api->get_number(ov, "rms_norm_eps", a->rms_eps, &a->rms_eps, err));
    ST_CHECK(api->get_number(ov, "router_aux_loss_coef", a->aux_coef, &a->aux_coef, err));
    ST_CHECK(api->get_int(ov, "image_token_id", s->image_token, &s->image_token, err));
    ST_CHECK(api->get_int(ov, "video_token_id", s->video_token, &s->video_token, err));
    ST_CHECK(api->get_int(ov, "vision_start_token_id", s->vstart_token, &s->vstart_token, err));
    ST_CHECK(api->get_int(ov, "vision_end_token_id", s->vend_token, &s->vend_token, err));
    st_cfg *vo = NULL;
    ST_CHECK(api->get_object(ov, "vision_config", false, &vo, err));
    if (vo) {
      ST_CHECK(api->check_keys(vo, vision_keys, err));
      ST_CHECK(api->get_int(vo, "depth", v->depth, &v->depth, err));
      ST_CHECK(api->get_int(vo, "hidden_size", v->hidden, &v->hidden, err));
      ST_CHECK(api->get_int(vo, "num_heads", v->heads, &v->heads, err));
      ST_CHECK(api->get_int(vo, "intermediate_size", v->inter, &v->inter, err));
      ST_CHECK(api->get_int(vo, "patch_size", v->patch, &v->patch, err));
      ST_CHECK(api->get_int(vo, "temporal_patch_size", v->tpatch, &v->tpatch, err));
      ST_CHECK(api->get_int(vo, "spatial_merge_size", v->merge, &v->merge, err));
      ST_CHECK(api->get_int(vo, "in_channels", v->in_ch, &v->in_ch, err));
      ST_CHECK(api->get_int(vo, "num_position_embeddings", v->npos, &v->npos, err));
      if (api->type(vo, "deepstack_visual_indexes") != ST_CFG_ABSENT) {
        size_t n = 0;
        ST_CHECK(api->get_int_list(vo, "deepstack_visual_indexes", v->ds_idx, QM_MAX_DS, &n, err));
        v->n_ds = (int64_t)n;
      }
    }
    if (api->type(ov, "mrope_section") != ST_CFG_ABSENT) {
      size_t n = 0;
      ST_CHECK(api->get_int_list(ov, "mrope_section", a->mrope, 3, &n, err));
      if (n != 3)
        return st_error_set(err, ST_ERR_CONFIG, "model.overrides.mrope_section",
                            "expected 3 integers (temporal, height, width), found %zu", n);
    }
  }
  const char *where = "model.overrides";
  if (a->vocab < 1 || a->hidden < 1 || a->layers < 1 || a->layers > 4096 || a->moe_inter < 1)
    return st_error_set(err, ST_ERR_CONFIG, where, "vocab_size, hidden_size, moe_intermediate_size and "
                        "num_hidden_layers (<= 4096) must be positive");
  if (a->heads < 1 || a->kv_heads < 1 || a->heads % a->kv_heads)
    return st_error_set(err, ST_ERR_CONFIG, where, "num_attention_heads (%lld) must be a positive multiple of "
                        "num_key_value_heads (%lld)", (long long)a->heads, (long long)a->kv_heads);
  if (a->head_dim < 2 || a->head_dim % 2)
    return st_error_set(err, ST_ERR_CONFIG, where, "head_dim must be even and >= 2, got %lld", (long long)a->head_dim);
  if (a->experts < 1 || a->experts > 65536 || a->top_k < 1 || a->top_k > a->experts)
    return st_error_set(err, ST_ERR_CONFIG, where, "need 1 <= num_experts_per_tok (%lld) <= num_experts (%lld) <= "
                        "65536", (long long)a->top_k, (long long)a->experts);
  if (a->mrope[0] < 0 || a->mrope[1] < 0 || a->mrope[2] < 0 || a->mrope[0] + a->mrope[1] + a->mrope[2] != a->head_dim / 2 ||
      a->mrope[1] > a->mrope[0] || a->mrope[2] > a->mrope[0])
    return st_error_set(err, ST_ERR_CONFIG, "model.overrides.mrope_section",
                        "the three sections must sum to head_dim/2 (%lld) with height and width no larger than "
                        "temporal (interleaved THW layout); got [%lld, %lld, %lld]", (long long)(a->head_dim / 2),
                        (long long)a->mrope[0], (long long)a->mrope[1], (long long)a->mrope[2]);
  if (!(a->rope_theta > 0) || !(a->rms_eps > 0) || !(a->aux_coef >= 0))
    return st_error_set(err, ST_ERR_CONFIG, where, "rope_theta and rms_norm_eps must be > 0, router_aux_loss_coef "
                        ">= 0");
  {
    const char *vw = "model.overrides.vision_config";
    int64_t side = 0;
    while ((side + 1) * (side + 1) <= v->npos) side++;
    if (v->depth < 1 || v->hidden < 1 || v->heads < 1 || v->hidden % v->heads || (v->hidden / v->heads) % 4 ||
        v->inter < 1 || v->patch < 1 || v->tpatch < 1 || v->merge < 1 || v->in_ch < 1)
      return st_error_set(err, ST_ERR_CONFIG, vw, "depth, sizes and merge must be positive; hidden_size must be "
                          "num_heads x a head_dim divisible by 4 (2-D rotary: a half for rows, a half for columns)");
    if (side < 2 || side * side != v->npos)
      return st_error_set(err, ST_ERR_CONFIG, vw, "num_position_embeddings (%lld) must be a square >= 4 (a learned "
                          "side x side grid)", (long long)v->npos);
    if (v->n_ds > a->layers)
      return st_error_set(err, ST_ERR_CONFIG, vw, "%lld deepstack_visual_indexes but only %lld decoder layers to "
                          "inject them into", (long long)v->n_ds, (long long)a->layers);
    for (int64_t j = 0; j < v->n_ds; j++)
      if (v->ds_idx[j] < 0 || v->ds_idx[j] >= v->depth || (j && v->ds_idx[j] <= v->ds_idx[j - 1]))
        return st_error_set(err, ST_ERR_CONFIG, vw, "deepstack_visual_indexes must be increasing block indices in "
                            "[0, depth = %lld)", (long long)v->depth);
    if (s->image_token < 0 || s->image_token >= a->vocab)
      return st_error_set(err, ST_ERR_CONFIG, "model.overrides.image_token_id", "%lld is outside the vocabulary "
                          "[0, %lld)", (long long)s->image_token, (long long)a->vocab);
  }
  const char *dtype;
  ST_CHECK(api->get_enum(cfg, "dtype", (const char *const[]){"fp32", "fp64", "bf16", NULL}, "fp32", &dtype, err));
  s->dt = !strcmp(dtype, "fp64") ? ST_F64 : !strcmp(dtype, "bf16") ? ST_BF16 : ST_F32;
  if (api->type(cfg, "weights") != ST_CFG_ABSENT && api->type(cfg, "weights") != ST_CFG_NULL) {
    const char *w;
    ST_CHECK(api->get_string(cfg, "weights", NULL, &w, err));
  }
  st_cfg *lo = NULL;
  ST_CHECK(api->get_object(cfg, "lora", false, &lo, err));
  if (lo) {
    s->lora = true;
    ST_CHECK(api->check_keys(lo, lora_keys, err));
    ST_CHECK(api->get_int(lo, "rank", 8, &s->rank, err));
    if (s->rank < 1) return st_error_set(err, ST_ERR_CONFIG, "model.lora.rank", "must be >= 1, got %lld", (long long)s->rank);
    ST_CHECK(api->get_number(lo, "alpha", (double)s->rank, &s->alpha, err));
    if (api->type(lo, "target_modules") != ST_CFG_ABSENT) {
      ST_CHECK(api->get_string_list(lo, "target_modules", s->targets, 8, &s->n_targets, err));
      if (s->n_targets == 0)
        return st_error_set(err, ST_ERR_CONFIG, "model.lora.target_modules", "is empty: name some of q_proj, k_proj, "
                            "v_proj, o_proj, or leave the key out for all four");
      for (size_t i = 0; i < s->n_targets; i++) {
        bool ok = false;
        for (int q = 0; q < 4; q++) ok |= !strcmp(s->targets[i], lora_modules[q]);
        if (!ok)
          return st_error_set(err, ST_ERR_CONFIG, "model.lora.target_modules", "'%s' is not a LoRA target of this "
                              "model (the language model's attention projections: q_proj, k_proj, v_proj, o_proj)",
                              s->targets[i]);
      }
    } else {
      s->n_targets = 4;
      for (int q = 0; q < 4; q++) s->targets[q] = lora_modules[q];
    }
    const char *init;
    ST_CHECK(api->get_enum(lo, "init", (const char *const[]){"kaiming", "gaussian", NULL}, "kaiming", &init, err));
    s->lora_gaussian = !strcmp(init, "gaussian");
  }
  st_cfg *op = NULL;
  ST_CHECK(api->get_object(cfg, "options", false, &op, err));
  s->synth_len = 32;
  s->synth_prompt = 4;
  s->vision = true;
  s->synth_image = true;
  if (op) {
    ST_CHECK(api->check_keys(op, option_keys, err));
    ST_CHECK(api->get_bool(op, "vision", true, &s->vision, err));
    ST_CHECK(api->get_bool(op, "synth_image", s->vision, &s->synth_image, err));
    if (s->synth_image && !s->vision)
      return st_error_set(err, ST_ERR_CONFIG, "model.options.synth_image", "needs the vision tower (options.vision)");
    ST_CHECK(api->get_int(op, "synth_seq_len", s->synth_len, &s->synth_len, err));
    ST_CHECK(api->get_int(op, "synth_prompt_len", s->synth_prompt, &s->synth_prompt, err));
  }
  if (s->synth_len < 12 || s->synth_prompt < 0 || s->synth_prompt >= s->synth_len - 8)
    return st_error_set(err, ST_ERR_CONFIG, "model.options", "need synth_seq_len >= 12 and 0 <= synth_prompt_len < "
                        "synth_seq_len - 8");
  return ST_OK;
}

/* ---- descriptors ---------------------------------------------------------------------------- */

typedef enum { K_WEIGHT, K_GAIN, K_EMBED, K_BIAS, K_LORA_A, K_LORA_B } qm_kind;

/* layer parameter order */
enum { P_IN_NORM, P_Q, P_K, P_V, P_O, P_QN, P_KN, P_POST_NORM, P_GATE, P_GU, P_DOWN, P_LAYER_N };
/* final: norm, lm_head */
enum { F_NORM, F_LM, F_N };
/* vision: patch_embed unit; blocks (then a deepstack merger's 6 when the block feeds one); merger */
enum { PE_W, PE_B, PE_POS };
enum { VB_N1W, VB_N1B, VB_QKVW, VB_QKVB, VB_PROJW, VB_PROJB, VB_N2W, VB_N2B, VB_FC1W, VB_FC1B, VB_FC2W, VB_FC2B,
       VB_DS };
enum { MG_NW, MG_NB, MG_F1W, MG_F1B, MG_F2W, MG_F2B, MG_N };

typedef struct qm_model {
  const st_host *host;
  qm_settings s;
  int64_t Q, KV; /* heads*head_dim, kv_heads*head_dim */
  int64_t vhd, pdim, side; /* vision head_dim, patch vector length C*T*P*P, learned grid side */
  int u_pe, u_merger, u_embed, u_layer0, u_final; /* unit indices (vision ones -1 without the tower) */
  int ds_of_block[4096];                          /* deepstack merger fed by vision block i, or -1 */
  int lora_a[4], lora_b[4]; /* LoRA A / B of q, k, v, o within a layer unit (same in every layer), or -1 */
  double lora_scale;
  int n_units, n_params;
  st_unit_desc *units;
  st_param_desc *params;
  qm_kind *kinds;
  char **names;
  int *first;
  st_model_desc desc;
} qm_model;

static st_result add_param(qm_model *m, const char *name, qm_kind kind, int ndim, const int64_t *shape, uint32_t flags,
                           st_error *err) {
  int i = m->n_params++;
  m->names[i] = strdup(name);
  if (!m->names[i]) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen3_vl_moe", "parameter names");
  m->params[i] = (st_param_desc){.name = m->names[i], .ndim = ndim, .flags = flags};
  for (int d = 0; d < ndim; d++) m->params[i].shape[d] = shape[d];
  m->kinds[i] = kind;
  return ST_OK;
}

static void qm_finalize(void *ctx) {
  qm_model *m = ctx;
  if (!m) return;
  for (int i = 0; i < m->n_params; i++) free(m->names[i]);
  if (m->units)
    for (int u = 0; u < m->n_units; u++) free((char *)m->units[u].name);
  free(m->names);
  free(m->params);
  free(m->kinds);
  free(m->units);
  free(m->first);
  free(m);
}

static st_result build_descriptors(qm_model *m, st_error *err) {
  const qm_arch *a = &m->s.a;
  const qm_vision *v = &m->s.v;
  int L = (int)a->layers, D = m->s.vision ? (int)v->depth : 0;
  int64_t H = a->hidden, I = a->moe_inter, E = a->experts, d = a->head_dim, Hv = v->hidden, M4 = Hv * v->merge * v->merge;
  m->u_pe = m->s.vision ? 0 : -1;
  m->u_merger = m->s.vision ? D + 1 : -1;
  m->u_embed = m->s.vision ? D + 2 : 0;
  m->u_layer0 = m->u_embed + 1;
  m->u_final = m->u_layer0 + L;
  m->n_units = m->u_final + 1;
  for (int i = 0; i < 4096; i++) m->ds_of_block[i] = -1;
  for (int64_t j = 0; m->s.vision && j < v->n_ds; j++) m->ds_of_block[v->ds_idx[j]] = (int)j;
  int max_params = 1 + L * (P_LAYER_N + 8) + F_N + (m->s.vision ? 3 + D * VB_DS + (int)v->n_ds * MG_N + MG_N : 0);
  m->units = calloc((size_t)m->n_units, sizeof *m->units);
  m->first = calloc((size_t)m->n_units + 1, sizeof *m->first);
  m->params = calloc((size_t)max_params, sizeof *m->params);
  m->kinds = calloc((size_t)max_params, sizeof *m->kinds);
  m->names = calloc((size_t)max_params, sizeof *m->names);
  if (!m->units || !m->first || !m->params || !m->kinds || !m->names)
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen3_vl_moe", "descriptor tables");
  /* LoRA freezes every base tensor */
  const uint32_t TR = m->s.lora ? 0 : ST_PARAM_TRAINABLE, ND = m->s.lora ? 0 : ST_PARAM_TRAINABLE | ST_PARAM_NO_DECAY;
  const uint32_t EX = (m->s.lora ? 0 : ST_PARAM_TRAINABLE) | ST_PARAM_EXPERT;
  const uint32_t LR = ST_PARAM_TRAINABLE | ST_PARAM_LORA;
  char n[256];
#define NP(kind, nd, shape, flags, ...)                                                                              \
  do {                                                                                                              \
    snprintf(n, sizeof n, __VA_ARGS__);                                                                             \
    ST_CHECK(add_param(m, n, kind, nd, shape, flags, err));                                                         \
  } while (0)
  if (m->s.vision) {
    m->first[m->u_pe] = m->n_params;
    NP(K_WEIGHT, 5, ((int64_t[]){Hv, v->in_ch, v->tpatch, v->patch, v->patch}), TR, "model.visual.patch_embed.proj.weight");
    NP(K_BIAS, 1, ((int64_t[]){Hv}), ND, "model.visual.patch_embed.proj.bias");
    NP(K_EMBED, 2, ((int64_t[]){v->npos, Hv}), TR, "model.visual.pos_embed.weight");
    for (int i = 0; i < D; i++) {
      m->first[1 + i] = m->n_params;
      const char *pre = "model.visual.blocks";
      NP(K_GAIN, 1, ((int64_t[]){Hv}), ND, "%s.%d.norm1.weight", pre, i);
      NP(K_BIAS, 1, ((int64_t[]){Hv}), ND, "%s.%d.norm1.bias", pre, i);
      NP(K_WEIGHT, 2, ((int64_t[]){3 * Hv, Hv}), TR, "%s.%d.attn.qkv.weight", pre, i);
      NP(K_BIAS, 1, ((int64_t[]){3 * Hv}), ND, "%s.%d.attn.qkv.bias", pre, i);
      NP(K_WEIGHT, 2, ((int64_t[]){Hv, Hv}), TR, "%s.%d.attn.proj.weight", pre, i);
      NP(K_BIAS, 1, ((int64_t[]){Hv}), ND, "%s.%d.attn.proj.bias", pre, i);
      NP(K_GAIN, 1, ((int64_t[]){Hv}), ND, "%s.%d.norm2.weight", pre, i);
      NP(K_BIAS, 1, ((int64_t[]){Hv}), ND, "%s.%d.norm2.bias", pre, i);
      NP(K_WEIGHT, 2, ((int64_t[]){v->inter, Hv}), TR, "%s.%d.mlp.linear_fc1.weight", pre, i);
      NP(K_BIAS, 1, ((int64_t[]){v->inter}), ND, "%s.%d.mlp.linear_fc1.bias", pre, i);
      NP(K_WEIGHT, 2, ((int64_t[]){Hv, v->inter}), TR, "%s.%d.mlp.linear_fc2.weight", pre, i);
      NP(K_BIAS, 1, ((int64_t[]){Hv}), ND, "%s.%d.mlp.linear_fc2.bias", pre, i);
      int j = m->ds_of_block[i];
      if (j >= 0) {
        const char *dp = "model.visual.deepstack_merger_list";
        NP(K_GAIN, 1, ((int64_t[]){M4}), ND, "%s.%d.norm.weight", dp, j);
        NP(K_BIAS, 1, ((int64_t[]){M4}), ND, "%s.%d.norm.bias", dp, j);
        NP(K_WEIGHT, 2, ((int64_t[]){M4, M4}), TR, "%s.%d.linear_fc1.weight", dp, j);
        NP(K_BIAS, 1, ((int64_t[]){M4}), ND, "%s.%d.linear_fc1.bias", dp, j);
        NP(K_WEIGHT, 2, ((int64_t[]){H, M4}), TR, "%s.%d.linear_fc2.weight", dp, j);
        NP(K_BIAS, 1, ((int64_t[]){H}), ND, "%s.%d.linear_fc2.bias", dp, j);
      }
    }
    m->first[m->u_merger] = m->n_params;
    NP(K_GAIN, 1, ((int64_t[]){Hv}), ND, "model.visual.merger.norm.weight");
    NP(K_BIAS, 1, ((int64_t[]){Hv}), ND, "model.visual.merger.norm.bias");
    NP(K_WEIGHT, 2, ((int64_t[]){M4, M4}), TR, "model.visual.merger.linear_fc1.weight");
    NP(K_BIAS, 1, ((int64_t[]){M4}), ND, "model.visual.merger.linear_fc1.bias");
    NP(K_WEIGHT, 2, ((int64_t[]){H, M4}), TR, "model.visual.merger.linear_fc2.weight");
    NP(K_BIAS, 1, ((int64_t[]){H}), ND, "model.visual.merger.linear_fc2.bias");
  }
  m->first[m->u_embed] = m->n_params;
  ST_CHECK(add_param(m, "model.language_model.embed_tokens.weight", K_EMBED, 2, (int64_t[]){a->vocab, H}, TR, err));
  for (int i = 0; i < L; i++) {
    m->first[m->u_layer0 + i] = m->n_params;
    const char *pre = "model.language_model.layers";
    NP(K_GAIN, 1, ((int64_t[]){H}), ND, "%s.%d.input_layernorm.weight", pre, i);
    NP(K_WEIGHT, 2, ((int64_t[]){m->Q, H}), TR, "%s.%d.self_attn.q_proj.weight", pre, i);
    NP(K_WEIGHT, 2, ((int64_t[]){m->KV, H}), TR, "%s.%d.self_attn.k_proj.weight", pre, i);
    NP(K_WEIGHT, 2, ((int64_t[]){m->KV, H}), TR, "%s.%d.self_attn.v_proj.weight", pre, i);
    NP(K_WEIGHT, 2, ((int64_t[]){H, m->Q}), TR, "%s.%d.self_attn.o_proj.weight", pre, i);
    NP(K_GAIN, 1, ((int64_t[]){d}), ND, "%s.%d.self_attn.q_norm.weight", pre, i);
    NP(K_GAIN, 1, ((int64_t[]){d}), ND, "%s.%d.self_attn.k_norm.weight", pre, i);
    NP(K_GAIN, 1, ((int64_t[]){H}), ND, "%s.%d.post_attention_layernorm.weight", pre, i);
    NP(K_WEIGHT, 2, ((int64_t[]){E, H}), TR, "%s.%d.mlp.gate.weight", pre, i);
    /* checkpoint layout (reference §2): [E, H, 2I] gate-first columns, [E, I, H]; x @ W[e] */
    NP(K_WEIGHT, 3, ((int64_t[]){E, H, 2 * I}), EX, "%s.%d.mlp.experts.gate_up_proj", pre, i);
    NP(K_WEIGHT, 3, ((int64_t[]){E, I, H}), EX, "%s.%d.mlp.experts.down_proj", pre, i);
    for (int q = 0; q < 4; q++) {
      m->lora_a[q] = m->lora_b[q] = -1;
      bool hit = false;
      for (size_t t = 0; m->s.lora && t < m->s.n_targets; t++) hit |= !strcmp(m->s.targets[t], lora_modules[q]);
      if (!hit) continue;
      int64_t out = q == 0 ? m->Q : q == 3 ? H : m->KV, in = q == 3 ? m->Q : H, r = m->s.rank;
      m->lora_a[q] = m->n_params - m->first[m->u_layer0 + i];
      NP(K_LORA_A, 2, ((int64_t[]){r, in}), LR, "%s.%d.self_attn.%s.lora_A.weight", pre, i, lora_modules[q]);
      m->lora_b[q] = m->n_params - m->first[m->u_layer0 + i];
      NP(K_LORA_B, 2, ((int64_t[]){out, r}), LR, "%s.%d.self_attn.%s.lora_B.weight", pre, i, lora_modules[q]);
    }
  }
#undef NP
  m->first[m->u_final] = m->n_params;
  ST_CHECK(add_param(m, "model.language_model.norm.weight", K_GAIN, 1, (int64_t[]){H}, ND, err));
  ST_CHECK(add_param(m, "lm_head.weight", K_WEIGHT, 2, (int64_t[]){a->vocab, H}, TR, err));
  m->first[m->n_units] = m->n_params;
  int64_t total = 0;
  for (int u = 0; u < m->n_units; u++) {
    m->units[u].params = &m->params[m->first[u]];
    m->units[u].n_params = m->first[u + 1] - m->first[u];
    char nm[48];
    if (u == m->u_pe) snprintf(nm, sizeof nm, "vision.patch_embed");
    else if (u == m->u_merger) snprintf(nm, sizeof nm, "vision.merger");
    else if (u == m->u_embed) snprintf(nm, sizeof nm, "embed");
    else if (u == m->u_final) snprintf(nm, sizeof nm, "final");
    else if (u < m->u_embed) snprintf(nm, sizeof nm, "vision.block.%d", u - 1);
    else snprintf(nm, sizeof nm, "layer.%d", u - m->u_layer0);
    m->units[u].name = strdup(nm);
    if (!m->units[u].name) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen3_vl_moe", "unit names");
  }
  for (int i = 0; i < m->n_params; i++) {
    int64_t c = 1;
    for (int k = 0; k < m->params[i].ndim; k++) c *= m->params[i].shape[k];
    total += c;
  }
  m->desc = (st_model_desc){.n_units = m->n_units, .units = m->units, .compute_dtype = m->s.dt, .hidden_size = H,
                            .n_params_total = total};
  return ST_OK;
}

static st_result qm_validate(st_cfg *cfg, const st_cfg_api *api, st_error *err) {
  qm_settings s;
  return parse_settings(cfg, api, &s, err);
}

static st_result qm_init(const st_host *host, st_cfg *cfg, void **ctx, st_error *err) {
  qm_model *m = calloc(1, sizeof *m);
  if (!m) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen3_vl_moe", "model context");
  m->host = host;
  st_result r = parse_settings(cfg, host->cfg, &m->s, err);
  if (r == ST_OK && m->s.dt == ST_BF16 && host->device.type == ST_DEVICE_CPU)
    r = st_error_set(err, ST_ERR_UNSUPPORTED, "model.dtype", "bf16 needs the CUDA ops table; the CPU path runs "
                     "\"fp32\" (or \"fp64\" for finite-difference checks)");
  if (r == ST_OK) {
    m->Q = m->s.a.heads * m->s.a.head_dim;
    m->KV = m->s.a.kv_heads * m->s.a.head_dim;
    m->lora_scale = m->s.lora ? m->s.alpha / (double)m->s.rank : 0.0;
    const qm_vision *v = &m->s.v;
    m->vhd = v->hidden / v->heads;
    m->pdim = v->in_ch * v->tpatch * v->patch * v->patch;
    while ((m->side + 1) * (m->side + 1) <= v->npos) m->side++;
    if (v->depth > 4096) r = st_error_set(err, ST_ERR_CONFIG, "model.overrides.vision_config", "depth > 4096");
    if (r == ST_OK) r = build_descriptors(m, err);
  }
  if (r != ST_OK) {
    qm_finalize(m);
    return r;
  }
  *ctx = m;
  return ST_OK;
}

static const st_model_desc *qm_describe(void *ctx) { return &((qm_model *)ctx)->desc; }

/* transformers' _init_weights: every linear, the router, the experts and the embeddings
 * N(0, initializer_range = 0.02); norm gains 1; biases 0 */
static st_result qm_init_param(void *ctx, uint64_t seed, int unit, int param, int64_t offset, int64_t count,
                               st_dtype dt, void *dst, st_error *err) {
  qm_model *m = ctx;
  if (unit < 0 || unit >= m->n_units || param < 0 || param >= m->units[unit].n_params)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "model.qwen3_vl_moe", "init_param(%d, %d) out of range", unit,
                        param);
  if (!st_dtype_is_float(dt))
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "model.qwen3_vl_moe", "init_param needs a float dtype");
  uint64_t stream = 0x71336d6f65ull * 1000003ull + (uint64_t)unit * 4096u + (uint64_t)param;
  qm_kind kind = m->kinds[m->first[unit] + param];
  const st_param_desc *p = &m->units[unit].params[param];
  if (kind == K_GAIN) store_const(dt, dst, count, 1.0);
  else if (kind == K_BIAS || kind == K_LORA_B) store_const(dt, dst, count, 0.0);
  else if (kind == K_LORA_A && m->s.lora_gaussian)
    m->host->rng->normal(seed, stream, (uint64_t)offset, count, 0.0, 1.0 / (double)m->s.rank, dt, dst);
  else if (kind == K_LORA_A) /* PEFT's kaiming_uniform(a = sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)) */
    m->host->rng->uniform(seed, stream, (uint64_t)offset, count, -1.0 / sqrt((double)p->shape[1]),
                          1.0 / sqrt((double)p->shape[1]), dt, dst);
  else m->host->rng->normal(seed, stream, (uint64_t)offset, count, 0.0, 0.02, dt, dst);
  return ST_OK;
}

/* ---- batches -------------------------------------------------------------------------------- */

/* one layer's routing, on the host: the sort by expert of the T*k (token, slot) pairs, and of the
 * rows this rank's experts received */
typedef struct qm_route {
  int32_t *idx;     /* [T*k] expert of (t, slot), descending probability */
  int32_t *perm;    /* [T*k] sorted row r -> t*k + slot (expert-major, token order inside an expert) */
  int32_t *tok;     /* [T*k] sorted row r -> t */
  int32_t *eid;     /* [T*k] expert of sorted row r */
  int32_t *sel;     /* [T*k] t*E + idx: the selected router logit of (t, slot) */
  int32_t *reid;    /* [recv_cap] expert of each received row (blocks by source rank, sorted by expert) */
  int64_t n_recv;
  double *count;    /* [E] top-k selections over non-padding tokens (aux loss, load metrics) */
  double *psum;     /* [E] sum over non-padding tokens of the router softmax */
} qm_route;

typedef struct qm_batch {
  int64_t B, S, T, Tk, recv_cap;
  int n_local, first_local;
  int32_t *ids;       /* device [T] */
  int64_t *labels;    /* device [T] shifted: row (b, s) holds labels[b, s+1], -100 at the end and on padding */
  uint8_t *kmask;     /* device [B, S] attention mask (key mask) */
  void *tokmask;      /* device [T] dt: 1 for tokens the aux loss counts, 0 for padding */
  uint8_t *tokmask_h; /* host copy */
  int64_t n_valid;
  void *cosv, *sinv;  /* device [B, S, d/2] MRoPE angles */
  void *iota;         /* device int32 [max(Tk, recv_cap, Np)] 0, 1, 2, ... */
  qm_route *route;    /* [L] */
  bool training;      /* router statistics are summed over the world (the global micro-batch) */
  /* set by loss() for backward: the per-item gradient scale, and the aux loss's pooled expert
   * counts [E], rows and loss items over the global micro-batch (this rank's alone in validation) */
  double grad_scale, aux_rows, aux_items;
  double *aux_count;
  /* vision: Np patches of all images of the batch (in sample order), Nm = Np / merge^2 tokens */
  int64_t Np, Nm;
  void *pix;          /* device [Np, pdim] */
  int32_t *ptap;      /* device [4 * Np] pos_embed rows of the 4 bilinear taps, tap-major */
  void *pwt;          /* device [4 * Np] their weights */
  void *vcos, *vsin;  /* device [Np, vhd/2] 2-D rotary angles (row half, column half) */
  int32_t *vseg;      /* device [Np] frame index: attention stays inside a frame */
  int32_t *vis_rows;  /* device [Nm] rows b*S+s of the image tokens, in order */
  void *textmask;     /* device [T] dt: 0 at image-token rows (their embedding gets no gradient) */
  void *negones;      /* device [Nm] dt: -1 */
  int32_t *vseg_h;    /* host copy of vseg (FLOP count) */
} qm_batch;

static int64_t seq_len_of(const st_tensor *t) {
  if (t->ndim == 1) return t->shape[0];
  if (t->ndim == 2 && t->shape[0] == 1) return t->shape[1];
  return -1;
}

static void free_route(qm_route *r) {
  free(r->idx), free(r->perm), free(r->tok), free(r->eid), free(r->sel), free(r->reid);
  free(r->count), free(r->psum);
}

static void qm_batch_release(void *ctx, void *vb) {
  qm_model *m = ctx;
  qm_batch *b = vb;
  if (!b) return;
  const st_host *h = m->host;
  void *bufs[] = {b->ids,  b->labels, b->kmask, b->tokmask, b->cosv,     b->sinv,     b->iota,    b->pix,
                  b->ptap, b->pwt,    b->vcos,  b->vsin,    b->vseg,     b->vis_rows, b->textmask, b->negones};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    if (bufs[i]) h->free(h, h->device, bufs[i]);
  if (b->route)
    for (int64_t l = 0; l < m->s.a.layers; l++) free_route(&b->route[l]);
  free(b->route);
  free(b->tokmask_h);
  free(b->aux_count);
  free(b->vseg_h);
  free(b);
}

/* validates one sample; *len its tokens, *np its patches, *n_img its images */
static st_result check_sample(qm_model *m, const st_sample *s, int64_t *len, int64_t *np, st_error *err) {
  const st_tensor *ids = find_tensor(s, "input_ids");
  if (!ids)
    return st_error_set(err, ST_ERR_FORMAT, s->id, "sample has no 'input_ids' tensor (a Qwen3-VL-MoE sample holds "
                        "input_ids [S] and optionally labels [S], attention_mask [S], position_ids [3, S], "
                        "pixel_values [patches, C*T*P*P] with image_grid_thw [images, 3])");
  int64_t n = seq_len_of(ids);
  if ((ids->dtype != ST_I64 && ids->dtype != ST_I32) || n < 1)
    return st_error_set(err, ST_ERR_FORMAT, s->id, "'input_ids' must be an I64 or I32 tensor [S] with S >= 1");
  for (int64_t i = 0; i < n; i++) {
    double v = load_elem(ids, i);
    if (v < 0 || v >= (double)m->s.a.vocab)
      return st_error_set(err, ST_ERR_FORMAT, s->id, "input_ids[%lld] = %.0f is outside the vocabulary [0, %lld)",
                          (long long)i, v, (long long)m->s.a.vocab);
  }
  const st_tensor *lab = find_tensor(s, "labels"), *mk = find_tensor(s, "attention_mask");
  const st_tensor *pos = find_tensor(s, "position_ids");
  if (lab && ((lab->dtype != ST_I64 && lab->dtype != ST_I32) || seq_len_of(lab) != n))
    return st_error_set(err, ST_ERR_FORMAT, s->id, "'labels' must be an I64 or I32 tensor shaped like input_ids [%lld]",
                        (long long)n);
  if (lab)
    for (int64_t i = 0; i < n; i++) {
      double v = load_elem(lab, i);
      if (v != -100 && (v < 0 || v >= (double)m->s.a.vocab))
        return st_error_set(err, ST_ERR_FORMAT, s->id, "labels[%lld] = %.0f is neither -100 nor a token id",
                            (long long)i, v);
    }
  if (mk && st_tensor_numel(mk) != n)
    return st_error_set(err, ST_ERR_FORMAT, s->id, "'attention_mask' has %lld elements, input_ids %lld",
                        (long long)st_tensor_numel(mk), (long long)n);
  if (pos && (st_dtype_is_float(pos->dtype) || st_tensor_numel(pos) != 3 * n))
    return st_error_set(err, ST_ERR_FORMAT, s->id, "'position_ids' must be an integer tensor [3, %lld] (t, h, w)",
                        (long long)n);
  *np = 0;
  for (int kind = 0; kind < 2; kind++) {
    const char *pxn = kind ? "pixel_values_videos" : "pixel_values", *grn = kind ? "video_grid_thw" : "image_grid_thw";
    int64_t tok = kind ? m->s.video_token : m->s.image_token, n_tok = 0;
    for (int64_t i = 0; i < n; i++) n_tok += load_elem(ids, i) == (double)tok;
    const st_tensor *px = find_tensor(s, pxn), *gr = find_tensor(s, grn);
    if (!px && !gr) {
      if (n_tok)
        return st_error_set(err, ST_ERR_FORMAT, s->id, "input_ids hold %lld %s tokens (id %lld) but the sample has "
                            "no %s / %s", (long long)n_tok, kind ? "video" : "image", (long long)tok, pxn, grn);
      continue;
    }
    if (!m->s.vision)
      return st_error_set(err, ST_ERR_UNSUPPORTED, s->id, "the sample has %s, and model.options.vision is false: "
                          "enable the vision tower or drop the images", pxn);
    if (!px || !gr) return st_error_set(err, ST_ERR_FORMAT, s->id, "%s and %s come together", pxn, grn);
    const qm_vision *v = &m->s.v;
    if (!st_dtype_is_float(px->dtype) || px->ndim != 2 || px->shape[1] != m->pdim)
      return st_error_set(err, ST_ERR_FORMAT, s->id, "'%s' must be a float tensor [patches, %lld] (C*T*P*P in the "
                          "processor's order)", pxn, (long long)m->pdim);
    if (st_dtype_is_float(gr->dtype) || gr->ndim != 2 || gr->shape[1] != 3)
      return st_error_set(err, ST_ERR_FORMAT, s->id, "'%s' must be an integer tensor [items, 3]", grn);
    int64_t sum = 0, mm = v->merge * v->merge;
    for (int64_t i = 0; i < gr->shape[0]; i++) {
      int64_t t = (int64_t)load_elem(gr, 3 * i), h = (int64_t)load_elem(gr, 3 * i + 1);
      int64_t w = (int64_t)load_elem(gr, 3 * i + 2);
      if (t < 1 || h < v->merge || w < v->merge || h % v->merge || w % v->merge)
        return st_error_set(err, ST_ERR_FORMAT, s->id, "%s[%lld] = (%lld, %lld, %lld): t >= 1 and h, w positive "
                            "multiples of spatial_merge_size %lld", grn, (long long)i, (long long)t, (long long)h,
                            (long long)w, (long long)v->merge);
      sum += t * h * w;
    }
    if (sum != px->shape[0])
      return st_error_set(err, ST_ERR_FORMAT, s->id, "%s describes %lld patches, %s holds %lld", grn, (long long)sum,
                          pxn, (long long)px->shape[0]);
    if (sum / mm != n_tok)
      return st_error_set(err, ST_ERR_FORMAT, s->id, "the %s give %lld merged tokens but input_ids hold %lld %s "
                          "tokens (id %lld)", kind ? "videos" : "images", (long long)(sum / mm), (long long)n_tok,
                          kind ? "video" : "image", (long long)tok);
    *np += sum;
  }
  *len = n;
  return ST_OK;
}

static st_result alloc_route(qm_route *r, int64_t Tk, int64_t cap, int64_t E) {
  r->idx = malloc(sizeof(int32_t) * (size_t)Tk);
  r->perm = malloc(sizeof(int32_t) * (size_t)Tk);
  r->tok = malloc(sizeof(int32_t) * (size_t)Tk);
  r->eid = malloc(sizeof(int32_t) * (size_t)Tk);
  r->sel = malloc(sizeof(int32_t) * (size_t)Tk);
  r->reid = malloc(sizeof(int32_t) * (size_t)(cap ? cap : 1));
  r->count = calloc((size_t)E, sizeof(double));
  r->psum = calloc((size_t)E, sizeof(double));
  return r->idx && r->perm && r->tok && r->eid && r->sel && r->reid && r->count && r->psum
             ? ST_OK : ST_ERR_OUT_OF_MEMORY;
}

/* A visual item of a sample, in the order its first token appears: kind 0 image, 1 video. */
typedef struct qm_item {
  int kind;
  int64_t index;
} qm_item;

/* Walks one sample's tokens: the 3-D MRoPE positions (get_rope_index; pos [3][n] may be NULL) and
 * the order of its visual items (items may be NULL; returns their count). A text token continues
 * the cursor p on all three axes. An image's merged t x h' x w' grid gets (p + t, p + h, p + w) in
 * raster order, then p advances by max(h', w'). A video is split into t frames of one (t = 1) grid
 * each, as transformers does (timestamps are text between them): each frame gets (p, p + h, p + w)
 * and advances p by max(h', w'). */
static int64_t walk_sample(const qm_model *m, const st_sample *s, int64_t n, int64_t *pos, qm_item *items) {
  const st_tensor *it = find_tensor(s, "input_ids"), *pt = find_tensor(s, "position_ids");
  const st_tensor *gi = find_tensor(s, "image_grid_thw"), *gv = find_tensor(s, "video_grid_thw");
  int64_t p = 0, t = 0, mg = m->s.v.merge, n_items = 0, next[2] = {0, 0}, cur_video = -1, frame = 0;
  while (t < n) {
    double id = load_elem(it, t);
    int kind = gi && id == (double)m->s.image_token ? 0 : gv && id == (double)m->s.video_token ? 1 : -1;
    if (kind < 0) {
      if (pos) pos[t] = pos[n + t] = pos[2 * n + t] = p;
      p++, t++;
      continue;
    }
    const st_tensor *gr = kind ? gv : gi;
    int64_t g;
    if (kind == 1 && cur_video >= 0) {
      g = cur_video;
    } else {
      g = next[kind]++;
      if (g >= gr->shape[0]) break; /* check_sample counted the tokens: cannot happen */
      if (items) items[n_items] = (qm_item){kind, g};
      n_items++;
      if (kind == 1) cur_video = g, frame = 0;
    }
    int64_t gt = (int64_t)load_elem(gr, 3 * g), gh = (int64_t)load_elem(gr, 3 * g + 1) / mg;
    int64_t gw = (int64_t)load_elem(gr, 3 * g + 2) / mg, spans = kind ? 1 : gt;
    for (int64_t a = 0; a < spans; a++)
      for (int64_t h = 0; h < gh; h++)
        for (int64_t w = 0; w < gw && t < n; w++, t++)
          if (pos) pos[t] = p + a, pos[n + t] = p + h, pos[2 * n + t] = p + w;
    p += gh > gw ? gh : gw;
    if (kind == 1 && ++frame == gt) cur_video = -1;
  }
  if (pt && pos)
    for (int64_t q = 0; q < 3 * n; q++) pos[q] = (int64_t)load_elem(pt, q);
  return n_items;
}

/* the exchange's additions when the core and the exchange offer them (st_host grew after v1) */
static const st_moe_ext *moe_ext_of(const st_host *h) {
  if (h->struct_size < offsetof(st_host, set_moe_ext) + sizeof h->set_moe_ext || !h->moe_ext) return NULL;
  return h->moe_ext(h);
}

static st_result qm_batch_prepare(void *ctx, const st_batch *batch, void **out, st_error *err) {
  qm_model *m = ctx;
  const st_host *host = m->host;
  const qm_arch *a = &m->s.a;
  const qm_vision *v = &m->s.v;
  st_dtype dt = m->s.dt;
  size_t es = st_dtype_size(dt);
  if (batch->n_samples < 1) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "model.qwen3_vl_moe", "empty batch");
  int64_t B = batch->n_samples, S = 0, Np = 0;
  for (int64_t i = 0; i < B; i++) {
    int64_t n = 0, np = 0;
    ST_CHECK(check_sample(m, &batch->samples[i], &n, &np, err));
    if (n > S) S = n;
    Np += np;
  }
  int64_t T = B * S, k = a->top_k, E = a->experts, half = a->head_dim / 2, mm = v->merge * v->merge;
  int64_t vq = m->vhd / 4, vhalf = m->vhd / 2;
  if (T * k > INT32_MAX / 2 || T * E > INT32_MAX / 2 || Np * 4 > INT32_MAX / 2)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "model.qwen3_vl_moe", "batch too large for int32 row indices");
  qm_batch *b = calloc(1, sizeof *b);
  if (!b) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen3_vl_moe", "batch");
  const st_moe_api *moe = host->moe(host);
  b->B = B, b->S = S, b->T = T, b->Tk = T * k, b->Np = Np, b->Nm = Np / mm;
  b->n_local = moe->num_local_experts(moe->self, (int)E);
  b->first_local = moe->first_local_expert(moe->self, (int)E);
  if (b->n_local < 1 || b->n_local > E || b->first_local < 0 || b->first_local + b->n_local > E) {
    int nl = b->n_local, fl = b->first_local;
    free(b);
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "model.qwen3_vl_moe", "the MoE exchange reports %d local experts "
                        "from %d of %lld", nl, fl, (long long)E);
  }
  /* the exchange says how many rows may arrive (collective: every rank prepares its batch in step);
   * one without that call gets the worst case, every rank of the group routing all its rows here */
  b->recv_cap = b->Tk * ((E + b->n_local - 1) / b->n_local);
  const st_moe_ext *mx = moe_ext_of(host);
  if (mx && mx->struct_size >= offsetof(st_moe_ext, recv_capacity) + sizeof mx->recv_capacity && mx->recv_capacity) {
    st_result rc = mx->recv_capacity(moe->self, b->Tk, (int)E, &b->recv_cap, err);
    if (rc != ST_OK) {
      free(b);
      return st_error_prefix(err, "model.qwen3_vl_moe: sizing the MoE receive buffers: ");
    }
  }
  int64_t niota = b->recv_cap > b->Tk ? b->recv_cap : b->Tk;
  if (Np > niota) niota = Np;
  int32_t *ids = calloc((size_t)T, sizeof *ids), *iota = malloc(sizeof(int32_t) * (size_t)niota);
  int64_t *labels = malloc(sizeof(int64_t) * (size_t)T), *pos = malloc(sizeof(int64_t) * (size_t)(3 * S));
  uint8_t *kmask = calloc((size_t)T, 1);
  void *tokm = calloc((size_t)T, es), *textm = calloc((size_t)T, es);
  void *cosv = malloc((size_t)(T * half) * es), *sinv = malloc((size_t)(T * half) * es);
  size_t npb = (size_t)(Np ? Np : 1);
  void *pix = malloc(npb * (size_t)m->pdim * es), *pwt = malloc(4 * npb * es), *negones = malloc(npb * es);
  void *vcos = malloc(npb * (size_t)vhalf * es), *vsin = malloc(npb * (size_t)vhalf * es);
  int32_t *ptap = malloc(4 * npb * sizeof(int32_t)), *vseg = malloc(npb * sizeof(int32_t));
  int32_t *vis = malloc(npb * sizeof(int32_t));
  b->tokmask_h = calloc((size_t)T, 1);
  b->route = calloc((size_t)a->layers, sizeof *b->route);
  b->aux_count = calloc((size_t)E, sizeof *b->aux_count);
  b->training = batch->training;
  double *inv_freq = malloc(sizeof(double) * (size_t)half), *vinv = malloc(sizeof(double) * (size_t)(vq ? vq : 1));
  int *axis = malloc(sizeof(int) * (size_t)half);
  st_result r = ST_OK;
  if (!ids || !iota || !labels || !pos || !kmask || !tokm || !textm || !cosv || !sinv || !pix || !pwt || !negones ||
      !vcos || !vsin || !ptap || !vseg || !vis || !b->tokmask_h || !b->route || !b->aux_count || !inv_freq || !vinv || !axis)
    r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen3_vl_moe", "batch staging");
  for (int64_t l = 0; l < a->layers && r == ST_OK; l++)
    if (alloc_route(&b->route[l], b->Tk, b->recv_cap, E) != ST_OK)
      r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen3_vl_moe", "routing tables");
  if (r == ST_OK) {
    for (int64_t i = 0; i < niota; i++) iota[i] = (int32_t)i;
    /* inv_freq in double (transformers computes it in fp32); the interleaved THWTHW...TT split */
    for (int64_t j = 0; j < half; j++) {
      inv_freq[j] = pow(a->rope_theta, -2.0 * (double)j / (double)a->head_dim);
      axis[j] = (j % 3 == 1 && j < 3 * a->mrope[1]) ? 1 : (j % 3 == 2 && j < 3 * a->mrope[2]) ? 2 : 0;
    }
    for (int64_t j = 0; j < vq; j++) vinv[j] = pow(v->rope_theta, -2.0 * (double)j / (double)vhalf);
  }
  int64_t patch0 = 0, frame0 = 0, nvis = 0;
  for (int64_t i = 0; i < B && r == ST_OK; i++) {
    const st_sample *s = &batch->samples[i];
    const st_tensor *it = find_tensor(s, "input_ids"), *lt = find_tensor(s, "labels");
    const st_tensor *mt = find_tensor(s, "attention_mask");
    int64_t n = seq_len_of(it), maxpos = n - 1;
    qm_item items[256];
    int64_t n_items = walk_sample(m, s, n, pos, NULL);
    if (n_items > 256) {
      r = st_error_set(err, ST_ERR_FORMAT, s->id, "%lld images and videos in one sample; at most 256", (long long)n_items);
      break;
    }
    walk_sample(m, s, n, pos, items);
    for (int64_t q = 0; q < 3 * n; q++)
      if (pos[q] > maxpos) maxpos = pos[q];
    for (int64_t t = 0; t < S; t++) {
      int64_t row = i * S + t;
      bool real = t < n && (!mt || load_elem(mt, t) != 0.0);
      ids[row] = t < n ? (int32_t)load_elem(it, t) : 0;
      bool image = t < n && ((ids[row] == m->s.image_token && find_tensor(s, "pixel_values")) ||
                             (ids[row] == m->s.video_token && find_tensor(s, "pixel_values_videos")));
      if (image) vis[nvis++] = (int32_t)row;
      store_elem(dt, textm, row, image ? 0.0 : 1.0);
      kmask[row] = real;
      b->tokmask_h[row] = real;
      b->n_valid += real;
      store_elem(dt, tokm, row, real ? 1.0 : 0.0);
      /* transformers shifts inside the loss: position t predicts labels[t + 1] */
      int64_t nl = t + 1;
      double lab = -100;
      if (nl < n) lab = lt ? load_elem(lt, nl) : load_elem(it, nl);
      if (nl < n && !lt && (lab == (double)m->s.image_token || lab == (double)m->s.video_token))
        lab = -100; /* default labels = input_ids, placeholders excluded */
      if (nl < n && mt && load_elem(mt, nl) == 0.0) lab = -100;
      labels[row] = (int64_t)lab;
      /* batch padding continues after the sample's last position */
      for (int64_t j = 0; j < half; j++) {
        double p = t >= n ? (double)(maxpos + 1 + t - n) : (double)pos[axis[j] * n + t];
        double ang = p * inv_freq[j];
        store_elem(dt, cosv, row * half + j, cos(ang));
        store_elem(dt, sinv, row * half + j, sin(ang));
      }
    }
    /* the sample's images and videos, in the order of their tokens (so the merged features come
     * out in row order: the joint image/video order of DeepStack); patches in the processor's
     * merge-window order, frame after frame */
    int64_t mg = v->merge, side = m->side;
    for (int64_t it_i = 0; it_i < n_items; it_i++) {
      const st_tensor *px = find_tensor(s, items[it_i].kind ? "pixel_values_videos" : "pixel_values");
      const st_tensor *gr = find_tensor(s, items[it_i].kind ? "video_grid_thw" : "image_grid_thw");
      int64_t g = items[it_i].index, first = 0;
      for (int64_t q = 0; q < g; q++)
        first += (int64_t)(load_elem(gr, 3 * q) * load_elem(gr, 3 * q + 1) * load_elem(gr, 3 * q + 2));
      int64_t gt = (int64_t)load_elem(gr, 3 * g), gh = (int64_t)load_elem(gr, 3 * g + 1);
      int64_t gw = (int64_t)load_elem(gr, 3 * g + 2);
      for (int64_t q = 0; q < gt * gh * gw * m->pdim; q++)
        store_elem(dt, pix, patch0 * m->pdim + q, load_elem(px, first * m->pdim + q));
      for (int64_t f = 0; f < gt; f++, frame0++)
        for (int64_t within = 0; within < gh * gw; within++, patch0++) {
          int64_t bw = gw / mg, in_col = within % mg, in_row = (within / mg) % mg;
          int64_t bcol = (within / (mg * mg)) % bw, brow = within / (mg * mg * bw);
          int64_t row = brow * mg + in_row, col = bcol * mg + in_col;
          /* bilinear, align_corners: linspace(0, side-1, h)[row]; the ceil tap clamped */
          double sr = (double)row * (double)(side - 1) / (double)(gh > 1 ? gh - 1 : 1);
          double sc = (double)col * (double)(side - 1) / (double)(gw > 1 ? gw - 1 : 1);
          double fr = floor(sr), fc = floor(sc);
          int64_t r0 = (int64_t)fr, c0 = (int64_t)fc, r1 = r0 + 1 < side ? r0 + 1 : side - 1;
          int64_t c1 = c0 + 1 < side ? c0 + 1 : side - 1;
          double wr[2] = {1.0 - (sr - fr), fmax(0.0, 1.0 - fabs(sr - fr - 1.0))};
          double wc[2] = {1.0 - (sc - fc), fmax(0.0, 1.0 - fabs(sc - fc - 1.0))};
          int64_t rr[2] = {r0, r1}, cc[2] = {c0, c1};
          for (int q = 0; q < 4; q++) {
            ptap[q * Np + patch0] = (int32_t)(rr[q / 2] * side + cc[q % 2]);
            store_elem(dt, pwt, q * Np + patch0, wr[q / 2] * wc[q % 2]);
          }
          vseg[patch0] = (int32_t)frame0;
          for (int64_t j = 0; j < vq; j++) {
            store_elem(dt, vcos, patch0 * vhalf + j, cos((double)row * vinv[j]));
            store_elem(dt, vsin, patch0 * vhalf + j, sin((double)row * vinv[j]));
            store_elem(dt, vcos, patch0 * vhalf + vq + j, cos((double)col * vinv[j]));
            store_elem(dt, vsin, patch0 * vhalf + vq + j, sin((double)col * vinv[j]));
          }
        }
    }
  }
  for (int64_t q = 0; q < b->Nm && r == ST_OK; q++) store_elem(dt, negones, q, -1.0);
  if (r == ST_OK) {
    const st_ops *o = host->ops;
    st_device dev = host->device, cpu = {ST_DEVICE_CPU, 0};
    struct { void **dst; void *src; size_t n; } copies[] = {
        {(void **)&b->ids, ids, sizeof(int32_t) * (size_t)T},   {(void **)&b->labels, labels, sizeof(int64_t) * (size_t)T},
        {(void **)&b->kmask, kmask, (size_t)T},                 {&b->tokmask, tokm, (size_t)T * es},
        {&b->cosv, cosv, (size_t)(T * half) * es},              {&b->sinv, sinv, (size_t)(T * half) * es},
        {&b->iota, iota, sizeof(int32_t) * (size_t)niota},      {&b->textmask, textm, (size_t)T * es},
        {&b->pix, pix, (size_t)(Np * m->pdim) * es},            {(void **)&b->ptap, ptap, sizeof(int32_t) * (size_t)(4 * Np)},
        {&b->pwt, pwt, (size_t)(4 * Np) * es},                  {&b->vcos, vcos, (size_t)(Np * vhalf) * es},
        {&b->vsin, vsin, (size_t)(Np * vhalf) * es},            {(void **)&b->vseg, vseg, sizeof(int32_t) * (size_t)Np},
        {(void **)&b->vis_rows, vis, sizeof(int32_t) * (size_t)b->Nm}, {&b->negones, negones, (size_t)b->Nm * es}};
    for (size_t i = 0; i < sizeof copies / sizeof copies[0] && r == ST_OK; i++) {
      *copies[i].dst = host->alloc(host, dev, copies[i].n ? copies[i].n : 1, "activations");
      if (!*copies[i].dst) r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen3_vl_moe", "batch buffers");
      else if (copies[i].n && (r = o->copy(o, *copies[i].dst, dev, copies[i].src, cpu, copies[i].n)) != ST_OK)
        st_error_set(err, r, "model.qwen3_vl_moe", "copying the batch to the device failed");
    }
  }
  free(ids), free(iota), free(labels), free(pos), free(kmask), free(tokm), free(textm), free(cosv), free(sinv);
  free(pix), free(pwt), free(negones), free(vcos), free(vsin), free(ptap), free(vis);
  b->vseg_h = vseg; /* kept: the FLOP count reads it */
  free(inv_freq), free(vinv), free(axis);
  if (r != ST_OK) {
    qm_batch_release(m, b);
    return r;
  }
  *out = b;
  return ST_OK;
}

/* deepstack features travel with the carry from the vision tower until the last LM layer that
 * adds them: boundaries 1..merger carry (v, ds), the merger's output (img, ds), the embed's (h, ds),
 * layer j's (h) plus ds while a later layer still needs it */
static bool carries_ds(const qm_model *m, int boundary) {
  if (!m->s.vision || m->s.v.n_ds == 0) return false;
  return boundary <= m->u_embed + 1 || boundary - m->u_layer0 < m->s.v.n_ds;
}

static st_result qm_carry_layout(void *ctx, void *vb, int boundary, st_carry_layout *out, st_error *err) {
  qm_model *m = ctx;
  qm_batch *b = vb;
  (void)err;
  memset(out, 0, sizeof *out);
  st_device dev = m->host->device;
  st_dtype dt = m->s.dt;
  int64_t H = m->s.a.hidden;
  if (boundary <= 0) return ST_OK; /* the first unit reads the batch */
  if (boundary == m->n_units) {
    out->n = 1;
    out->names[0] = "logits";
    out->t[0] = st_tensor_make(NULL, dt, dev, 3, (int64_t[]){b->B, b->S, m->s.a.vocab});
    return ST_OK;
  }
  int n = 0;
  if (boundary <= m->u_merger) {
    out->names[n] = "v";
    out->t[n++] = st_tensor_make(NULL, dt, dev, 2, (int64_t[]){b->Np, m->s.v.hidden});
  } else if (boundary == m->u_embed) {
    out->names[n] = "img";
    out->t[n++] = st_tensor_make(NULL, dt, dev, 2, (int64_t[]){b->Nm, H});
  } else {
    out->names[n] = "h";
    out->t[n++] = st_tensor_make(NULL, dt, dev, 3, (int64_t[]){b->B, b->S, H});
  }
  if (carries_ds(m, boundary)) {
    out->names[n] = "deepstack";
    out->t[n++] = st_tensor_make(NULL, dt, dev, 3, (int64_t[]){m->s.v.n_ds, b->Nm, H});
  }
  out->n = n;
  return ST_OK;
}

/* ---- memory layouts ------------------------------------------------------------------------- */

typedef struct lay_saved {
  void *rstd1, *xn1, *qraw, *kraw, *q, *k, *v, *rq, *rk, *o, *lse, *h1, *rstd2, *xn2, *p, *wsel, *wsorted;
  int32_t *idx, *tok, *perm, *eid, *sel;
  void *xr, *hgu, *u, *ys; /* xr: the received rows themselves (the exchange writes them here) */
} lay_saved;

static void layer_saved_layout(const qm_model *m, const qm_batch *b, bump *bp, lay_saved *s) {
  size_t es = st_dtype_size(m->s.dt), is = sizeof(int32_t);
  const qm_arch *a = &m->s.a;
  int64_t T = b->T, H = a->hidden, Tk = b->Tk, NR = b->recv_cap, I = a->moe_inter;
  s->rstd1 = take(bp, (size_t)T * es);
  s->xn1 = take(bp, (size_t)(T * H) * es);
  s->qraw = take(bp, (size_t)(T * m->Q) * es);
  s->kraw = take(bp, (size_t)(T * m->KV) * es);
  s->q = take(bp, (size_t)(T * m->Q) * es);
  s->k = take(bp, (size_t)(T * m->KV) * es);
  s->v = take(bp, (size_t)(T * m->KV) * es);
  s->rq = take(bp, (size_t)(T * a->heads) * es);
  s->rk = take(bp, (size_t)(T * a->kv_heads) * es);
  s->o = take(bp, (size_t)(T * m->Q) * es);
  s->lse = take(bp, (size_t)(T * a->heads) * es);
  s->h1 = take(bp, (size_t)(T * H) * es);
  s->rstd2 = take(bp, (size_t)T * es);
  s->xn2 = take(bp, (size_t)(T * H) * es);
  s->p = take(bp, (size_t)(T * a->experts) * es);
  s->wsel = take(bp, (size_t)Tk * es);
  s->wsorted = take(bp, (size_t)Tk * es);
  s->idx = take(bp, (size_t)Tk * is);
  s->tok = take(bp, (size_t)Tk * is);
  s->perm = take(bp, (size_t)Tk * is);
  s->eid = take(bp, (size_t)Tk * is);
  s->sel = take(bp, (size_t)Tk * is);
  s->xr = take(bp, (size_t)(NR * H) * es);
  s->hgu = take(bp, (size_t)(NR * 2 * I) * es);
  s->u = take(bp, (size_t)(NR * I) * es);
  s->ys = take(bp, (size_t)(Tk * H) * es);
}

typedef struct lay_fwd_ws {
  void *z, *topv, *zsel, *xs, *yr, *col, *lt;
  int32_t *recv_eid;
} lay_fwd_ws;

static void layer_fwd_ws(const qm_model *m, const qm_batch *b, bump *bp, lay_fwd_ws *w) {
  size_t es = st_dtype_size(m->s.dt);
  const qm_arch *a = &m->s.a;
  int64_t T = b->T, H = a->hidden, Tk = b->Tk, NR = b->recv_cap;
  w->z = take(bp, (size_t)(T * a->experts) * es);
  w->topv = take(bp, (size_t)Tk * es);
  w->zsel = take(bp, (size_t)Tk * es);
  w->xs = take(bp, (size_t)(Tk * H) * es);
  w->yr = take(bp, (size_t)(NR * H) * es);
  w->col = take(bp, (size_t)a->experts * es);
  w->recv_eid = take(bp, (size_t)NR * sizeof(int32_t));
  w->lt = take(bp, (size_t)(T * (m->s.lora ? m->s.rank : 0)) * es);
}

typedef struct lay_bwd_ws {
  void *G, *gF, *grecv, *gu, *gab, *gxr, *gxs, *gws, *gw, *dzsel, *gz, *gp, *gz2, *cvec;
  void *dxn2, *dh1, *dO, *dq, *dk, *dv, *dqraw, *dkraw, *dxn1, *lt1, *lt2;
  int32_t *recv_eid;
} lay_bwd_ws;

static void layer_bwd_ws(const qm_model *m, const qm_batch *b, bump *bp, lay_bwd_ws *w) {
  size_t es = st_dtype_size(m->s.dt);
  const qm_arch *a = &m->s.a;
  int64_t T = b->T, H = a->hidden, Tk = b->Tk, NR = b->recv_cap, I = a->moe_inter, E = a->experts;
  w->G = take(bp, (size_t)(Tk * H) * es);
  w->gF = take(bp, (size_t)(Tk * H) * es);
  w->grecv = take(bp, (size_t)(NR * H) * es);
  w->gu = take(bp, (size_t)(NR * I) * es);
  w->gab = take(bp, (size_t)(NR * 2 * I) * es);
  w->gxr = take(bp, (size_t)(NR * H) * es);
  w->gxs = take(bp, (size_t)(Tk * H) * es);
  w->gws = take(bp, (size_t)Tk * es);
  w->gw = take(bp, (size_t)Tk * es);
  w->dzsel = take(bp, (size_t)Tk * es);
  w->gz = take(bp, (size_t)(T * E) * es);
  w->gp = take(bp, (size_t)(T * E) * es);
  w->gz2 = take(bp, (size_t)(T * E) * es);
  w->cvec = take(bp, (size_t)E * es);
  w->dxn2 = take(bp, (size_t)(T * H) * es);
  w->dh1 = take(bp, (size_t)(T * H) * es);
  w->dO = take(bp, (size_t)(T * m->Q) * es);
  w->dq = take(bp, (size_t)(T * m->Q) * es);
  w->dk = take(bp, (size_t)(T * m->KV) * es);
  w->dv = take(bp, (size_t)(T * m->KV) * es);
  w->dqraw = take(bp, (size_t)(T * m->Q) * es);
  w->dkraw = take(bp, (size_t)(T * m->KV) * es);
  w->dxn1 = take(bp, (size_t)(T * H) * es);
  w->recv_eid = take(bp, (size_t)NR * sizeof(int32_t));
  w->lt1 = take(bp, (size_t)(T * (m->s.lora ? m->s.rank : 0)) * es);
  w->lt2 = take(bp, (size_t)(T * (m->s.lora ? m->s.rank : 0)) * es);
}

typedef struct fin_saved {
  void *rstd, *xf;
} fin_saved;

static void final_saved_layout(const qm_model *m, const qm_batch *b, bump *bp, fin_saved *s) {
  size_t es = st_dtype_size(m->s.dt);
  s->rstd = take(bp, (size_t)b->T * es);
  s->xf = take(bp, (size_t)(b->T * m->s.a.hidden) * es);
}

/* vision layouts: a merger (main: LayerNorm per patch before the 2x2 view; deepstack: after) */
typedef struct mg_saved {
  void *mean, *rstd, *hat, *xa, *f1, *g1;
} mg_saved;

static void merger_saved_layout(const qm_model *m, const qm_batch *b, bump *bp, mg_saved *s) {
  size_t es = st_dtype_size(m->s.dt);
  int64_t Np = b->Np, Nm = b->Nm, Hv = m->s.v.hidden, M4 = Hv * m->s.v.merge * m->s.v.merge;
  s->mean = take(bp, (size_t)Np * es);
  s->rstd = take(bp, (size_t)Np * es);
  s->hat = take(bp, (size_t)(Np * Hv) * es);
  s->xa = take(bp, (size_t)(Np * Hv) * es);
  s->f1 = take(bp, (size_t)(Nm * M4) * es);
  s->g1 = take(bp, (size_t)(Nm * M4) * es);
}

typedef struct vb_saved {
  void *mean1, *rstd1, *hat1, *xa1, *q, *k, *v, *o, *lse, *h1, *mean2, *rstd2, *hat2, *xa2, *f1, *g1, *y;
  mg_saved ds;
} vb_saved;

static void vblock_saved_layout(const qm_model *m, const qm_batch *b, int blk, bump *bp, vb_saved *s) {
  size_t es = st_dtype_size(m->s.dt);
  int64_t Np = b->Np, Hv = m->s.v.hidden, Vi = m->s.v.inter;
  memset(s, 0, sizeof *s);
  s->mean1 = take(bp, (size_t)Np * es);
  s->rstd1 = take(bp, (size_t)Np * es);
  s->hat1 = take(bp, (size_t)(Np * Hv) * es);
  s->xa1 = take(bp, (size_t)(Np * Hv) * es);
  s->q = take(bp, (size_t)(Np * Hv) * es);
  s->k = take(bp, (size_t)(Np * Hv) * es);
  s->v = take(bp, (size_t)(Np * Hv) * es);
  s->o = take(bp, (size_t)(Np * Hv) * es);
  s->lse = take(bp, (size_t)(Np * m->s.v.heads) * es);
  s->h1 = take(bp, (size_t)(Np * Hv) * es);
  s->mean2 = take(bp, (size_t)Np * es);
  s->rstd2 = take(bp, (size_t)Np * es);
  s->hat2 = take(bp, (size_t)(Np * Hv) * es);
  s->xa2 = take(bp, (size_t)(Np * Hv) * es);
  s->f1 = take(bp, (size_t)(Np * Vi) * es);
  s->g1 = take(bp, (size_t)(Np * Vi) * es);
  if (m->ds_of_block[blk] >= 0) {
    s->y = take(bp, (size_t)(Np * Hv) * es);
    merger_saved_layout(m, b, bp, &s->ds);
  }
}

/* backward scratch of a vision block, the merger and the patch embedding (one layout for all) */
typedef struct vb_ws {
  void *sc, *dtot, *dg1, *df1, *dxa, *dh1, *dO, *dq, *dk, *dv, *dhat, *dsx, *mdg1, *mdf1, *mdxa, *dummy;
} vb_ws;

static void vision_ws_layout(const qm_model *m, const qm_batch *b, bump *bp, vb_ws *w) {
  size_t es = st_dtype_size(m->s.dt);
  int64_t Np = b->Np, Nm = b->Nm, Hv = m->s.v.hidden, Vi = m->s.v.inter, M4 = Hv * m->s.v.merge * m->s.v.merge;
  w->sc = take(bp, (size_t)M4 * es);
  w->dtot = take(bp, (size_t)(Np * Hv) * es);
  w->dg1 = take(bp, (size_t)(Np * Vi) * es);
  w->df1 = take(bp, (size_t)(Np * Vi) * es);
  w->dxa = take(bp, (size_t)(Np * Hv) * es);
  w->dh1 = take(bp, (size_t)(Np * Hv) * es);
  w->dO = take(bp, (size_t)(Np * Hv) * es);
  w->dq = take(bp, (size_t)(Np * Hv) * es);
  w->dk = take(bp, (size_t)(Np * Hv) * es);
  w->dv = take(bp, (size_t)(Np * Hv) * es);
  w->dhat = take(bp, (size_t)(Np * Hv) * es);
  w->dsx = take(bp, (size_t)(Np * Hv) * es);
  w->mdg1 = take(bp, (size_t)(Nm * M4) * es);
  w->mdf1 = take(bp, (size_t)(Nm * M4) * es);
  w->mdxa = take(bp, (size_t)(Np * Hv) * es);
  w->dummy = take(bp, (size_t)M4 * es); /* dscale sink of a frozen LayerNorm (modulate_backward needs one) */
}

static st_result qm_unit_memory(void *ctx, void *vb, int unit, size_t *saved, size_t *work, st_error *err) {
  qm_model *m = ctx;
  qm_batch *b = vb;
  (void)err;
  bump sb = {NULL, 0}, fb = {NULL, 0}, bb = {NULL, 0};
  if (unit == m->u_embed) {
    /* embed keeps nothing: its backward needs only the token ids; scratch for the image rows */
    take(&fb, (size_t)(b->Nm * m->s.a.hidden) * st_dtype_size(m->s.dt));
  } else if (unit == m->u_final) {
    fin_saved s;
    final_saved_layout(m, b, &sb, &s);
    take(&bb, (size_t)(b->T * m->s.a.hidden) * st_dtype_size(m->s.dt));
  } else if (unit >= m->u_layer0) {
    lay_saved s;
    lay_fwd_ws fw;
    lay_bwd_ws bw;
    layer_saved_layout(m, b, &sb, &s);
    layer_fwd_ws(m, b, &fb, &fw);
    layer_bwd_ws(m, b, &bb, &bw);
  } else {
    vb_ws w;
    if (unit == m->u_merger) {
      mg_saved s;
      merger_saved_layout(m, b, &sb, &s);
    } else if (unit != m->u_pe) {
      vb_saved s;
      vblock_saved_layout(m, b, unit - 1, &sb, &s);
    }
    vision_ws_layout(m, b, &fb, &w);
    vision_ws_layout(m, b, &bb, &w);
  }
  *saved = sb.off;
  /* a forward without a saved buffer (validation) keeps its intermediates in the workspace */
  *work = sb.off + fb.off > bb.off ? sb.off + fb.off : bb.off;
  return ST_OK;
}

/* ---- helpers over the ops table ------------------------------------------------------------- */

#define CK(expr)                                                                                                   \
  do {                                                                                                             \
    st_result ck_r_ = (expr);                                                                                      \
    if (ck_r_ != ST_OK)                                                                                            \
      return st_error_set(err, ck_r_, m->units[unit].name, "kernel call failed (qwen3_vl_moe.c:%d): %s", __LINE__, \
                          st_result_string(ck_r_));                                                                \
  } while (0)

static void *at(const qm_model *m, const void *p, int64_t elems) {
  return p ? (char *)(uintptr_t)p + (size_t)elems * st_dtype_size(m->s.dt) : NULL;
}

/* C = alpha op(A) op(B) + beta C, one matrix, dense leading dimensions */
static st_result mm(const qm_model *m, bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const void *A,
                    int64_t lda, const void *Bm, int64_t ldb, double beta, void *C, int64_t ldc) {
  if (M == 0 || N == 0) return ST_OK;
  const st_ops *o = m->host->ops;
  st_gemm_desc g = {.dtype = m->s.dt, .c_dtype = m->s.dt, .trans_a = ta, .trans_b = tb, .m = M, .n = N, .k = K,
                    .alpha = alpha, .beta = beta, .a = A, .lda = lda, .b = Bm, .ldb = ldb, .c = C, .ldc = ldc,
                    .batch = 1};
  if (K == 0) return beta == 1.0 ? ST_OK : o->scale(o, m->s.dt, C, M * N, beta); /* (ldc == N here) */
  return o->gemm(o, &g);
}

/* y [T, out] = x [T, in] W^T, W [out, in] */
static st_result lin(const qm_model *m, const void *x, const void *W, void *y, int64_t T, int64_t out, int64_t in) {
  return mm(m, false, true, T, out, in, 1.0, x, in, W, in, 0.0, y, out);
}

/* dx (= or +=) dy W; dW += dy^T x */
static st_result lin_bwd(const qm_model *m, const void *x, const void *W, const void *dy, void *dx, double dx_beta,
                         void *dW, int64_t T, int64_t out, int64_t in) {
  if (dx) ST_CHECK(mm(m, false, false, T, in, out, 1.0, dy, out, W, in, dx_beta, dx, in));
  if (dW) ST_CHECK(mm(m, true, false, out, in, T, 1.0, dy, out, x, in, 1.0, dW, in));
  return ST_OK;
}

/* y += s (x A^T) B^T for LoRA pair (la, lb) of the window, A [r, in], B [out, r]; t [T, r] scratch */
static st_result lora_fwd(const qm_model *m, const st_tensor *P, int q, const void *x, void *y, int64_t T, int64_t out,
                          int64_t in, void *t) {
  if (m->lora_a[q] < 0) return ST_OK;
  int64_t r = m->s.rank;
  ST_CHECK(mm(m, false, true, T, r, in, 1.0, x, in, P[m->lora_a[q]].data, in, 0.0, t, r));
  return mm(m, false, true, T, out, r, m->lora_scale, t, r, P[m->lora_b[q]].data, r, 1.0, y, out);
}

/* dx += s (dy B) A; dB += s dy^T (x A^T); dA += s (dy B)^T x */
static st_result lora_bwd(const qm_model *m, const st_tensor *P, st_tensor *G, int q, const void *x, const void *dy,
                          void *dx, int64_t T, int64_t out, int64_t in, void *t1, void *t2) {
  if (m->lora_a[q] < 0) return ST_OK;
  int64_t r = m->s.rank;
  double s = m->lora_scale;
  const void *A = P[m->lora_a[q]].data, *Bm = P[m->lora_b[q]].data;
  ST_CHECK(mm(m, false, true, T, r, in, 1.0, x, in, A, in, 0.0, t1, r));
  if (G[m->lora_b[q]].data) ST_CHECK(mm(m, true, false, out, r, T, s, dy, out, t1, r, 1.0, G[m->lora_b[q]].data, r));
  ST_CHECK(mm(m, false, false, T, r, out, s, dy, out, Bm, r, 0.0, t2, r));
  if (G[m->lora_a[q]].data) ST_CHECK(mm(m, true, false, r, in, T, 1.0, t2, r, x, in, 1.0, G[m->lora_a[q]].data, in));
  return dx ? mm(m, false, false, T, in, r, 1.0, t2, r, A, in, 1.0, dx, in) : ST_OK;
}

static st_result copy_dev(const qm_model *m, void *dst, const void *src, size_t bytes) {
  const st_ops *o = m->host->ops;
  return o->copy(o, dst, m->host->device, src, m->host->device, bytes);
}

static st_result to_host(const qm_model *m, void *dst, const void *src, size_t bytes) {
  const st_ops *o = m->host->ops;
  return o->copy(o, dst, (st_device){ST_DEVICE_CPU, 0}, src, m->host->device, bytes);
}

static st_result to_dev(const qm_model *m, void *dst, const void *src, size_t bytes) {
  const st_ops *o = m->host->ops;
  return o->copy(o, dst, m->host->device, src, (st_device){ST_DEVICE_CPU, 0}, bytes);
}

static double get_d(st_dtype dt, const void *p, int64_t i) {
  return dt == ST_F64 ? ((const double *)p)[i] : (double)((const float *)p)[i];
}

/* ---- embed ---------------------------------------------------------------------------------- */

/* h = embed_tokens[ids]; image-token rows are replaced by the merged vision features (masked_scatter:
 * subtract the looked-up row, then add the feature, exact in any precision) */
static st_result embed_forward(qm_model *m, qm_batch *b, const st_tensor *P, const st_tensor *cin, st_tensor *cout,
                               void *work, st_error *err) {
  const int unit = m->u_embed;
  const st_ops *o = m->host->ops;
  st_dtype dt = m->s.dt;
  int64_t H = m->s.a.hidden;
  CK(o->gather_rows(o, dt, P[0].data, b->ids, b->T, H, cout[0].data));
  if (m->s.vision && b->Nm) {
    CK(o->gather_rows(o, dt, cout[0].data, b->vis_rows, b->Nm, H, work));
    CK(o->scatter_add_rows(o, dt, work, b->vis_rows, b->negones, b->Nm, H, cout[0].data));
    CK(o->scatter_add_rows(o, dt, cin[0].data, b->vis_rows, NULL, b->Nm, H, cout[0].data));
  }
  if (carries_ds(m, unit + 1))
    CK(copy_dev(m, cout[1].data, cin[1].data, st_tensor_nbytes(&cout[1])));
  return ST_OK;
}

static st_result embed_backward(qm_model *m, qm_batch *b, st_tensor *G, const st_tensor *dout, st_tensor *din,
                                st_error *err) {
  const int unit = m->u_embed;
  const st_ops *o = m->host->ops;
  st_dtype dt = m->s.dt;
  int64_t H = m->s.a.hidden;
  if (G[0].data) CK(o->scatter_add_rows(o, dt, dout[0].data, b->ids, b->textmask, b->T, H, G[0].data));
  if (m->s.vision && din) {
    CK(o->gather_rows(o, dt, dout[0].data, b->vis_rows, b->Nm, H, din[0].data));
    if (carries_ds(m, unit)) CK(copy_dev(m, din[1].data, dout[1].data, st_tensor_nbytes(&din[1])));
  }
  return ST_OK;
}

/* ---- one decoder layer ---------------------------------------------------------------------- */

static st_attn_desc attn_desc(const qm_model *m, const qm_batch *b, const lay_saved *s) {
  const qm_arch *a = &m->s.a;
  return (st_attn_desc){.dtype = m->s.dt, .batch = b->B, .seq_q = b->S, .seq_k = b->S, .heads = a->heads,
                        .kv_heads = a->kv_heads, .head_dim = a->head_dim, .scale = 1.0 / sqrt((double)a->head_dim),
                        .causal = true, .key_mask = b->kmask, .q = s->q, .k = s->k, .v = s->v, .out = s->o,
                        .lse = s->lse};
}

/* expert e's slice of a [E_window, r, c] expert tensor: the window holds either every expert or
 * only this rank's (expert_parallel partitions dim 0) */
static void *expert_slice(const qm_model *m, const qm_batch *b, const st_tensor *t, int64_t e_local) {
  int64_t e = t->shape[0] == m->s.a.experts ? b->first_local + e_local : e_local;
  return at(m, t->data, e * t->shape[1] * t->shape[2]);
}

/* stable counting sort of the (token, slot) pairs by expert; received rows likewise */
static void route_sort(const qm_model *m, qm_batch *b, qm_route *r) {
  int64_t E = m->s.a.experts, k = m->s.a.top_k, Tk = b->Tk;
  int64_t *start = calloc((size_t)E + 1, sizeof *start);
  if (!start) return;
  for (int64_t i = 0; i < Tk; i++) start[r->idx[i] + 1]++;
  for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
  for (int64_t i = 0; i < Tk; i++) {
    int64_t pos = start[r->idx[i]]++;
    r->perm[pos] = (int32_t)i;
    r->tok[pos] = (int32_t)(i / k);
    r->eid[pos] = r->idx[i];
    r->sel[i] = (int32_t)((i / k) * E + r->idx[i]);
  }
  free(start);
}

/* The exchange in its pipelined form when the strategy offers it (blocks of received rows arrive
 * while the experts work on earlier ones and go home as soon as they are done), else one block
 * through the blocking dispatch. */
typedef struct moe_xfer {
  const st_moe_api *api;
  const st_moe_ext *ext; /* NULL: the blocking dispatch */
  int n_blocks;
  int64_t n_recv;
} moe_xfer;

static moe_xfer xfer_make(const st_host *h) {
  const st_moe_ext *e = moe_ext_of(h);
  bool piped = e && e->struct_size >= offsetof(st_moe_ext, return_block) + sizeof e->return_block &&
               e->dispatch_start && e->wait_block && e->return_block;
  return (moe_xfer){.api = h->moe(h), .ext = piped ? e : NULL};
}

static st_result xfer_start(moe_xfer *x, const qm_model *m, const qm_batch *b, const void *rows, const int32_t *eid,
                            void *recv, int32_t *recv_eid, void *out, st_error *err) {
  const st_moe_api *api = x->api;
  st_dtype dt = m->s.dt;
  int64_t H = m->s.a.hidden;
  int E = (int)m->s.a.experts;
  if (x->ext)
    return x->ext->dispatch_start(api->self, dt, rows, eid, b->Tk, H, E, recv, recv_eid, b->recv_cap, out, &x->n_recv,
                               &x->n_blocks, err);
  x->n_blocks = 1;
  return api->dispatch(api->self, dt, rows, eid, b->Tk, H, E, recv, recv_eid, b->recv_cap, &x->n_recv, err);
}

static st_result xfer_wait(moe_xfer *x, int i, int64_t *first, int64_t *n, st_error *err) {
  if (x->ext) return x->ext->wait_block(x->api->self, i, first, n, err);
  *first = 0, *n = x->n_recv;
  return ST_OK;
}

static st_result xfer_return(moe_xfer *x, int i, const void *processed, st_error *err) {
  return x->ext ? x->ext->return_block(x->api->self, i, processed, err) : ST_OK;
}

/* the received rows' experts, on the host, each one of this rank's */
static st_result recv_experts(const qm_model *m, qm_batch *b, qm_route *r, const int32_t *recv_eid, st_error *err) {
  st_result rr = to_host(m, r->reid, recv_eid, sizeof(int32_t) * (size_t)r->n_recv);
  if (rr != ST_OK) return st_error_set(err, rr, "moe.dispatch", "copying the received expert ids failed");
  for (int64_t i = 0; i < r->n_recv; i++)
    if (r->reid[i] < b->first_local || r->reid[i] >= b->first_local + b->n_local)
      return st_error_set(err, ST_ERR_INTERNAL, "moe.dispatch", "received a row for expert %d, which is not one of "
                          "this rank's experts [%d, %d)", r->reid[i], b->first_local, b->first_local + b->n_local);
  return ST_OK;
}

/* the end of the run of rows for one expert that starts at row i (rows [i, end) of a block) */
static int64_t run_end(const qm_route *r, int64_t i, int64_t end) {
  int64_t j = i + 1;
  while (j < end && r->reid[j] == r->reid[i]) j++;
  return j;
}

static st_result layer_forward(qm_model *m, qm_batch *b, int unit, const st_tensor *P, const st_tensor *cin,
                               st_tensor *cout, void *saved, void *work, st_error *err) {
  const st_ops *o = m->host->ops;
  const st_moe_api *moe = m->host->moe(m->host);
  const qm_arch *a = &m->s.a;
  st_dtype dt = m->s.dt;
  size_t es = st_dtype_size(dt);
  int64_t T = b->T, H = a->hidden, E = a->experts, k = a->top_k, Tk = b->Tk, I = a->moe_inter;
  int64_t nh = a->heads, nkv = a->kv_heads, d = a->head_dim, half = d / 2;
  qm_route *r = &b->route[unit - m->u_layer0];
  bump sb = {saved ? saved : work, 0};
  lay_saved s;
  layer_saved_layout(m, b, &sb, &s);
  bump wb = {saved ? work : (char *)work + sb.off, 0};
  lay_fwd_ws w;
  layer_fwd_ws(m, b, &wb, &w);
  const void *x = cin[0].data;
  void *y = cout[0].data;

  /* attention */
  CK(o->rmsnorm_forward(o, dt, x, P[P_IN_NORM].data, s.xn1, s.rstd1, T, H, a->rms_eps));
  CK(lin(m, s.xn1, P[P_Q].data, s.qraw, T, m->Q, H));
  CK(lin(m, s.xn1, P[P_K].data, s.kraw, T, m->KV, H));
  CK(lin(m, s.xn1, P[P_V].data, s.v, T, m->KV, H));
  CK(lora_fwd(m, P, 0, s.xn1, s.qraw, T, m->Q, H, w.lt));
  CK(lora_fwd(m, P, 1, s.xn1, s.kraw, T, m->KV, H, w.lt));
  CK(lora_fwd(m, P, 2, s.xn1, s.v, T, m->KV, H, w.lt));
  CK(o->rmsnorm_forward(o, dt, s.qraw, P[P_QN].data, s.q, s.rq, T * nh, d, a->rms_eps));
  CK(o->rmsnorm_forward(o, dt, s.kraw, P[P_KN].data, s.k, s.rk, T * nkv, d, a->rms_eps));
  CK(o->rope_apply(o, dt, ST_ROPE_HALF, s.q, b->cosv, b->sinv, b->S * half, b->B, b->S, nh, d, false));
  CK(o->rope_apply(o, dt, ST_ROPE_HALF, s.k, b->cosv, b->sinv, b->S * half, b->B, b->S, nkv, d, false));
  st_attn_desc ad = attn_desc(m, b, &s);
  CK(o->attention_forward(o, &ad));
  CK(lin(m, s.o, P[P_O].data, s.h1, T, H, m->Q));
  CK(lora_fwd(m, P, 3, s.o, s.h1, T, H, m->Q, w.lt));
  CK(o->add(o, dt, s.h1, x, s.h1, T * H));

  /* router: softmax over all experts, top-k of the probabilities, renormalised over the k (the
   * same as a softmax over the k selected logits, which is what is computed and differentiated) */
  CK(o->rmsnorm_forward(o, dt, s.h1, P[P_POST_NORM].data, s.xn2, s.rstd2, T, H, a->rms_eps));
  CK(lin(m, s.xn2, P[P_GATE].data, w.z, T, E, H));
  CK(o->softmax_forward(o, dt, w.z, s.p, T, E));
  CK(o->topk(o, dt, s.p, T, E, k, w.topv, s.idx));
  CK(to_host(m, r->idx, s.idx, sizeof(int32_t) * (size_t)Tk));
  route_sort(m, b, r);
  CK(to_dev(m, s.tok, r->tok, sizeof(int32_t) * (size_t)Tk));
  CK(to_dev(m, s.perm, r->perm, sizeof(int32_t) * (size_t)Tk));
  CK(to_dev(m, s.eid, r->eid, sizeof(int32_t) * (size_t)Tk));
  CK(to_dev(m, s.sel, r->sel, sizeof(int32_t) * (size_t)Tk));
  CK(o->gather_rows(o, dt, w.z, s.sel, Tk, 1, w.zsel));
  CK(o->softmax_forward(o, dt, w.zsel, s.wsel, T, k));
  CK(o->gather_rows(o, dt, s.wsel, s.perm, Tk, 1, s.wsorted));

  /* router statistics over non-padding tokens (aux loss, load metrics); overwritten, not added,
   * so a recompute under activation checkpointing changes nothing */
  memset(r->count, 0, sizeof(double) * (size_t)E);
  for (int64_t i = 0; i < Tk; i++) r->count[r->idx[i]] += b->tokmask_h[i / k];
  CK(mm(m, false, false, 1, E, T, 1.0, b->tokmask, T, s.p, E, 0.0, w.col, E));
  {
    void *hc = malloc((size_t)E * es);
    if (!hc) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, m->units[unit].name, "router statistics");
    st_result rr = to_host(m, hc, w.col, (size_t)E * es);
    for (int64_t e = 0; e < E && rr == ST_OK; e++) r->psum[e] = get_d(dt, hc, e);
    free(hc);
    CK(rr);
  }

  /* experts: token copies sorted by expert -> exchange -> grouped by local expert -> FFN -> back */
  CK(o->gather_rows(o, dt, s.xn2, s.tok, Tk, H, w.xs));
  moe_xfer xf = xfer_make(m->host);
  ST_CHECK(xfer_start(&xf, m, b, w.xs, s.eid, s.xr, w.recv_eid, s.ys, err));
  r->n_recv = xf.n_recv;
  ST_CHECK(recv_experts(m, b, r, w.recv_eid, err));
  for (int blk = 0; blk < xf.n_blocks; blk++) { /* each block's rows as they arrive, expert by expert */
    int64_t f = 0, nb = 0;
    ST_CHECK(xfer_wait(&xf, blk, &f, &nb, err));
    for (int64_t i = f, j; i < f + nb; i = j) {
      j = run_end(r, i, f + nb);
      CK(mm(m, false, false, j - i, 2 * I, H, 1.0, at(m, s.xr, i * H), H,
            expert_slice(m, b, &P[P_GU], r->reid[i] - b->first_local), 2 * I, 0.0, at(m, s.hgu, i * 2 * I), 2 * I));
    }
    if (nb) CK(o->swiglu_forward(o, dt, at(m, s.hgu, f * 2 * I), at(m, s.u, f * I), nb, I));
    for (int64_t i = f, j; i < f + nb; i = j) {
      j = run_end(r, i, f + nb);
      CK(mm(m, false, false, j - i, H, I, 1.0, at(m, s.u, i * I), I,
            expert_slice(m, b, &P[P_DOWN], r->reid[i] - b->first_local), H, 0.0, at(m, w.yr, i * H), H));
    }
    ST_CHECK(xfer_return(&xf, blk, w.yr, err));
  }
  ST_CHECK(moe->combine(moe->self, dt, w.yr, H, s.ys, err));
  CK(copy_dev(m, y, s.h1, (size_t)(T * H) * es));
  CK(o->scatter_add_rows(o, dt, s.ys, s.tok, s.wsorted, Tk, H, y));
  /* DeepStack: after layer j < n_ds, the image-token rows get deepstack feature j */
  int64_t j = unit - m->u_layer0;
  if (carries_ds(m, unit) && j < m->s.v.n_ds && b->Nm)
    CK(o->scatter_add_rows(o, dt, at(m, cin[1].data, j * b->Nm * H), b->vis_rows, NULL, b->Nm, H, y));
  if (carries_ds(m, unit + 1)) CK(copy_dev(m, cout[1].data, cin[1].data, st_tensor_nbytes(&cout[1])));
  return ST_OK;
}

static st_result layer_backward(qm_model *m, qm_batch *b, int unit, const st_tensor *P, st_tensor *G,
                                const st_tensor *cin, const void *saved, const st_tensor *dout, st_tensor *din,
                                void *work, st_error *err) {
  const st_ops *o = m->host->ops;
  const st_moe_api *moe = m->host->moe(m->host);
  const qm_arch *a = &m->s.a;
  st_dtype dt = m->s.dt;
  size_t es = st_dtype_size(dt);
  int64_t T = b->T, H = a->hidden, E = a->experts, k = a->top_k, Tk = b->Tk, I = a->moe_inter;
  int64_t nh = a->heads, nkv = a->kv_heads, d = a->head_dim, half = d / 2;
  qm_route *r = &b->route[unit - m->u_layer0];
  int64_t NR = r->n_recv;
  bump sb = {(void *)(uintptr_t)saved, 0};
  lay_saved s;
  layer_saved_layout(m, b, &sb, &s);
  bump wb = {work, 0};
  lay_bwd_ws w;
  layer_bwd_ws(m, b, &wb, &w);
  const void *x = cin[0].data, *dy = dout[0].data;
  if (carries_ds(m, unit)) { /* deepstack j's gradient is dy at the image rows; later ones pass through */
    int64_t j = unit - m->u_layer0;
    if (carries_ds(m, unit + 1)) CK(copy_dev(m, din[1].data, dout[1].data, st_tensor_nbytes(&din[1])));
    else CK(o->fill(o, dt, din[1].data, st_tensor_numel(&din[1]), 0.0));
    if (j < m->s.v.n_ds) CK(o->gather_rows(o, dt, dy, b->vis_rows, b->Nm, H, at(m, din[1].data, j * b->Nm * H)));
  }

  /* MoE output y = h1 + sum_slots w * FFN: gFFN = w g_y, g_w = <g_y, FFN> */
  CK(o->gather_rows(o, dt, dy, s.tok, Tk, H, w.G));
  if (Tk) {
    st_gemm_desc g = {.dtype = dt, .c_dtype = dt, .trans_b = true, .m = 1, .n = 1, .k = H, .alpha = 1.0, .beta = 0.0,
                      .a = w.G, .lda = H, .stride_a = H, .b = s.ys, .ldb = H, .stride_b = H, .c = w.gws, .ldc = 1,
                      .stride_c = 1, .batch = Tk};
    CK(o->gemm(o, &g));
  }
  CK(o->fill(o, dt, w.gF, Tk * H, 0.0));
  CK(o->scatter_add_rows(o, dt, w.G, b->iota, s.wsorted, Tk, H, w.gF));
  /* the mirror images: dispatch carries output gradients to the experts, combine brings input
   * gradients home */
  moe_xfer xf = xfer_make(m->host);
  ST_CHECK(xfer_start(&xf, m, b, w.gF, s.eid, w.grecv, w.recv_eid, w.gxs, err));
  if (xf.n_recv != NR)
    return st_error_set(err, ST_ERR_INTERNAL, m->units[unit].name, "backward dispatch received %lld rows, forward %lld",
                        (long long)xf.n_recv, (long long)NR);
  for (int blk = 0; blk < xf.n_blocks; blk++) {
    int64_t f = 0, nb = 0;
    ST_CHECK(xfer_wait(&xf, blk, &f, &nb, err));
    for (int64_t i = f, j; i < f + nb; i = j) { /* an expert without rows: its gradient stays as it was */
      j = run_end(r, i, f + nb);
      int64_t e = r->reid[i] - b->first_local;
      CK(mm(m, false, true, j - i, I, H, 1.0, at(m, w.grecv, i * H), H, expert_slice(m, b, &P[P_DOWN], e), H, 0.0,
            at(m, w.gu, i * I), I));
      if (G[P_DOWN].data)
        CK(mm(m, true, false, I, H, j - i, 1.0, at(m, s.u, i * I), I, at(m, w.grecv, i * H), H, 1.0,
              expert_slice(m, b, &G[P_DOWN], e), H));
    }
    if (nb) CK(o->swiglu_backward(o, dt, at(m, s.hgu, f * 2 * I), at(m, w.gu, f * I), at(m, w.gab, f * 2 * I), nb, I));
    for (int64_t i = f, j; i < f + nb; i = j) {
      j = run_end(r, i, f + nb);
      int64_t e = r->reid[i] - b->first_local;
      if (G[P_GU].data)
        CK(mm(m, true, false, H, 2 * I, j - i, 1.0, at(m, s.xr, i * H), H, at(m, w.gab, i * 2 * I), 2 * I, 1.0,
              expert_slice(m, b, &G[P_GU], e), 2 * I));
      CK(mm(m, false, true, j - i, H, 2 * I, 1.0, at(m, w.gab, i * 2 * I), 2 * I, expert_slice(m, b, &P[P_GU], e),
            2 * I, 0.0, at(m, w.gxr, i * H), H));
    }
    ST_CHECK(xfer_return(&xf, blk, w.gxr, err));
  }
  ST_CHECK(moe->combine(moe->self, dt, w.gxr, H, w.gxs, err));
  CK(o->fill(o, dt, w.dxn2, T * H, 0.0));
  CK(o->scatter_add_rows(o, dt, w.gxs, s.tok, NULL, Tk, H, w.dxn2));

  /* router: main loss through the renormalised weights (softmax over the selected logits) */
  CK(o->fill(o, dt, w.gw, Tk, 0.0));
  CK(o->scatter_add_rows(o, dt, w.gws, s.perm, NULL, Tk, 1, w.gw));
  CK(o->softmax_backward(o, dt, s.wsel, w.gw, w.dzsel, T, k));
  CK(o->fill(o, dt, w.gz, T * E, 0.0));
  CK(o->scatter_add_rows(o, dt, w.dzsel, s.sel, NULL, Tk, 1, w.gz));
  /* aux loss: d(coef E sum_e f_e P_e)/dp[t, e] = coef E C_e / rows^2 for non-padding rows, with C_e
   * and rows pooled over every layer and over the global micro-batch (f is not differentiated); the
   * term enters the step's loss with the weight of the global micro-batch's loss items */
  double rows = b->aux_rows;
  if (a->aux_coef > 0 && rows > 0) {
    void *hc = malloc((size_t)E * es);
    if (!hc) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, m->units[unit].name, "aux gradient");
    for (int64_t e = 0; e < E; e++)
      store_elem(dt, hc, e, b->grad_scale * b->aux_items * a->aux_coef * (double)E * b->aux_count[e] / (rows * rows));
    st_result rr = to_dev(m, w.cvec, hc, (size_t)E * es);
    free(hc);
    CK(rr);
    CK(mm(m, false, false, T, E, 1, 1.0, b->tokmask, 1, w.cvec, E, 0.0, w.gp, E));
    CK(o->softmax_backward(o, dt, s.p, w.gp, w.gz2, T, E));
    CK(o->axpy(o, dt, T * E, 1.0, w.gz2, w.gz));
  }
  CK(lin_bwd(m, s.xn2, P[P_GATE].data, w.gz, w.dxn2, 1.0, G[P_GATE].data, T, E, H));
  CK(o->rmsnorm_backward(o, dt, w.dxn2, s.h1, P[P_POST_NORM].data, s.rstd2, w.dh1, G[P_POST_NORM].data, T, H));
  CK(o->axpy(o, dt, T * H, 1.0, dy, w.dh1));

  /* attention */
  CK(lin_bwd(m, s.o, P[P_O].data, w.dh1, w.dO, 0.0, G[P_O].data, T, H, m->Q));
  CK(lora_bwd(m, P, G, 3, s.o, w.dh1, w.dO, T, H, m->Q, w.lt1, w.lt2));
  st_attn_desc ad = attn_desc(m, b, &s);
  CK(o->attention_backward(o, &ad, w.dO, w.dq, w.dk, w.dv));
  CK(o->rope_apply(o, dt, ST_ROPE_HALF, w.dq, b->cosv, b->sinv, b->S * half, b->B, b->S, nh, d, true));
  CK(o->rope_apply(o, dt, ST_ROPE_HALF, w.dk, b->cosv, b->sinv, b->S * half, b->B, b->S, nkv, d, true));
  CK(o->rmsnorm_backward(o, dt, w.dq, s.qraw, P[P_QN].data, s.rq, w.dqraw, G[P_QN].data, T * nh, d));
  CK(o->rmsnorm_backward(o, dt, w.dk, s.kraw, P[P_KN].data, s.rk, w.dkraw, G[P_KN].data, T * nkv, d));
  CK(lin_bwd(m, s.xn1, P[P_Q].data, w.dqraw, w.dxn1, 0.0, G[P_Q].data, T, m->Q, H));
  CK(lin_bwd(m, s.xn1, P[P_K].data, w.dkraw, w.dxn1, 1.0, G[P_K].data, T, m->KV, H));
  CK(lin_bwd(m, s.xn1, P[P_V].data, w.dv, w.dxn1, 1.0, G[P_V].data, T, m->KV, H));
  CK(lora_bwd(m, P, G, 0, s.xn1, w.dqraw, w.dxn1, T, m->Q, H, w.lt1, w.lt2));
  CK(lora_bwd(m, P, G, 1, s.xn1, w.dkraw, w.dxn1, T, m->KV, H, w.lt1, w.lt2));
  CK(lora_bwd(m, P, G, 2, s.xn1, w.dv, w.dxn1, T, m->KV, H, w.lt1, w.lt2));
  if (din) {
    CK(o->rmsnorm_backward(o, dt, w.dxn1, x, P[P_IN_NORM].data, s.rstd1, din[0].data, G[P_IN_NORM].data, T, H));
    CK(o->axpy(o, dt, T * H, 1.0, w.dh1, din[0].data));
  } else if (G[P_IN_NORM].data) {
    CK(o->rmsnorm_backward(o, dt, w.dxn1, x, P[P_IN_NORM].data, s.rstd1, w.dxn2, G[P_IN_NORM].data, T, H));
  }
  return ST_OK;
}

/* ---- vision tower ---------------------------------------------------------------------------- */

#define QM_LN_EPS 1e-6 /* every LayerNorm of the vision tower */

/* y [T, out] = x W^T + bias */
static st_result linb(const qm_model *m, const void *x, const void *W, const void *bias, void *y, int64_t T,
                      int64_t out, int64_t in) {
  if (T == 0) return ST_OK;
  const st_ops *o = m->host->ops;
  st_gemm_desc g = {.dtype = m->s.dt, .c_dtype = m->s.dt, .trans_b = true, .m = T, .n = out, .k = in, .alpha = 1.0,
                    .beta = 0.0, .a = x, .lda = in, .b = W, .ldb = in, .c = y, .ldc = out, .batch = 1, .bias = bias};
  return o->gemm(o, &g);
}

static st_result linb_bwd(const qm_model *m, const void *x, const void *W, const void *dy, void *dx, double dx_beta,
                          void *dW, void *db, int64_t T, int64_t out, int64_t in) {
  if (T == 0) return ST_OK;
  const st_ops *o = m->host->ops;
  ST_CHECK(lin_bwd(m, x, W, dy, dx, dx_beta, dW, T, out, in));
  if (db) ST_CHECK(o->bias_backward(o, m->s.dt, dy, T, out, db));
  return ST_OK;
}

/* LayerNorm with weight and bias = the parameter-free op, then modulate with scale = w - 1 */
static st_result ln_fwd(const qm_model *m, const void *x, const void *w, const void *bias, void *hat, void *y,
                        void *mean, void *rstd, int64_t rows, int64_t D, void *sc) {
  if (rows == 0) return ST_OK;
  const st_ops *o = m->host->ops;
  st_dtype dt = m->s.dt;
  ST_CHECK(o->layernorm_forward(o, dt, x, hat, mean, rstd, rows, D, QM_LN_EPS));
  ST_CHECK(o->fill(o, dt, sc, D, -1.0));
  ST_CHECK(o->axpy(o, dt, D, 1.0, w, sc));
  return o->modulate_forward(o, dt, hat, bias, sc, D, y, 1, rows, D);
}

/* dx written; dw, db accumulated (frozen: NULL, dw's sum then lands in dummy [D]) */
static st_result ln_bwd(const qm_model *m, const void *dy, const void *x, const void *hat, const void *w,
                        const void *mean, const void *rstd, void *dx, void *dw, void *db, int64_t rows, int64_t D,
                        void *sc, void *dhat, void *dummy) {
  if (rows == 0) return ST_OK;
  const st_ops *o = m->host->ops;
  st_dtype dt = m->s.dt;
  ST_CHECK(o->fill(o, dt, sc, D, -1.0));
  ST_CHECK(o->axpy(o, dt, D, 1.0, w, sc));
  ST_CHECK(o->modulate_backward(o, dt, dy, hat, sc, D, dhat, db, dw ? dw : dummy, 1, rows, D));
  return o->layernorm_backward(o, dt, dhat, x, mean, rstd, dx, rows, D);
}

/* a patch merger over params P[0..5] (norm w, b, fc1 w, b, fc2 w, b): x [Np, Hv] -> out [Nm, H];
 * post: LayerNorm over the 4 merged patches (deepstack) instead of per patch (main merger) */
static st_result merger_fwd(const qm_model *m, const qm_batch *b, const st_tensor *P, bool post, const void *x,
                            void *out, const mg_saved *s, void *sc) {
  const st_ops *o = m->host->ops;
  int64_t Hv = m->s.v.hidden, M4 = Hv * m->s.v.merge * m->s.v.merge, Nm = b->Nm;
  int64_t rows = post ? Nm : b->Np, D = post ? M4 : Hv;
  if (Nm == 0) return ST_OK;
  ST_CHECK(ln_fwd(m, x, P[MG_NW].data, P[MG_NB].data, s->hat, s->xa, s->mean, s->rstd, rows, D, sc));
  ST_CHECK(linb(m, s->xa, P[MG_F1W].data, P[MG_F1B].data, s->f1, Nm, M4, M4));
  ST_CHECK(o->gelu_forward(o, m->s.dt, ST_GELU_ERF, s->f1, s->g1, Nm * M4)); /* nn.GELU(): exact */
  return linb(m, s->g1, P[MG_F2W].data, P[MG_F2B].data, out, Nm, m->s.a.hidden, M4);
}

static st_result merger_bwd(const qm_model *m, const qm_batch *b, const st_tensor *P, st_tensor *G, bool post,
                            const void *x, const void *dout, void *dx, const mg_saved *s, const vb_ws *w) {
  const st_ops *o = m->host->ops;
  int64_t Hv = m->s.v.hidden, M4 = Hv * m->s.v.merge * m->s.v.merge, Nm = b->Nm, H = m->s.a.hidden;
  int64_t rows = post ? Nm : b->Np, D = post ? M4 : Hv;
  if (Nm == 0) return ST_OK;
  ST_CHECK(linb_bwd(m, s->g1, P[MG_F2W].data, dout, w->mdg1, 0.0, G[MG_F2W].data, G[MG_F2B].data, Nm, H, M4));
  ST_CHECK(o->gelu_backward(o, m->s.dt, ST_GELU_ERF, s->f1, w->mdg1, w->mdf1, Nm * M4));
  ST_CHECK(linb_bwd(m, s->xa, P[MG_F1W].data, w->mdf1, w->mdxa, 0.0, G[MG_F1W].data, G[MG_F1B].data, Nm, M4, M4));
  return ln_bwd(m, w->mdxa, x, s->hat, P[MG_NW].data, s->mean, s->rstd, dx, G[MG_NW].data, G[MG_NB].data, rows, D,
                w->sc, w->dhat, w->dummy);
}

/* patches [Np, C*T*P*P] -> Conv3d as a linear, + the learned grid resampled bilinearly */
static st_result patch_embed_forward(qm_model *m, qm_batch *b, const st_tensor *P, st_tensor *cout, void *work,
                                     st_error *err) {
  const int unit = m->u_pe;
  const st_ops *o = m->host->ops;
  st_dtype dt = m->s.dt;
  int64_t Np = b->Np, Hv = m->s.v.hidden;
  CK(linb(m, b->pix, P[PE_W].data, P[PE_B].data, cout[0].data, Np, Hv, m->pdim));
  for (int q = 0; q < 4 && Np; q++) {
    CK(o->gather_rows(o, dt, P[PE_POS].data, b->ptap + q * Np, Np, Hv, work));
    CK(o->scatter_add_rows(o, dt, work, b->iota, at(m, b->pwt, q * Np), Np, Hv, cout[0].data));
  }
  if (carries_ds(m, unit + 1)) CK(o->fill(o, dt, cout[1].data, st_tensor_numel(&cout[1]), 0.0));
  return ST_OK;
}

static st_result patch_embed_backward(qm_model *m, qm_batch *b, st_tensor *G, const st_tensor *dout, st_error *err) {
  const int unit = m->u_pe;
  const st_ops *o = m->host->ops;
  int64_t Np = b->Np, Hv = m->s.v.hidden;
  CK(linb_bwd(m, b->pix, NULL, dout[0].data, NULL, 0.0, G[PE_W].data, G[PE_B].data, Np, Hv, m->pdim));
  for (int q = 0; q < 4 && Np && G[PE_POS].data; q++)
    CK(o->scatter_add_rows(o, m->s.dt, dout[0].data, b->ptap + q * Np, at(m, b->pwt, q * Np), Np, Hv,
                           G[PE_POS].data));
  return ST_OK;
}

static st_attn_desc vattn_desc(const qm_model *m, const qm_batch *b, const vb_saved *s) {
  const qm_vision *v = &m->s.v;
  return (st_attn_desc){.dtype = m->s.dt, .batch = 1, .seq_q = b->Np, .seq_k = b->Np, .heads = v->heads,
                        .kv_heads = v->heads, .head_dim = m->vhd, .scale = 1.0 / sqrt((double)m->vhd),
                        .causal = false, .segment_ids = b->vseg, .q = s->q, .k = s->k, .v = s->v, .out = s->o,
                        .lse = s->lse};
}

/* one ViT block (LayerNorm, fused qkv with bias, 2-D rotary, attention inside each frame, GELU-tanh
 * MLP), then its deepstack merger when it feeds one */
static st_result vblock_forward(qm_model *m, qm_batch *b, int unit, const st_tensor *P, const st_tensor *cin,
                                st_tensor *cout, void *saved, void *work, st_error *err) {
  const st_ops *o = m->host->ops;
  const qm_vision *v = &m->s.v;
  st_dtype dt = m->s.dt;
  int blk = unit - 1, j = m->ds_of_block[blk];
  int64_t Np = b->Np, Hv = v->hidden, Vi = v->inter;
  bump sb = {saved ? saved : work, 0};
  vb_saved s;
  vblock_saved_layout(m, b, blk, &sb, &s);
  bump wb = {saved ? work : (char *)work + sb.off, 0};
  vb_ws w;
  vision_ws_layout(m, b, &wb, &w);
  const void *x = cin[0].data;
  void *y = cout[0].data;
  if (carries_ds(m, unit + 1)) CK(copy_dev(m, cout[1].data, cin[1].data, st_tensor_nbytes(&cout[1])));
  if (Np == 0) return ST_OK;
  CK(ln_fwd(m, x, P[VB_N1W].data, P[VB_N1B].data, s.hat1, s.xa1, s.mean1, s.rstd1, Np, Hv, w.sc));
  /* qkv rows [3][heads][hd]: q, k and v are contiguous row blocks of the fused weight */
  void *qkv[3] = {s.q, s.k, s.v};
  for (int c = 0; c < 3; c++)
    CK(linb(m, s.xa1, at(m, P[VB_QKVW].data, c * Hv * Hv), at(m, P[VB_QKVB].data, c * Hv), qkv[c], Np, Hv, Hv));
  CK(o->rope_apply(o, dt, ST_ROPE_HALF, s.q, b->vcos, b->vsin, 0, 1, Np, v->heads, m->vhd, false));
  CK(o->rope_apply(o, dt, ST_ROPE_HALF, s.k, b->vcos, b->vsin, 0, 1, Np, v->heads, m->vhd, false));
  st_attn_desc ad = vattn_desc(m, b, &s);
  CK(o->attention_forward(o, &ad));
  CK(linb(m, s.o, P[VB_PROJW].data, P[VB_PROJB].data, s.h1, Np, Hv, Hv));
  CK(o->add(o, dt, s.h1, x, s.h1, Np * Hv));
  CK(ln_fwd(m, s.h1, P[VB_N2W].data, P[VB_N2B].data, s.hat2, s.xa2, s.mean2, s.rstd2, Np, Hv, w.sc));
  CK(linb(m, s.xa2, P[VB_FC1W].data, P[VB_FC1B].data, s.f1, Np, Vi, Hv));
  CK(o->gelu_forward(o, dt, ST_GELU_TANH, s.f1, s.g1, Np * Vi)); /* gelu_pytorch_tanh */
  CK(linb(m, s.g1, P[VB_FC2W].data, P[VB_FC2B].data, y, Np, Hv, Vi));
  CK(o->add(o, dt, y, s.h1, y, Np * Hv));
  if (j >= 0) {
    CK(copy_dev(m, s.y, y, (size_t)(Np * Hv) * st_dtype_size(dt)));
    CK(merger_fwd(m, b, P + VB_DS, true, s.y, at(m, cout[1].data, j * b->Nm * m->s.a.hidden), &s.ds, w.sc));
  }
  return ST_OK;
}

static st_result vblock_backward(qm_model *m, qm_batch *b, int unit, const st_tensor *P, st_tensor *G,
                                 const st_tensor *cin, const void *saved, const st_tensor *dout, st_tensor *din,
                                 void *work, st_error *err) {
  const st_ops *o = m->host->ops;
  const qm_vision *v = &m->s.v;
  st_dtype dt = m->s.dt;
  int blk = unit - 1, j = m->ds_of_block[blk];
  int64_t Np = b->Np, Hv = v->hidden, Vi = v->inter, H = m->s.a.hidden;
  bump sb = {(void *)(uintptr_t)saved, 0};
  vb_saved s;
  vblock_saved_layout(m, b, blk, &sb, &s);
  bump wb = {work, 0};
  vb_ws w;
  vision_ws_layout(m, b, &wb, &w);
  const void *x = cin[0].data;
  if (carries_ds(m, unit)) { /* slice j is written by this block: nothing before it sees its gradient */
    if (carries_ds(m, unit + 1)) CK(copy_dev(m, din[1].data, dout[1].data, st_tensor_nbytes(&din[1])));
    else CK(o->fill(o, dt, din[1].data, st_tensor_numel(&din[1]), 0.0));
    if (j >= 0) CK(o->fill(o, dt, at(m, din[1].data, j * b->Nm * H), b->Nm * H, 0.0));
  }
  if (Np == 0) return ST_OK;
  CK(copy_dev(m, w.dtot, dout[0].data, (size_t)(Np * Hv) * st_dtype_size(dt)));
  if (j >= 0) {
    CK(merger_bwd(m, b, P + VB_DS, G + VB_DS, true, s.y, at(m, dout[1].data, j * b->Nm * H), w.dsx, &s.ds, &w));
    CK(o->axpy(o, dt, Np * Hv, 1.0, w.dsx, w.dtot));
  }
  CK(linb_bwd(m, s.g1, P[VB_FC2W].data, w.dtot, w.dg1, 0.0, G[VB_FC2W].data, G[VB_FC2B].data, Np, Hv, Vi));
  CK(o->gelu_backward(o, dt, ST_GELU_TANH, s.f1, w.dg1, w.df1, Np * Vi));
  CK(linb_bwd(m, s.xa2, P[VB_FC1W].data, w.df1, w.dxa, 0.0, G[VB_FC1W].data, G[VB_FC1B].data, Np, Vi, Hv));
  CK(ln_bwd(m, w.dxa, s.h1, s.hat2, P[VB_N2W].data, s.mean2, s.rstd2, w.dh1, G[VB_N2W].data, G[VB_N2B].data, Np, Hv,
            w.sc, w.dhat, w.dummy));
  CK(o->axpy(o, dt, Np * Hv, 1.0, w.dtot, w.dh1));
  CK(linb_bwd(m, s.o, P[VB_PROJW].data, w.dh1, w.dO, 0.0, G[VB_PROJW].data, G[VB_PROJB].data, Np, Hv, Hv));
  st_attn_desc ad = vattn_desc(m, b, &s);
  CK(o->attention_backward(o, &ad, w.dO, w.dq, w.dk, w.dv));
  CK(o->rope_apply(o, dt, ST_ROPE_HALF, w.dq, b->vcos, b->vsin, 0, 1, Np, v->heads, m->vhd, true));
  CK(o->rope_apply(o, dt, ST_ROPE_HALF, w.dk, b->vcos, b->vsin, 0, 1, Np, v->heads, m->vhd, true));
  void *dqkv[3] = {w.dq, w.dk, w.dv};
  for (int c = 0; c < 3; c++)
    CK(linb_bwd(m, s.xa1, at(m, P[VB_QKVW].data, c * Hv * Hv), dqkv[c], w.dxa, c ? 1.0 : 0.0,
                G[VB_QKVW].data ? at(m, G[VB_QKVW].data, c * Hv * Hv) : NULL,
                G[VB_QKVB].data ? at(m, G[VB_QKVB].data, c * Hv) : NULL, Np, Hv, Hv));
  CK(ln_bwd(m, w.dxa, x, s.hat1, P[VB_N1W].data, s.mean1, s.rstd1, din[0].data, G[VB_N1W].data, G[VB_N1B].data, Np,
            Hv, w.sc, w.dhat, w.dummy));
  CK(o->axpy(o, dt, Np * Hv, 1.0, w.dh1, din[0].data));
  return ST_OK;
}

static st_result vmerger_forward(qm_model *m, qm_batch *b, int unit, const st_tensor *P, const st_tensor *cin,
                                 st_tensor *cout, void *saved, void *work, st_error *err) {
  bump sb = {saved ? saved : work, 0};
  mg_saved s;
  merger_saved_layout(m, b, &sb, &s);
  bump wb = {saved ? work : (char *)work + sb.off, 0};
  vb_ws w;
  vision_ws_layout(m, b, &wb, &w);
  CK(merger_fwd(m, b, P, false, cin[0].data, cout[0].data, &s, w.sc));
  if (carries_ds(m, unit + 1)) CK(copy_dev(m, cout[1].data, cin[1].data, st_tensor_nbytes(&cout[1])));
  return ST_OK;
}

static st_result vmerger_backward(qm_model *m, qm_batch *b, int unit, const st_tensor *P, st_tensor *G,
                                  const st_tensor *cin, const void *saved, const st_tensor *dout, st_tensor *din,
                                  void *work, st_error *err) {
  bump sb = {(void *)(uintptr_t)saved, 0};
  mg_saved s;
  merger_saved_layout(m, b, &sb, &s);
  bump wb = {work, 0};
  vb_ws w;
  vision_ws_layout(m, b, &wb, &w);
  CK(merger_bwd(m, b, P, G, false, cin[0].data, dout[0].data, din[0].data, &s, &w));
  if (carries_ds(m, unit)) CK(copy_dev(m, din[1].data, dout[1].data, st_tensor_nbytes(&din[1])));
  return ST_OK;
}

/* ---- final ---------------------------------------------------------------------------------- */

static st_result final_forward(qm_model *m, qm_batch *b, int unit, const st_tensor *P, const st_tensor *cin,
                               st_tensor *cout, void *saved, void *work, st_error *err) {
  const st_ops *o = m->host->ops;
  int64_t H = m->s.a.hidden;
  bump sb = {saved ? saved : work, 0};
  fin_saved s;
  final_saved_layout(m, b, &sb, &s);
  CK(o->rmsnorm_forward(o, m->s.dt, cin[0].data, P[F_NORM].data, s.xf, s.rstd, b->T, H, m->s.a.rms_eps));
  CK(lin(m, s.xf, P[F_LM].data, cout[0].data, b->T, m->s.a.vocab, H));
  return ST_OK;
}

static st_result final_backward(qm_model *m, qm_batch *b, int unit, const st_tensor *P, st_tensor *G,
                                const st_tensor *cin, const void *saved, const st_tensor *dout, st_tensor *din,
                                void *work, st_error *err) {
  const st_ops *o = m->host->ops;
  int64_t H = m->s.a.hidden;
  bump sb = {(void *)(uintptr_t)saved, 0};
  fin_saved s;
  final_saved_layout(m, b, &sb, &s);
  CK(lin_bwd(m, s.xf, P[F_LM].data, dout[0].data, work, 0.0, G[F_LM].data, b->T, m->s.a.vocab, H));
  CK(o->rmsnorm_backward(o, m->s.dt, work, cin[0].data, P[F_NORM].data, s.rstd, din[0].data, G[F_NORM].data, b->T, H));
  return ST_OK;
}

static st_result qm_unit_forward(void *ctx, void *vb, int unit, const st_tensor *params, const st_tensor *cin,
                                 st_tensor *cout, void *saved, void *work, st_error *err) {
  qm_model *m = ctx;
  if (unit < 0 || unit >= m->n_units)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "model.qwen3_vl_moe", "unit %d out of range", unit);
  if (unit == m->u_pe) return patch_embed_forward(m, vb, params, cout, work, err);
  if (unit == m->u_merger) return vmerger_forward(m, vb, unit, params, cin, cout, saved, work, err);
  if (unit < m->u_embed) return vblock_forward(m, vb, unit, params, cin, cout, saved, work, err);
  if (unit == m->u_embed) return embed_forward(m, vb, params, cin, cout, work, err);
  if (unit == m->u_final) return final_forward(m, vb, unit, params, cin, cout, saved, work, err);
  return layer_forward(m, vb, unit, params, cin, cout, saved, work, err);
}

static st_result qm_unit_backward(void *ctx, void *vb, int unit, const st_tensor *params, st_tensor *grads,
                                  const st_tensor *cin, const void *saved, const st_tensor *dout, st_tensor *din,
                                  void *work, st_error *err) {
  qm_model *m = ctx;
  if (unit < 0 || unit >= m->n_units)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "model.qwen3_vl_moe", "unit %d out of range", unit);
  if (unit == m->u_pe) return patch_embed_backward(m, vb, grads, dout, err);
  if (unit == m->u_embed) return embed_backward(m, vb, grads, dout, din, err);
  if (!saved)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, m->units[unit].name, "backward needs the unit's saved buffer");
  if (unit == m->u_merger) return vmerger_backward(m, vb, unit, params, grads, cin, saved, dout, din, work, err);
  if (unit < m->u_embed) return vblock_backward(m, vb, unit, params, grads, cin, saved, dout, din, work, err);
  if (unit == m->u_final) return final_backward(m, vb, unit, params, grads, cin, saved, dout, din, work, err);
  return layer_backward(m, vb, unit, params, grads, cin, saved, dout, din, work, err);
}

/* ---- loss, metrics, FLOPs ------------------------------------------------------------------- */

/* transformers' ForCausalLMLoss plus router_aux_loss_coef x load_balancing_loss_func (pooled over
 * layers, padding excluded). The reported loss is this micro-batch's mean over its non-ignored
 * shifted labels; the gradient follows the core's convention (model.h): the cross-entropy summed
 * over those labels, and the aux loss weighted by the loss items of the global micro-batch whose
 * router statistics it is computed from. In training the statistics (expert counts, softmax sums,
 * rows, items) are summed over every rank first, so the aux loss and the load metrics are those
 * of the global micro-batch and do not depend on how it is split over ranks; validation keeps
 * each micro-batch's own (its micro-batches are single samples on every rank count). */
static st_result qm_loss(void *ctx, void *vb, const st_tensor *final, double grad_scale, st_tensor *dfinal,
                         st_loss *out, st_error *err) {
  qm_model *m = ctx;
  qm_batch *b = vb;
  const qm_arch *a = &m->s.a;
  const st_host *h = m->host;
  const st_ops *o = h->ops;
  double sum = 0.0;
  int64_t n = 0;
  st_result r = o->cross_entropy_forward(o, m->s.dt, final[0].data, b->labels, b->T, a->vocab, -100, &sum, &n);
  double ce = n ? sum / (double)n : 0.0;
  if (r == ST_OK && dfinal)
    r = o->cross_entropy_backward(o, m->s.dt, final[0].data, b->labels, b->T, a->vocab, -100, grad_scale,
                                  dfinal[0].data);
  if (r != ST_OK) return st_error_set(err, r, "model.qwen3_vl_moe", "loss kernel failed: %s", st_result_string(r));
  int64_t E = a->experts, L = a->layers;
  /* [L*E] per-layer counts, [E] softmax sums pooled over layers, rows, items */
  size_t nstat = (size_t)(L * E + E + 2);
  double *st = calloc(nstat, sizeof *st);
  if (!st) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen3_vl_moe", "router statistics");
  for (int64_t l = 0; l < L; l++)
    for (int64_t e = 0; e < E; e++) st[l * E + e] = b->route[l].count[e], st[L * E + e] += b->route[l].psum[e];
  st[L * E + E] = (double)b->n_valid * (double)L;
  st[L * E + E + 1] = (double)n;
  if (b->training && h->world_size > 1) {
    r = h->comm->all_reduce(h->world, st, st, (int64_t)nstat, ST_F64, ST_REDUCE_SUM, NULL, err);
    if (r != ST_OK) {
      free(st);
      return st_error_prefix(err, "model.qwen3_vl_moe: summing the router statistics over the ranks: ");
    }
  }
  double rows = st[L * E + E], aux = 0.0, cv_sum = 0.0, cv_max = 0.0, empty = 0.0;
  for (int64_t e = 0; e < E; e++) {
    double C = 0;
    for (int64_t l = 0; l < L; l++) C += st[l * E + e];
    b->aux_count[e] = C;
    if (rows > 0) aux += (C / rows) * (st[L * E + e] / rows);
  }
  aux *= (double)E;
  b->aux_rows = rows;
  b->aux_items = st[L * E + E + 1];
  b->grad_scale = grad_scale;
  for (int64_t l = 0; l < L; l++) { /* coefficient of variation of the per-expert token counts */
    const double *c = st + l * E;
    double mean = 0, var = 0;
    for (int64_t e = 0; e < E; e++) mean += c[e] / (double)E;
    for (int64_t e = 0; e < E; e++) {
      double dv = c[e] - mean;
      var += dv * dv / (double)E;
      empty += c[e] == 0.0;
    }
    double cv = mean > 0 ? sqrt(var) / mean : 0.0;
    cv_sum += cv;
    if (cv > cv_max) cv_max = cv;
  }
  free(st);
  *out = (st_loss){.loss = ce + a->aux_coef * aux, .n_items = n, .n_metrics = 5,
                   .metric_names = {"lm/ce_loss", "moe/aux_loss", "moe/load_cv", "moe/load_cv_max",
                                    "moe/empty_experts"},
                   .metric_values = {ce, aux, cv_sum / (double)L, cv_max, empty / (double)L}};
  return ST_OK;
}

/* Per token: 2 x active matmul parameters (q, k, v, o, router, k experts; lm_head) plus causal
 * attention 4 Q S/2 per layer (reference §5). Padding is computed, so it counts. Vision (per patch):
 * patch embedding, the blocks' matmuls, attention 4 Hv x (patches of the frame, taken as the batch
 * average), and per merged token the main and DeepStack mergers. LoRA adds 2 r (in + out) per
 * adapted projection and token. */
static double qm_forward_flops(void *ctx, void *vb) {
  qm_model *m = ctx;
  qm_batch *b = vb;
  const qm_arch *a = &m->s.a;
  double H = (double)a->hidden, Q = (double)m->Q, KV = (double)m->KV, S = (double)b->S;
  double per_layer = 2.0 * (2.0 * H * Q + 2.0 * H * KV + H * (double)a->experts +
                            (double)a->top_k * 3.0 * H * (double)a->moe_inter) + 4.0 * Q * S / 2.0;
  if (m->s.lora)
    for (int q = 0; q < 4; q++)
      if (m->lora_a[q] >= 0) {
        double in = q == 3 ? Q : H, out = q == 0 ? Q : q == 3 ? H : KV;
        per_layer += 2.0 * (double)m->s.rank * (in + out);
      }
  double text = S * ((double)a->layers * per_layer + 2.0 * H * (double)a->vocab), vision = 0.0;
  if (m->s.vision && b->Np) {
    const qm_vision *v = &m->s.v;
    double Hv = (double)v->hidden, Vi = (double)v->inter, M4 = Hv * (double)(v->merge * v->merge);
    double np = (double)b->Np / (double)b->B, nm = (double)b->Nm / (double)b->B, seg = 0.0;
    int64_t frames = 0;
    for (int64_t i = 0; i < b->Np; i++) frames = b->vseg_h ? b->vseg_h[i] + 1 : 1;
    seg = frames ? (double)b->Np / (double)frames : 0.0;
    vision = np * (2.0 * (double)m->pdim * Hv + (double)v->depth * (2.0 * (4.0 * Hv * Hv + 2.0 * Hv * Vi) + 4.0 * Hv * seg)) +
             nm * (double)(1 + v->n_ds) * 2.0 * (M4 * M4 + M4 * H);
  }
  return text + vision;
}

/* routing of the last forward, for tests: layer l's top-k expert ids [B*S*k] */
ST_EXPORT st_result strata_qwen3_vl_moe_routing(void *ctx, void *vb, int layer, int32_t *idx, int64_t n);
ST_EXPORT st_result strata_qwen3_vl_moe_routing(void *ctx, void *vb, int layer, int32_t *idx, int64_t n) {
  qm_model *m = ctx;
  qm_batch *b = vb;
  if (layer < 0 || layer >= m->s.a.layers || n != b->Tk) return ST_ERR_INVALID_ARGUMENT;
  memcpy(idx, b->route[layer].idx, sizeof(int32_t) * (size_t)n);
  return ST_OK;
}

/* ---- synthetic data ------------------------------------------------------------------------- */

/* Learnable on purpose: sample `index` belongs to one of 8 classes; each class is a fixed random
 * cycle of 8 tokens, the sample is that cycle from a random phase, so after one period the next
 * token is predictable from the context. With synth_image the sample starts with one image of
 * (1, 2m, 2m) patches (m = spatial_merge_size, so 4 image tokens) showing the class's fixed random
 * pattern plus noise: only the image tells which cycle the first text tokens follow, so the
 * vision tower has something to learn. The first synth_prompt_len labels and the image tokens are
 * -100; lengths vary with the index so batches pad. Deterministic in (seed, index). */
#define QM_SYNTH_CLASSES 8
#define QM_SYNTH_PERIOD 8
static st_result qm_synth_sample(void *ctx, uint64_t seed, int64_t index, st_tensor_sink *sink, st_error *err) {
  qm_model *m = ctx;
  const st_rng_api *rng = m->host->rng;
  int64_t n = m->s.synth_len - index % 4, cls = index % QM_SYNTH_CLASSES, V = m->s.a.vocab;
  int64_t mg = m->s.v.merge, np = m->s.synth_image ? 4 * mg * mg : 0, nimg = np / (mg * mg);
  int64_t span = m->s.image_token > 2 ? m->s.image_token - 1 : (V > 1 ? V - 1 : 1); /* text ids avoid the image id */
  int64_t *ids = malloc(sizeof(int64_t) * (size_t)n), *lab = malloc(sizeof(int64_t) * (size_t)n);
  float *pix = np ? malloc(sizeof(float) * (size_t)(np * m->pdim)) : NULL;
  float *noise = np ? malloc(sizeof(float) * (size_t)(np * m->pdim)) : NULL;
  st_result r = ST_OK;
  if (!ids || !lab || (np && (!pix || !noise)))
    r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen3_vl_moe", "synthetic sample");
  if (r == ST_OK) {
    int64_t cyc[QM_SYNTH_PERIOD];
    uint64_t cseed = seed ^ 0x73796e7468ull;
    for (int j = 0; j < QM_SYNTH_PERIOD; j++)
      cyc[j] = 1 + (int64_t)(rng->u64(cseed, 100 + (uint64_t)cls, (uint64_t)j) % (uint64_t)span);
    int64_t phase = (int64_t)(rng->u64(seed, 200, (uint64_t)index) % QM_SYNTH_PERIOD);
    for (int64_t t = 0; t < n; t++) {
      bool image = t < nimg;
      ids[t] = image ? m->s.image_token : cyc[(phase + t - nimg) % QM_SYNTH_PERIOD];
      lab[t] = image || t < nimg + m->s.synth_prompt ? -100 : ids[t];
    }
    if (np) {
      rng->normal(cseed, 300 + (uint64_t)cls, 0, np * m->pdim, 0.0, 1.0, ST_F32, pix);
      rng->normal(seed, 400, (uint64_t)(index * np * m->pdim), np * m->pdim, 0.0, 0.1, ST_F32, noise);
      for (int64_t q = 0; q < np * m->pdim; q++) pix[q] += noise[q];
    }
  }
  st_device cpu = {ST_DEVICE_CPU, 0};
  if (r == ST_OK) {
    st_tensor t = st_tensor_make(ids, ST_I64, cpu, 1, (int64_t[]){n});
    r = sink->put(sink, "input_ids", &t, err);
  }
  if (r == ST_OK) {
    st_tensor t = st_tensor_make(lab, ST_I64, cpu, 1, (int64_t[]){n});
    r = sink->put(sink, "labels", &t, err);
  }
  if (r == ST_OK && np) {
    st_tensor t = st_tensor_make(pix, ST_F32, cpu, 2, (int64_t[]){np, m->pdim});
    r = sink->put(sink, "pixel_values", &t, err);
  }
  if (r == ST_OK && np) {
    int64_t grid[3] = {1, 2 * mg, 2 * mg};
    st_tensor t = st_tensor_make(grid, ST_I64, cpu, 2, (int64_t[]){1, 3});
    r = sink->put(sink, "image_grid_thw", &t, err);
  }
  free(ids), free(lab), free(pix), free(noise);
  return r;
}

/* ---- export --------------------------------------------------------------------------------- */

/* "transformers": config.json of Qwen3VLMoeForConditionalGeneration (v5 rope_parameters and the
 * v4.57 rope_scaling / rope_theta both written) and every tensor under its own name, experts in the
 * checkpoint layout [E, H, 2I] / [E, I, H] that from_pretrained transposes on load. Without the
 * vision tower only the language model is written (transformers then initialises model.visual). */
/* "peft": adapter_config.json + adapter_model.safetensors with PEFT's own keys
 * "base_model.model.<module>.lora_{A,B}.weight" and lora_alpha = alpha (PeftModel.from_pretrained on
 * the transformers export applies (alpha/r) B A itself). */
static st_result export_peft(qm_model *m, st_param_source *params, st_tensor_sink *sink, st_error *err) {
  if (!m->s.lora)
    return st_error_set(err, ST_ERR_CONFIG, "model.lora", "--format peft exports LoRA adapters, and this model has "
                        "none (add a model.lora block, or export --format transformers)");
  char cfg[1024];
  int n = snprintf(cfg, sizeof cfg,
                   "{\n  \"peft_type\": \"LORA\",\n  \"task_type\": null,\n  \"r\": %lld,\n  \"lora_alpha\": %.17g,\n"
                   "  \"lora_dropout\": 0.0,\n  \"bias\": \"none\",\n  \"fan_in_fan_out\": false,\n"
                   "  \"init_lora_weights\": %s,\n  \"use_rslora\": false,\n  \"use_dora\": false,\n"
                   "  \"inference_mode\": true,\n  \"base_model_name_or_path\": null,\n  \"target_modules\": [",
                   (long long)m->s.rank, m->s.alpha, m->s.lora_gaussian ? "\"gaussian\"" : "true");
  for (size_t i = 0; i < m->s.n_targets; i++)
    n += snprintf(cfg + n, sizeof cfg - (size_t)n, "%s\"%s\"", i ? ", " : "", m->s.targets[i]);
  n += snprintf(cfg + n, sizeof cfg - (size_t)n, "]\n}\n");
  ST_CHECK(sink->put_file(sink, "adapter_config.json", cfg, (size_t)n, err));
  st_device cpu = {ST_DEVICE_CPU, 0};
  for (int u = 0; u < m->n_units; u++)
    for (int k = 0; k < m->units[u].n_params; k++) {
      const st_param_desc *p = &m->units[u].params[k];
      if (!(p->flags & ST_PARAM_LORA)) continue;
      st_tensor t = st_tensor_make(NULL, ST_F32, cpu, p->ndim, p->shape);
      t.data = malloc(st_tensor_nbytes(&t));
      if (!t.data) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->name, "export buffer");
      char key[600];
      snprintf(key, sizeof key, "base_model.model.%s", p->name);
      st_result r = params->read(params, u, k, ST_F32, t.data, err);
      if (r == ST_OK) r = sink->put(sink, key, &t, err);
      free(t.data);
      if (r != ST_OK) return r;
    }
  return ST_OK;
}

static st_result qm_export_weights(void *ctx, const char *format, bool merge_lora, st_param_source *params,
                                   st_tensor_sink *sink, st_error *err) {
  qm_model *m = ctx;
  if (!strcmp(format, "peft")) return export_peft(m, params, sink, err);
  if (strcmp(format, "transformers"))
    return st_error_set(err, ST_ERR_UNSUPPORTED, "--format", "qwen3_vl_moe exports \"transformers\" or \"peft\" "
                        "(or the core's plain \"safetensors\"), not \"%s\"", format);
  const qm_arch *a = &m->s.a;
  const qm_vision *v = &m->s.v;
  char ds[256] = "";
  for (int64_t j = 0, n = 0; j < v->n_ds; j++)
    n += snprintf(ds + n, sizeof ds - (size_t)n, "%s%lld", j ? ", " : "", (long long)v->ds_idx[j]);
  char rope[512];
  snprintf(rope, sizeof rope, "{\"rope_type\": \"default\", \"rope_theta\": %.17g, \"mrope_section\": [%lld, %lld, "
           "%lld], \"mrope_interleaved\": true}", a->rope_theta, (long long)a->mrope[0], (long long)a->mrope[1],
           (long long)a->mrope[2]);
  char cfg[4096];
  int n = snprintf(cfg, sizeof cfg,
      "{\n  \"architectures\": [\"Qwen3VLMoeForConditionalGeneration\"],\n  \"model_type\": \"qwen3_vl_moe\",\n"
      "  \"image_token_id\": %lld,\n  \"video_token_id\": %lld,\n  \"vision_start_token_id\": %lld,\n"
      "  \"vision_end_token_id\": %lld,\n  \"tie_word_embeddings\": false,\n  \"torch_dtype\": \"float32\",\n"
      "  \"text_config\": {\n    \"model_type\": \"qwen3_vl_moe_text\",\n    \"vocab_size\": %lld,\n"
      "    \"hidden_size\": %lld,\n    \"num_hidden_layers\": %lld,\n    \"num_attention_heads\": %lld,\n"
      "    \"num_key_value_heads\": %lld,\n    \"head_dim\": %lld,\n    \"intermediate_size\": %lld,\n"
      "    \"moe_intermediate_size\": %lld,\n    \"num_experts\": %lld,\n    \"num_experts_per_tok\": %lld,\n"
      "    \"decoder_sparse_step\": 1,\n    \"mlp_only_layers\": [],\n    \"norm_topk_prob\": true,\n"
      "    \"rms_norm_eps\": %.17g,\n    \"router_aux_loss_coef\": %.17g,\n    \"hidden_act\": \"silu\",\n"
      "    \"attention_bias\": false,\n    \"max_position_embeddings\": 262144,\n    \"tie_word_embeddings\": false,\n"
      "    \"rope_theta\": %.17g,\n    \"rope_parameters\": %s,\n    \"rope_scaling\": %s\n  },\n"
      "  \"vision_config\": {\n    \"model_type\": \"qwen3_vl_moe\",\n    \"depth\": %lld,\n    \"hidden_size\": %lld,\n"
      "    \"num_heads\": %lld,\n    \"intermediate_size\": %lld,\n    \"hidden_act\": \"gelu_pytorch_tanh\",\n"
      "    \"in_channels\": %lld,\n    \"patch_size\": %lld,\n    \"temporal_patch_size\": %lld,\n"
      "    \"spatial_merge_size\": %lld,\n    \"out_hidden_size\": %lld,\n    \"num_position_embeddings\": %lld,\n"
      "    \"deepstack_visual_indexes\": [%s]\n  }\n}\n",
      (long long)m->s.image_token, (long long)m->s.video_token, (long long)m->s.vstart_token,
      (long long)m->s.vend_token, (long long)a->vocab, (long long)a->hidden, (long long)a->layers, (long long)a->heads,
      (long long)a->kv_heads, (long long)a->head_dim, (long long)(3 * a->hidden), (long long)a->moe_inter,
      (long long)a->experts, (long long)a->top_k, a->rms_eps, a->aux_coef, a->rope_theta, rope, rope,
      (long long)v->depth, (long long)v->hidden, (long long)v->heads, (long long)v->inter, (long long)v->in_ch,
      (long long)v->patch, (long long)v->tpatch, (long long)v->merge, (long long)a->hidden, (long long)v->npos, ds);
  if (n < 0 || (size_t)n >= sizeof cfg) return st_error_set(err, ST_ERR_INTERNAL, "model.qwen3_vl_moe", "config.json");
  ST_CHECK(sink->put_file(sink, "config.json", cfg, (size_t)n, err));
  st_device cpu = {ST_DEVICE_CPU, 0};
  for (int u = 0; u < m->n_units; u++)
    for (int k = 0; k < m->units[u].n_params; k++) {
      const st_param_desc *p = &m->units[u].params[k];
      if (p->flags & ST_PARAM_LORA) continue;
      st_tensor t = st_tensor_make(NULL, ST_F32, cpu, p->ndim, p->shape);
      t.data = malloc(st_tensor_nbytes(&t) ? st_tensor_nbytes(&t) : 4);
      if (!t.data) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->name, "export buffer");
      st_result r = params->read(params, u, k, ST_F32, t.data, err);
      int q = -1; /* merge_lora: W += (alpha/r) B A for the attention projection this is */
      if (merge_lora && u >= m->u_layer0 && u < m->u_final)
        q = k == P_Q ? 0 : k == P_K ? 1 : k == P_V ? 2 : k == P_O ? 3 : -1;
      if (r == ST_OK && q >= 0 && m->lora_a[q] >= 0) {
        int64_t rk = m->s.rank, out = p->shape[0], in = p->shape[1];
        float *A = malloc(sizeof(float) * (size_t)(rk * in)), *Bm = malloc(sizeof(float) * (size_t)(out * rk));
        if (!A || !Bm) r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->name, "LoRA merge buffers");
        if (r == ST_OK) r = params->read(params, u, m->lora_a[q], ST_F32, A, err);
        if (r == ST_OK) r = params->read(params, u, m->lora_b[q], ST_F32, Bm, err);
        for (int64_t i = 0; r == ST_OK && i < out; i++)
          for (int64_t jj = 0; jj < in; jj++) {
            double acc = 0.0;
            for (int64_t c = 0; c < rk; c++) acc += (double)Bm[i * rk + c] * (double)A[c * in + jj];
            float *W = t.data;
            W[i * in + jj] = (float)((double)W[i * in + jj] + m->lora_scale * acc);
          }
        free(A);
        free(Bm);
      }
      if (r == ST_OK) r = sink->put(sink, p->name, &t, err);
      free(t.data);
      if (r != ST_OK) return r;
    }
  return ST_OK;
}

ST_EXPORT const st_model_plugin_v1 strata_model_plugin_v1 = {
    .header = ST_PLUGIN_HEADER("model", "qwen3_vl_moe", ST_VERSION_STRING, st_model_plugin_v1),
    .validate = qm_validate,
    .init = qm_init,
    .finalize = qm_finalize,
    .describe = qm_describe,
    .init_param = qm_init_param,
    .batch_prepare = qm_batch_prepare,
    .batch_release = qm_batch_release,
    .carry_layout = qm_carry_layout,
    .unit_memory = qm_unit_memory,
    .unit_forward = qm_unit_forward,
    .unit_backward = qm_unit_backward,
    .loss = qm_loss,
    .forward_flops = qm_forward_flops,
    .synth_sample = qm_synth_sample,
    .export_weights = qm_export_weights,
};
