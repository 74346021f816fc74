/* qwen_image.c — the Qwen-Image MMDiT denoiser (diffusers' QwenImageTransformer2DModel) as a strata
 * model plugin: parameter tables in the diffusers state-dict naming, hand-written forward and
 * backward passes over the ops table, DiffSynth-Studio's flow-matching objective, LoRA, exports.
 *
 * Units and what flows between them (B batch, Ni image tokens, Nt padded text tokens, D width):
 *   embed    batch -> x [B,Ni,D] = img_in(packed x_t), c [B,Nt,D] = txt_in(RMSNorm(prompt)),
 *                     e [B,D] = linear_2(silu(linear_1(sinusoid(1000 sigma))))
 *   block.i  (x, c, e) -> (x, c, e); the last block drops the text stream: (x, c, e) -> (x, e)
 *   final    (x, e) -> pred [B,Ni,p*p*out_channels] = proj_out(LN(x)(1+scale)+shift)
 * Batch constants (RoPE tables of the joint [text, image] sequence, key mask, sinusoid, target,
 * loss weights) live in the batch context. Every formula follows the reference notes
 * (shared/reference/qwen_image.md); comments here say why, not what. */
#include <math.h>
#include <stdlib.h>

#include <strata/model.h>

#include "model_util.h"

#define QI_T_DIM 256       /* sinusoidal timestep features (Timesteps(num_channels=256)) */
#define QI_EPS 1e-6        /* every LayerNorm and RMSNorm of the model */
#define QI_MAX_TARGETS 64
#define QI_MAX_LIN 14      /* linears per unit (a block has 14) */
#define QI_GRID 1000       /* DiffSynth's training grid */
#define QI_ROPE_LIMIT 4096 /* diffusers' RoPE tables cover positions |p| < 4096 */

/* ---- configuration -------------------------------------------------------------------------- */

typedef struct qi_arch {
  int64_t layers, heads, head_dim, joint_dim, in_ch, out_ch, patch;
  int64_t axes[3];
} qi_arch;

static const qi_arch preset_qwen_image = {60, 24, 128, 3584, 64, 16, 2, {16, 56, 56}};
static const qi_arch preset_tiny = {2, 2, 16, 24, 16, 4, 2, {4, 6, 6}};

/* DiffSynth's examples/qwen_image/model_training/lora/Qwen-Image.sh target list */
static const char *const default_targets[] = {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                                              "to_out.0", "to_add_out", "img_mlp.net.2", "img_mod.1",
                                              "txt_mlp.net.2", "txt_mod.1"};

typedef struct qi_settings {
  const char *preset;
  qi_arch a;
  st_dtype dt;
  bool lora;
  int64_t rank;
  double alpha;
  const char *targets[QI_MAX_TARGETS];
  size_t n_targets;
  bool lora_gaussian;
  st_gelu_kind gelu;
  bool weighting; /* DiffSynth's Gaussian-bump training weights */
  bool mask_text;
  int64_t synth_h, synth_w, synth_text;
} qi_settings;

static const char *const top_keys[] = {"name", "plugin", "preset", "overrides", "dtype", "weights", "lora", "options",
                                       NULL};
static const char *const override_keys[] = {"num_layers", "num_attention_heads", "attention_head_dim",
                                            "joint_attention_dim", "in_channels", "out_channels", "patch_size",
                                            "axes_dims_rope", NULL};
static const char *const lora_keys[] = {"rank", "alpha", "target_modules", "init", NULL};
static const char *const option_keys[] = {"gelu", "loss_weighting", "mask_text", "synth_grid", "synth_text_len", NULL};

static st_result parse_settings(st_cfg *cfg, const st_cfg_api *api, qi_settings *s, st_error *err) {
  memset(s, 0, sizeof *s);
  ST_CHECK(api->check_keys(cfg, top_keys, err));
  ST_CHECK(api->get_enum(cfg, "preset", (const char *const[]){"qwen-image", "tiny", NULL}, "qwen-image", &s->preset,
                         err));
  s->a = strcmp(s->preset, "tiny") ? preset_qwen_image : preset_tiny;
  st_cfg *ov = NULL;
  ST_CHECK(api->get_object(cfg, "overrides", false, &ov, err));
  if (ov) {
    ST_CHECK(api->check_keys(ov, override_keys, err));
    ST_CHECK(api->get_int(ov, "num_layers", s->a.layers, &s->a.layers, err));
    ST_CHECK(api->get_int(ov, "num_attention_heads", s->a.heads, &s->a.heads, err));
    ST_CHECK(api->get_int(ov, "attention_head_dim", s->a.head_dim, &s->a.head_dim, err));
    ST_CHECK(api->get_int(ov, "joint_attention_dim", s->a.joint_dim, &s->a.joint_dim, err));
    ST_CHECK(api->get_int(ov, "in_channels", s->a.in_ch, &s->a.in_ch, err));
    ST_CHECK(api->get_int(ov, "out_channels", s->a.out_ch, &s->a.out_ch, err));
    ST_CHECK(api->get_int(ov, "patch_size", s->a.patch, &s->a.patch, err));
    if (api->type(ov, "axes_dims_rope") != ST_CFG_ABSENT) {
      size_t n = 0;
      ST_CHECK(api->get_int_list(ov, "axes_dims_rope", s->a.axes, 3, &n, err));
      if (n != 3)
        return st_error_set(err, ST_ERR_CONFIG, "model.overrides.axes_dims_rope",
                            "expected 3 integers (frame, height, width), found %zu", n);
    }
  }
  const qi_arch *a = &s->a;
  const char *where = "model.overrides";
  if (a->layers < 1 || a->layers > 4096)
    return st_error_set(err, ST_ERR_CONFIG, where, "num_layers must be in [1, 4096], got %lld", (long long)a->layers);
  if (a->heads < 1 || a->head_dim < 2 || a->head_dim % 2)
    return st_error_set(err, ST_ERR_CONFIG, where, "need num_attention_heads >= 1 and an even attention_head_dim >= 2");
  if (a->joint_dim < 1 || a->patch < 1 || a->in_ch < 1 || a->out_ch < 1)
    return st_error_set(err, ST_ERR_CONFIG, where, "joint_attention_dim, patch_size, in_channels and out_channels "
                        "must be positive");
  if (a->in_ch % (a->patch * a->patch))
    return st_error_set(err, ST_ERR_CONFIG, where, "in_channels (%lld) must be a multiple of patch_size^2 (%lld): it "
                        "counts packed latent channels", (long long)a->in_ch, (long long)(a->patch * a->patch));
  if (a->axes[0] < 0 || a->axes[1] < 0 || a->axes[2] < 0 || a->axes[0] % 2 || a->axes[1] % 2 || a->axes[2] % 2 ||
      a->axes[0] + a->axes[1] + a->axes[2] != a->head_dim)
    return st_error_set(err, ST_ERR_CONFIG, "model.overrides.axes_dims_rope",
                        "each axis must be even and they must sum to attention_head_dim (%lld); got [%lld, %lld, %lld]",
                        (long long)a->head_dim, (long long)a->axes[0], (long long)a->axes[1], (long long)a->axes[2]);
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
    ST_CHECK(api->get_int(lo, "rank", 32, &s->rank, err));
    if (s->rank < 1) return st_error_set(err, ST_ERR_CONFIG, "model.lora.rank", "must be >= 1, got %lld", (long long)s->rank);
    ST_CHECK(api->get_number(lo, "alpha", (double)s->rank, &s->alpha, err));
    if (api->type(lo, "target_modules") != ST_CFG_ABSENT) {
      ST_CHECK(api->get_string_list(lo, "target_modules", s->targets, QI_MAX_TARGETS, &s->n_targets, err));
      if (s->n_targets == 0)
        return st_error_set(err, ST_ERR_CONFIG, "model.lora.target_modules", "is empty: name at least one linear "
                            "(e.g. \"to_q\") or leave the key out for DiffSynth's default list");
    } else {
      s->n_targets = sizeof default_targets / sizeof default_targets[0];
      for (size_t i = 0; i < s->n_targets; i++) s->targets[i] = default_targets[i];
    }
    const char *init;
    ST_CHECK(api->get_enum(lo, "init", (const char *const[]){"kaiming", "gaussian", NULL}, "kaiming", &init, err));
    s->lora_gaussian = !strcmp(init, "gaussian");
  }
  st_cfg *op = NULL;
  ST_CHECK(api->get_object(cfg, "options", false, &op, err));
  s->gelu = ST_GELU_TANH;
  s->weighting = true;
  s->mask_text = true;
  bool tiny_like = a->heads * a->head_dim < 512;
  s->synth_h = tiny_like ? 3 : 32;
  s->synth_w = tiny_like ? 5 : 32;
  s->synth_text = tiny_like ? 7 : 64;
  if (op) {
    ST_CHECK(api->check_keys(op, option_keys, err));
    const char *g, *lw;
    ST_CHECK(api->get_enum(op, "gelu", (const char *const[]){"tanh", "sigmoid", NULL}, "tanh", &g, err));
    s->gelu = strcmp(g, "sigmoid") ? ST_GELU_TANH : ST_GELU_SIGMOID;
    ST_CHECK(api->get_enum(op, "loss_weighting", (const char *const[]){"diffsynth", "none", NULL}, "diffsynth", &lw, err));
    s->weighting = !strcmp(lw, "diffsynth");
    ST_CHECK(api->get_bool(op, "mask_text", true, &s->mask_text, err));
    if (api->type(op, "synth_grid") != ST_CFG_ABSENT) {
      int64_t g2[2];
      size_t n = 0;
      ST_CHECK(api->get_int_list(op, "synth_grid", g2, 2, &n, err));
      if (n != 2 || g2[0] < 1 || g2[1] < 1)
        return st_error_set(err, ST_ERR_CONFIG, "model.options.synth_grid", "expected [h, w] in patches, both >= 1");
      s->synth_h = g2[0];
      s->synth_w = g2[1];
    }
    ST_CHECK(api->get_int(op, "synth_text_len", s->synth_text, &s->synth_text, err));
    if (s->synth_text < 1)
      return st_error_set(err, ST_ERR_CONFIG, "model.options.synth_text_len", "must be >= 1");
  }
  return ST_OK;
}

/* ---- the model: descriptors ----------------------------------------------------------------- */

typedef enum { K_WEIGHT, K_BIAS, K_GAIN, K_LORA_A, K_LORA_B } qi_kind;

typedef struct qi_lin {
  int w, b, la, lb;   /* parameter indices in the unit window; la/lb -1 without LoRA */
  int64_t out, in;
} qi_lin;

typedef struct qi_unit {
  int n_lin;
  qi_lin lin[QI_MAX_LIN];
  int first_param; /* into m->params */
} qi_unit;

/* block parameter order: the 14 linears (weight, bias), then the 4 q/k gains, then LoRA */
enum { L_IMG_MOD, L_TXT_MOD, L_TO_Q, L_TO_K, L_TO_V, L_ADD_Q, L_ADD_K, L_ADD_V, L_TO_OUT, L_TO_ADD_OUT, L_IMG_FF0,
       L_IMG_FF2, L_TXT_FF0, L_TXT_FF2, L_BLOCK_N };
enum { P_NORM_Q = 28, P_NORM_K, P_NORM_ADDED_Q, P_NORM_ADDED_K, P_BLOCK_BASE };
static const char *const block_lin_names[L_BLOCK_N] = {
    "img_mod.1", "txt_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
    "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
    "txt_mlp.net.0.proj", "txt_mlp.net.2"};
static const char *const block_gain_names[4] = {"attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k"};
/* embed: img_in, txt_norm (gain, index 2), txt_in, timestep linear_1, linear_2 */
enum { E_IMG_IN, E_TXT_IN, E_T1, E_T2, E_N };
#define P_TXT_NORM 2
/* final: norm_out.linear, proj_out */
enum { F_NORM_OUT, F_PROJ_OUT, F_N };

typedef struct qi_model {
  const st_host *host;
  qi_settings s;
  int64_t D, F, P, C; /* width, MLP hidden, proj_out outputs, latent channels */
  double lora_scale;
  int n_units, n_params;
  st_unit_desc *units;
  st_param_desc *params;
  qi_kind *kinds;
  char **names;
  qi_unit *uinfo;
  char **lin_module; /* full module name per (unit, linear), for export */
  st_model_desc desc;
} qi_model;

/* PEFT's rule for a string target: the full module name, or a suffix after a '.' */
static bool module_matches(const char *target, const char *module) {
  size_t ml = strlen(module), tl = strlen(target);
  if (!strcmp(module, target)) return true;
  return ml > tl && module[ml - tl - 1] == '.' && !strcmp(module + ml - tl, target);
}

static bool target_matches(const qi_settings *s, const char *module) {
  for (size_t i = 0; i < s->n_targets; i++)
    if (module_matches(s->targets[i], module)) return true;
  return false;
}

static st_result add_param(qi_model *m, const char *name, qi_kind kind, int ndim, int64_t d0, int64_t d1,
                           uint32_t flags, st_error *err) {
  int i = m->n_params++;
  m->names[i] = strdup(name);
  if (!m->names[i]) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen_image", "parameter names");
  m->params[i] = (st_param_desc){.name = m->names[i], .ndim = ndim, .shape = {d0, d1}, .flags = flags};
  m->kinds[i] = kind;
  return ST_OK;
}

/* one linear of unit u: "<module>.weight" [out, in], "<module>.bias" [out] */
static st_result add_linear(qi_model *m, int u, const char *module, int64_t out, int64_t in, st_error *err) {
  qi_unit *ui = &m->uinfo[u];
  qi_lin *L = &ui->lin[ui->n_lin];
  char name[512];
  uint32_t base_flags = m->s.lora ? 0 : ST_PARAM_TRAINABLE; /* LoRA freezes every base weight */
  L->out = out;
  L->in = in;
  L->la = L->lb = -1;
  L->w = m->n_params - ui->first_param;
  snprintf(name, sizeof name, "%s.weight", module);
  ST_CHECK(add_param(m, name, K_WEIGHT, 2, out, in, base_flags, err));
  L->b = m->n_params - ui->first_param;
  snprintf(name, sizeof name, "%s.bias", module);
  ST_CHECK(add_param(m, name, K_BIAS, 1, out, 0, base_flags, err));
  m->lin_module[u * QI_MAX_LIN + ui->n_lin] = strdup(module);
  if (!m->lin_module[u * QI_MAX_LIN + ui->n_lin])
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen_image", "module names");
  ui->n_lin++;
  return ST_OK;
}

static st_result add_gain(qi_model *m, const char *module, int64_t n, st_error *err) {
  char name[512];
  snprintf(name, sizeof name, "%s.weight", module);
  return add_param(m, name, K_GAIN, 1, n, 0, m->s.lora ? 0 : ST_PARAM_TRAINABLE, err);
}

/* LoRA adapters for every targeted linear of unit u, appended after the unit's base parameters */
static st_result add_lora(qi_model *m, int u, st_error *err) {
  qi_unit *ui = &m->uinfo[u];
  if (!m->s.lora) return ST_OK;
  for (int l = 0; l < ui->n_lin; l++) {
    const char *module = m->lin_module[u * QI_MAX_LIN + l];
    if (!target_matches(&m->s, module)) continue;
    qi_lin *L = &ui->lin[l];
    char name[512];
    L->la = m->n_params - ui->first_param;
    snprintf(name, sizeof name, "%s.lora_A.weight", module);
    ST_CHECK(add_param(m, name, K_LORA_A, 2, m->s.rank, L->in, ST_PARAM_TRAINABLE | ST_PARAM_LORA, err));
    L->lb = m->n_params - ui->first_param;
    snprintf(name, sizeof name, "%s.lora_B.weight", module);
    ST_CHECK(add_param(m, name, K_LORA_B, 2, L->out, m->s.rank, ST_PARAM_TRAINABLE | ST_PARAM_LORA, err));
  }
  return ST_OK;
}

static void qi_finalize(void *ctx) {
  qi_model *m = ctx;
  if (!m) return;
  for (int i = 0; i < m->n_params; i++) free(m->names[i]);
  if (m->lin_module)
    for (int i = 0; i < m->n_units * QI_MAX_LIN; i++) free(m->lin_module[i]);
  if (m->units)
    for (int u = 1; u < m->n_units - 1; u++) free((char *)m->units[u].name);
  free(m->lin_module);
  free(m->names);
  free(m->params);
  free(m->kinds);
  free(m->units);
  free(m->uinfo);
  free(m);
}

static st_result build_descriptors(qi_model *m, st_error *err) {
  const qi_arch *a = &m->s.a;
  int64_t D = m->D;
  int L = (int)a->layers;
  m->n_units = L + 2;
  int max_params = 13 + 2 * 6 + L * (P_BLOCK_BASE + 2 * L_BLOCK_N) + 4 + 2 * 2;
  m->units = calloc((size_t)m->n_units, sizeof *m->units);
  m->uinfo = calloc((size_t)m->n_units, sizeof *m->uinfo);
  m->params = calloc((size_t)max_params, sizeof *m->params);
  m->kinds = calloc((size_t)max_params, sizeof *m->kinds);
  m->names = calloc((size_t)max_params, sizeof *m->names);
  m->lin_module = calloc((size_t)m->n_units * QI_MAX_LIN, sizeof *m->lin_module);
  if (!m->units || !m->uinfo || !m->params || !m->kinds || !m->names || !m->lin_module)
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen_image", "descriptor tables");
  /* embed */
  m->uinfo[0].first_param = 0;
  ST_CHECK(add_linear(m, 0, "img_in", D, a->in_ch, err));
  ST_CHECK(add_gain(m, "txt_norm", a->joint_dim, err));
  ST_CHECK(add_linear(m, 0, "txt_in", D, a->joint_dim, err));
  ST_CHECK(add_linear(m, 0, "time_text_embed.timestep_embedder.linear_1", D, QI_T_DIM, err));
  ST_CHECK(add_linear(m, 0, "time_text_embed.timestep_embedder.linear_2", D, D, err));
  ST_CHECK(add_lora(m, 0, err));
  for (int i = 0; i < L; i++) {
    int u = 1 + i;
    m->uinfo[u].first_param = m->n_params;
    char module[256];
    for (int l = 0; l < L_BLOCK_N; l++) {
      int64_t out = D, in = D;
      if (l == L_IMG_MOD || l == L_TXT_MOD) out = 6 * D;
      if (l == L_IMG_FF0 || l == L_TXT_FF0) out = m->F;
      if (l == L_IMG_FF2 || l == L_TXT_FF2) in = m->F;
      snprintf(module, sizeof module, "transformer_blocks.%d.%s", i, block_lin_names[l]);
      ST_CHECK(add_linear(m, u, module, out, in, err));
    }
    for (int g = 0; g < 4; g++) {
      snprintf(module, sizeof module, "transformer_blocks.%d.%s", i, block_gain_names[g]);
      ST_CHECK(add_gain(m, module, a->head_dim, err));
    }
    ST_CHECK(add_lora(m, u, err));
  }
  int uf = L + 1;
  m->uinfo[uf].first_param = m->n_params;
  ST_CHECK(add_linear(m, uf, "norm_out.linear", 2 * D, D, err));
  ST_CHECK(add_linear(m, uf, "proj_out", m->P, D, err));
  ST_CHECK(add_lora(m, uf, err));
  int64_t total = 0;
  for (int u = 0; u < m->n_units; u++) {
    int end = u + 1 < m->n_units ? m->uinfo[u + 1].first_param : m->n_params;
    m->units[u].params = &m->params[m->uinfo[u].first_param];
    m->units[u].n_params = end - m->uinfo[u].first_param;
    if (u == 0) m->units[u].name = "embed";
    else if (u == m->n_units - 1) m->units[u].name = "final";
    else {
      char nm[32];
      snprintf(nm, sizeof nm, "block.%d", u - 1);
      m->units[u].name = strdup(nm);
      if (!m->units[u].name) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen_image", "unit names");
    }
  }
  for (int i = 0; i < m->n_params; i++)
    total += m->params[i].shape[0] * (m->params[i].ndim == 2 ? m->params[i].shape[1] : 1);
  if (m->s.lora)
    for (size_t t = 0; t < m->s.n_targets; t++) {
      bool hit = false;
      for (int u = 0; u < m->n_units && !hit; u++)
        for (int l = 0; l < m->uinfo[u].n_lin && !hit; l++)
          hit = module_matches(m->s.targets[t], m->lin_module[u * QI_MAX_LIN + l]);
      if (!hit)
        return st_error_set(err, ST_ERR_CONFIG, "model.lora.target_modules",
                            "'%s' matches no linear layer (names are diffusers module names such as to_q, "
                            "attn.to_out.0, img_mlp.net.2, img_mod.1, proj_out)", m->s.targets[t]);
    }
  m->desc = (st_model_desc){.n_units = m->n_units, .units = m->units, .compute_dtype = m->s.dt, .hidden_size = D,
                            .n_params_total = total};
  return ST_OK;
}

static st_result qi_validate(st_cfg *cfg, const st_cfg_api *api, st_error *err) {
  qi_settings s;
  return parse_settings(cfg, api, &s, err);
}

static st_result qi_init(const st_host *host, st_cfg *cfg, void **ctx, st_error *err) {
  qi_model *m = calloc(1, sizeof *m);
  if (!m) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen_image", "model context");
  m->host = host;
  st_result r = parse_settings(cfg, host->cfg, &m->s, err);
  if (r == ST_OK && m->s.dt == ST_BF16 && host->device.type == ST_DEVICE_CPU)
    r = st_error_set(err, ST_ERR_UNSUPPORTED, "model.dtype", "bf16 needs the CUDA ops table; the CPU path runs "
                     "\"fp32\" (or \"fp64\" for finite-difference checks)");
  if (r == ST_OK) {
    const qi_arch *a = &m->s.a;
    m->D = a->heads * a->head_dim;
    m->F = 4 * m->D; /* FeedForward's default mult = 4 */
    m->P = a->patch * a->patch * a->out_ch;
    m->C = a->in_ch / (a->patch * a->patch);
    m->lora_scale = m->s.lora ? m->s.alpha / (double)m->s.rank : 0.0;
    r = build_descriptors(m, err);
  }
  if (r != ST_OK) {
    qi_finalize(m);
    return r;
  }
  *ctx = m;
  return ST_OK;
}

static const st_model_desc *qi_describe(void *ctx) { return &((qi_model *)ctx)->desc; }

/* Linear weights N(0, 0.02), biases 0, RMSNorm gains 1 (diffusers/DiffSynth-like); LoRA A as PEFT's
 * kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)) (or N(0, 1/r) for "gaussian"), B = 0. */
static st_result qi_init_param(void *ctx, uint64_t seed, int unit, int param, int64_t offset, int64_t count,
                               st_dtype dt, void *dst, st_error *err) {
  qi_model *m = ctx;
  if (unit < 0 || unit >= m->n_units || param < 0 || param >= m->units[unit].n_params)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "model.qwen_image", "init_param(%d, %d) out of range", unit, param);
  if (!st_dtype_is_float(dt))
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "model.qwen_image", "init_param needs a float dtype");
  const st_param_desc *p = &m->units[unit].params[param];
  uint64_t stream = 0x7177656eull * 1000003ull + (uint64_t)unit * 4096u + (uint64_t)param;
  switch (m->kinds[m->uinfo[unit].first_param + param]) {
  case K_WEIGHT: m->host->rng->normal(seed, stream, (uint64_t)offset, count, 0.0, 0.02, dt, dst); break;
  case K_BIAS:
  case K_LORA_B: store_const(dt, dst, count, 0.0); break;
  case K_GAIN: store_const(dt, dst, count, 1.0); break;
  case K_LORA_A:
    if (m->s.lora_gaussian) {
      m->host->rng->normal(seed, stream, (uint64_t)offset, count, 0.0, 1.0 / (double)m->s.rank, dt, dst);
    } else {
      double bound = 1.0 / sqrt((double)p->shape[1]);
      m->host->rng->uniform(seed, stream, (uint64_t)offset, count, -bound, bound, dt, dst);
    }
    break;
  }
  return ST_OK;
}

/* ---- batches -------------------------------------------------------------------------------- */

typedef struct qi_batch {
  int64_t B, Ni, Nt, S, h, w;
  void *xin;       /* [B, Ni, in_channels] packed x_t */
  void *prompt;    /* [B, Nt, J], zero rows where padded */
  uint8_t *kmask;  /* [B, S] joint key mask (text first), NULL when not masking */
  void *tproj;     /* [B, 256] sinusoid of 1000 sigma, [cos | sin] */
  void *cosv, *sinv; /* [S, d/2] RoPE angles of the joint sequence */
  void *target;    /* [B, Ni, P] packed eps - x0 */
  void *weight;    /* [B] loss weights, NULL without weighting */
  double *sigma;   /* host [B], noising sigma (for metrics) */
} qi_batch;

/* The DiffSynth "Qwen-Image" training grid (reference §4.2-4.3), computed in double:
 * sigma_i = s u / (1 + (s-1) u), u = 1 - i/1000, s = e^0.8, then the terminal stretch that maps
 * the last point to 0.02; t_i = 1000 sigma_i; weights w_i = 1000 (y_i - min y) / sum (y - min y)
 * with y = exp(-2 ((t - 500)/1000)^2). */
static void training_grid(double *sigma, double *t, double *w) {
  double mu = 0.8, em = exp(mu);
  for (int i = 0; i < QI_GRID; i++) {
    double u = 1.0 - (double)i / QI_GRID;
    sigma[i] = em / (em + (1.0 / u - 1.0));
  }
  double scale = (1.0 - sigma[QI_GRID - 1]) / (1.0 - 0.02);
  double ymin = INFINITY, ysum = 0.0;
  for (int i = 0; i < QI_GRID; i++) {
    sigma[i] = 1.0 - (1.0 - sigma[i]) / scale;
    t[i] = sigma[i] * QI_GRID;
    double z = (t[i] - 500.0) / 1000.0;
    w[i] = exp(-2.0 * z * z);
    if (w[i] < ymin) ymin = w[i];
  }
  for (int i = 0; i < QI_GRID; i++) ysum += w[i] - ymin;
  for (int i = 0; i < QI_GRID; i++) w[i] = (w[i] - ymin) * (1000.0 / ysum);
}

static int nearest_grid(const double *t, double v) { /* argmin |t_i - v|, first on ties (torch.argmin) */
  int best = 0;
  for (int i = 1; i < QI_GRID; i++)
    if (fabs(t[i] - v) < fabs(t[best] - v)) best = i;
  return best;
}

/* latents may come as [C, H, W], [1, C, H, W] or [1, C, 1, H, W] (DiffSynth caches the 5-D VAE
 * layout); returns false for anything else */
static bool latent_dims(const st_tensor *t, int64_t *c, int64_t *hh, int64_t *ww) {
  if (t->ndim == 3) { *c = t->shape[0]; *hh = t->shape[1]; *ww = t->shape[2]; return true; }
  if (t->ndim == 4 && t->shape[0] == 1) { *c = t->shape[1]; *hh = t->shape[2]; *ww = t->shape[3]; return true; }
  if (t->ndim == 5 && t->shape[0] == 1 && t->shape[2] == 1) {
    *c = t->shape[1]; *hh = t->shape[3]; *ww = t->shape[4];
    return true;
  }
  return false;
}

static void qi_batch_release(void *ctx, void *vb) {
  qi_model *m = ctx;
  qi_batch *b = vb;
  if (!b) return;
  const st_host *h = m->host;
  void *bufs[] = {b->xin, b->prompt, b->kmask, b->tproj, b->cosv, b->sinv, b->target, b->weight};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) h->free(h, h->device, bufs[i]);
  free(b->sigma);
  free(b);
}

#define QI_STREAM_SIGMA 0x5349474d41ull /* "SIGMA" */
#define QI_STREAM_NOISE 0x4e4f495345ull /* "NOISE" */

/* host staging of one batch, then one copy per buffer to the device */
typedef struct qi_stage {
  void *xin, *prompt, *tproj, *cosv, *sinv, *target, *weight;
  uint8_t *kmask;
} qi_stage;

static st_result check_sample(qi_model *m, const st_sample *s, const st_sample *first, int64_t *nt, st_error *err) {
  const st_tensor *lat = find_tensor(s, "latents"), *pe = find_tensor(s, "prompt_emb");
  int64_t c, hh, ww, c0, h0, w0;
  if (!lat || !pe)
    return st_error_set(err, ST_ERR_FORMAT, s->id, "sample has no '%s' tensor (a Qwen-Image sample holds latents "
                        "[C, H/8, W/8], prompt_emb [Nt, %lld] and optionally prompt_mask [Nt], sigma, noise)",
                        lat ? "prompt_emb" : "latents", (long long)m->s.a.joint_dim);
  if (!st_dtype_is_float(lat->dtype) || !latent_dims(lat, &c, &hh, &ww))
    return st_error_set(err, ST_ERR_FORMAT, s->id, "'latents' must be a float tensor [C, H/8, W/8]");
  int64_t p = m->s.a.patch;
  if (c != m->C || c != m->s.a.out_ch)
    return st_error_set(err, ST_ERR_FORMAT, s->id, "'latents' has %lld channels; this model packs %lld (in_channels "
                        "%lld / patch^2) and predicts out_channels %lld, which must all agree", (long long)c,
                        (long long)m->C, (long long)m->s.a.in_ch, (long long)m->s.a.out_ch);
  if (hh % p || ww % p || hh < p || ww < p)
    return st_error_set(err, ST_ERR_FORMAT, s->id, "latent size %lldx%lld is not a positive multiple of patch_size %lld",
                        (long long)hh, (long long)ww, (long long)p);
  if (s != first) {
    latent_dims(find_tensor(first, "latents"), &c0, &h0, &w0);
    if (h0 != hh || w0 != ww)
      return st_error_set(err, ST_ERR_FORMAT, s->id, "latent size %lldx%lld differs from %lldx%lld of sample %s in the "
                          "same batch (bucket samples by size or use micro batch size 1)", (long long)hh, (long long)ww,
                          (long long)h0, (long long)w0, first->id);
  }
  int64_t rows = pe->ndim == 2 ? pe->shape[0] : pe->ndim == 3 && pe->shape[0] == 1 ? pe->shape[1] : -1;
  int64_t cols = pe->ndim >= 2 ? pe->shape[pe->ndim - 1] : -1;
  if (!st_dtype_is_float(pe->dtype) || rows < 0 || cols != m->s.a.joint_dim)
    return st_error_set(err, ST_ERR_FORMAT, s->id, "'prompt_emb' must be a float tensor [Nt, %lld]",
                        (long long)m->s.a.joint_dim);
  const st_tensor *mk = find_tensor(s, "prompt_mask");
  if (!mk) mk = find_tensor(s, "prompt_emb_mask");
  if (mk && st_tensor_numel(mk) != rows)
    return st_error_set(err, ST_ERR_FORMAT, s->id, "'prompt_mask' has %lld elements, prompt_emb has %lld tokens",
                        (long long)st_tensor_numel(mk), (long long)rows);
  const st_tensor *nz = find_tensor(s, "noise"), *sg = find_tensor(s, "sigma");
  if (nz && (!st_dtype_is_float(nz->dtype) || st_tensor_numel(nz) != st_tensor_numel(lat)))
    return st_error_set(err, ST_ERR_FORMAT, s->id, "'noise' must be a float tensor shaped like 'latents'");
  if (sg && (!st_dtype_is_float(sg->dtype) || st_tensor_numel(sg) != 1))
    return st_error_set(err, ST_ERR_FORMAT, s->id, "'sigma' must be one float");
  *nt = rows;
  return ST_OK;
}

static st_result qi_batch_prepare(void *ctx, const st_batch *batch, void **out, st_error *err) {
  qi_model *m = ctx;
  const st_host *host = m->host;
  const qi_arch *a = &m->s.a;
  st_dtype dt = m->s.dt;
  size_t es = st_dtype_size(dt);
  if (batch->n_samples < 1) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "model.qwen_image", "empty batch");
  int64_t B = batch->n_samples, Nt = 0, c, hh, ww;
  for (int i = 0; i < B; i++) {
    int64_t nt = 0;
    ST_CHECK(check_sample(m, &batch->samples[i], &batch->samples[0], &nt, err));
    if (nt > Nt) Nt = nt;
  }
  latent_dims(find_tensor(&batch->samples[0], "latents"), &c, &hh, &ww);
  int64_t p = a->patch, gh = hh / p, gw = ww / p, Ni = gh * gw, S = Nt + Ni, half = a->head_dim / 2;
  int64_t J = a->joint_dim, Cin = a->in_ch, P = m->P;
  int64_t diag = (gh / 2 > gw / 2 ? gh / 2 : gw / 2); /* text positions start at max(h//2, w//2) */
  if (diag + Nt > QI_ROPE_LIMIT || gh / 2 + 1 > QI_ROPE_LIMIT || gw / 2 + 1 > QI_ROPE_LIMIT)
    return st_error_set(err, ST_ERR_FORMAT, batch->samples[0].id, "RoPE positions exceed diffusers' table (|p| < %d): "
                        "max(h/2, w/2) + text length = %lld", QI_ROPE_LIMIT, (long long)(diag + Nt));
  qi_batch *b = calloc(1, sizeof *b);
  qi_stage st = {0};
  double *grid = malloc(3 * QI_GRID * sizeof *grid), *eps = malloc(sizeof(double) * (size_t)(c * hh * ww));
  if (!b || !grid || !eps) {
    free(b);
    free(grid);
    free(eps);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen_image", "batch");
  }
  *b = (qi_batch){.B = B, .Ni = Ni, .Nt = Nt, .S = S, .h = gh, .w = gw};
  b->sigma = calloc((size_t)B, sizeof *b->sigma);
  size_t sz_x = (size_t)(B * Ni * Cin) * es, sz_p = (size_t)(B * Nt * J) * es, sz_t = (size_t)(B * QI_T_DIM) * es;
  size_t sz_rope = (size_t)(S * half) * es, sz_tg = (size_t)(B * Ni * P) * es, sz_w = (size_t)B * es;
  size_t sz_m = (size_t)(B * S);
  st.xin = calloc(1, sz_x);
  st.prompt = calloc(1, sz_p ? sz_p : 1);
  st.tproj = calloc(1, sz_t);
  st.cosv = calloc(1, sz_rope);
  st.sinv = calloc(1, sz_rope);
  st.target = calloc(1, sz_tg);
  st.weight = calloc(1, sz_w);
  st.kmask = calloc(1, sz_m);
  st_result r = ST_OK;
  if (!b->sigma || !st.xin || !st.prompt || !st.tproj || !st.cosv || !st.sinv || !st.target || !st.weight || !st.kmask)
    r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen_image", "batch staging");
  double *gs = grid, *gt = grid + QI_GRID, *gw8 = grid + 2 * QI_GRID;
  if (r == ST_OK) training_grid(gs, gt, gw8);
  for (int64_t i = 0; i < B && r == ST_OK; i++) {
    const st_sample *s = &batch->samples[i];
    const st_tensor *lat = find_tensor(s, "latents"), *pe = find_tensor(s, "prompt_emb"), *nz = find_tensor(s, "noise");
    const st_tensor *sg = find_tensor(s, "sigma"), *mk = find_tensor(s, "prompt_mask");
    if (!mk) mk = find_tensor(s, "prompt_emb_mask");
    double sigma_noise, sigma_model;
    int idx;
    if (sg) { /* fixtures and validation pin sigma */
      sigma_noise = sigma_model = load_elem(sg, 0);
      idx = nearest_grid(gt, sigma_noise * QI_GRID);
    } else {
      /* DiffSynth: i ~ U{0..999}; t = bf16(t_i) (its pipeline dtype); the noising sigma is the grid
       * entry nearest to that t; the model sees t / 1000. */
      int64_t draw = (int64_t)(host->rng->u64(batch->seed, QI_STREAM_SIGMA, (uint64_t)(batch->first_sample + i)) % QI_GRID);
      double tb = st_bf16_to_f32(st_f32_to_bf16((float)gt[draw]));
      idx = nearest_grid(gt, tb);
      sigma_noise = gs[idx];
      sigma_model = tb / QI_GRID;
    }
    b->sigma[i] = sigma_noise;
    store_elem(dt, st.weight, i, m->s.weighting ? gw8[idx] : 1.0);
    int64_t nlat = c * hh * ww;
    if (nz)
      for (int64_t k = 0; k < nlat; k++) eps[k] = load_elem(nz, k);
    else
      host->rng->normal(batch->seed, QI_STREAM_NOISE, (uint64_t)(batch->first_sample + i) * (uint64_t)nlat, nlat, 0.0, 1.0,
                        ST_F64, eps);
    /* pack: token (r, q) row-major; channel (ch, dy, dx) -> ch p^2 + dy p + dx */
    for (int64_t ch = 0; ch < c; ch++)
      for (int64_t y = 0; y < hh; y++)
        for (int64_t x = 0; x < ww; x++) {
          int64_t src = (ch * hh + y) * ww + x;
          int64_t tok = (y / p) * gw + x / p, chan = ch * p * p + (y % p) * p + x % p;
          double x0 = load_elem(lat, src), e = eps[src];
          store_elem(dt, st.xin, (i * Ni + tok) * Cin + chan, (1.0 - sigma_noise) * x0 + sigma_noise * e);
          store_elem(dt, st.target, (i * Ni + tok) * P + chan, e - x0);
        }
    int64_t nt = pe->ndim == 2 ? pe->shape[0] : pe->shape[1];
    for (int64_t j = 0; j < nt; j++) {
      for (int64_t k = 0; k < J; k++) store_elem(dt, st.prompt, (i * Nt + j) * J + k, load_elem(pe, j * J + k));
      st.kmask[i * S + j] = mk ? load_elem(mk, j) != 0.0 : 1;
    }
    for (int64_t j = 0; j < Ni; j++) st.kmask[i * S + Nt + j] = 1;
    /* Timesteps(256, flip_sin_to_cos, shift 0, scale 1000): [cos(1000 s f_k) | sin(1000 s f_k)] */
    for (int k = 0; k < QI_T_DIM / 2; k++) {
      double f = exp(-log(10000.0) * (double)k / (QI_T_DIM / 2)), arg = QI_GRID * sigma_model * f;
      store_elem(dt, st.tproj, i * QI_T_DIM + k, cos(arg));
      store_elem(dt, st.tproj, i * QI_T_DIM + QI_T_DIM / 2 + k, sin(arg));
    }
  }
  /* RoPE angles (reference §2.4): pairs [frame | height | width], each axis its own ladder
   * 10000^(-2j/d_axis); text row j at (diag + j) on all axes, image token (r, q) at
   * (0, r - ceil(h/2), q - ceil(w/2)). Computed in double, rounded once. */
  for (int64_t row = 0; row < S && r == ST_OK; row++) {
    double pos[3];
    if (row < Nt) {
      pos[0] = pos[1] = pos[2] = (double)(diag + row);
    } else {
      int64_t tok = row - Nt, rr = tok / gw, qq = tok % gw;
      pos[0] = 0.0;
      pos[1] = (double)(rr - (gh - gh / 2));
      pos[2] = (double)(qq - (gw - gw / 2));
    }
    int64_t k = 0;
    for (int ax = 0; ax < 3; ax++)
      for (int64_t j = 0; j < a->axes[ax] / 2; j++, k++) {
        double ang = pos[ax] * pow(10000.0, -2.0 * (double)j / (double)a->axes[ax]);
        store_elem(dt, st.cosv, row * half + k, cos(ang));
        store_elem(dt, st.sinv, row * half + k, sin(ang));
      }
  }
  if (r == ST_OK) {
    const st_ops *o = host->ops;
    st_device dev = host->device, cpu = {ST_DEVICE_CPU, 0};
    struct { void **dst; void *src; size_t n; } copies[] = {
        {&b->xin, st.xin, sz_x},       {&b->prompt, st.prompt, sz_p}, {&b->tproj, st.tproj, sz_t},
        {&b->cosv, st.cosv, sz_rope},  {&b->sinv, st.sinv, sz_rope},  {&b->target, st.target, sz_tg},
        {&b->weight, st.weight, sz_w}, {(void **)&b->kmask, st.kmask, sz_m}};
    for (size_t i = 0; i < sizeof copies / sizeof copies[0] && r == ST_OK; i++) {
      if ((copies[i].dst == &b->weight && !m->s.weighting) || (copies[i].dst == (void **)&b->kmask && !m->s.mask_text))
        continue;
      *copies[i].dst = host->alloc(host, dev, copies[i].n ? copies[i].n : 1, "activations");
      if (!*copies[i].dst) {
        r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen_image", "batch buffers");
      } else if (copies[i].n) {
        r = o->copy(o, *copies[i].dst, dev, copies[i].src, cpu, copies[i].n);
        if (r != ST_OK) st_error_set(err, r, "model.qwen_image", "copying the batch to the device failed");
      }
    }
  }
  free(st.xin), free(st.prompt), free(st.tproj), free(st.cosv), free(st.sinv), free(st.target), free(st.weight);
  free(st.kmask);
  free(grid);
  free(eps);
  if (r != ST_OK) {
    qi_batch_release(m, b);
    return r;
  }
  *out = b;
  return ST_OK;
}

static st_result qi_carry_layout(void *ctx, void *vb, int boundary, st_carry_layout *out, st_error *err) {
  qi_model *m = ctx;
  qi_batch *b = vb;
  (void)err;
  memset(out, 0, sizeof *out);
  st_dtype dt = m->s.dt;
  st_device dev = m->host->device;
  int U = m->n_units;
  if (boundary <= 0) return ST_OK; /* embed reads the batch */
  if (boundary == U) {
    out->n = 1;
    out->names[0] = "pred";
    out->t[0] = st_tensor_make(NULL, dt, dev, 3, (int64_t[]){b->B, b->Ni, m->P});
    return ST_OK;
  }
  bool text = boundary < U - 1; /* the last block drops the text stream */
  int n = 0;
  out->names[n] = "x";
  out->t[n++] = st_tensor_make(NULL, dt, dev, 3, (int64_t[]){b->B, b->Ni, m->D});
  if (text) {
    out->names[n] = "c";
    out->t[n++] = st_tensor_make(NULL, dt, dev, 3, (int64_t[]){b->B, b->Nt, m->D});
  }
  out->names[n] = "e";
  out->t[n++] = st_tensor_make(NULL, dt, dev, 2, (int64_t[]){b->B, m->D});
  out->n = n;
  return ST_OK;
}

/* ---- memory layouts ------------------------------------------------------------------------- */

/* n rows per sample; sample i starts `stride` rows after sample i-1 (joint buffers hold the text
 * rows first, so a stream's rows are a strided slice of them) */
typedef struct rows {
  void *p;
  int64_t n, stride;
} rows;

static rows R(void *p, int64_t n, int64_t stride) { return (rows){p, n, stride}; }

static void *at(const qi_model *m, const void *p, int64_t elems) {
  return p ? (char *)(uintptr_t)p + (size_t)elems * st_dtype_size(m->s.dt) : NULL;
}

typedef struct blk_geo {
  int64_t B, N[2], S, Sq, qoff[2], koff[2];
  bool dead; /* the last block: its text stream only feeds image attention through K and V */
} blk_geo;

static blk_geo block_geo(const qi_model *m, const qi_batch *b, int unit) {
  blk_geo g;
  g.B = b->B;
  g.N[0] = b->Ni;
  g.N[1] = b->Nt;
  g.S = b->S;
  g.dead = unit == m->n_units - 2;
  g.Sq = g.dead ? b->Ni : b->S; /* the last block runs image queries only */
  g.koff[0] = b->Nt;
  g.koff[1] = 0;
  g.qoff[0] = g.dead ? 0 : b->Nt;
  g.qoff[1] = 0;
  return g;
}

typedef struct blk_saved {
  void *se, *mod[2], *mean1[2], *rstd1[2], *ln1[2];
  void *a[2], *x1[2], *mean2[2], *rstd2[2], *ln2[2], *h[2], *mm[2]; /* NULL for the dead text stream */
  void *qraw, *kraw, *q, *k, *v, *o, *rq, *rk, *lse;
} blk_saved;

static void block_saved_layout(const qi_model *m, const blk_geo *g, bump *bp, blk_saved *s) {
  size_t es = st_dtype_size(m->s.dt);
  int64_t B = g->B, D = m->D, F = m->F, H = m->s.a.heads;
  memset(s, 0, sizeof *s);
  s->se = take(bp, (size_t)(B * D) * es);
  for (int st = 0; st < 2; st++) {
    int64_t n = B * g->N[st];
    s->mod[st] = take(bp, (size_t)(B * 6 * D) * es);
    s->mean1[st] = take(bp, (size_t)n * es);
    s->rstd1[st] = take(bp, (size_t)n * es);
    s->ln1[st] = take(bp, (size_t)(n * D) * es);
    if (st == 1 && g->dead) continue;
    s->a[st] = take(bp, (size_t)(n * D) * es);
    s->x1[st] = take(bp, (size_t)(n * D) * es);
    s->mean2[st] = take(bp, (size_t)n * es);
    s->rstd2[st] = take(bp, (size_t)n * es);
    s->ln2[st] = take(bp, (size_t)(n * D) * es);
    s->h[st] = take(bp, (size_t)(n * F) * es);
    s->mm[st] = take(bp, (size_t)(n * D) * es);
  }
  s->qraw = take(bp, (size_t)(B * g->Sq * D) * es);
  s->q = take(bp, (size_t)(B * g->Sq * D) * es);
  s->o = take(bp, (size_t)(B * g->Sq * D) * es);
  s->rq = take(bp, (size_t)(B * g->Sq * H) * es);
  s->lse = take(bp, (size_t)(B * g->Sq * H) * es);
  s->kraw = take(bp, (size_t)(B * g->S * D) * es);
  s->k = take(bp, (size_t)(B * g->S * D) * es);
  s->v = take(bp, (size_t)(B * g->S * D) * es);
  s->rk = take(bp, (size_t)(B * g->S * H) * es);
}

typedef struct blk_fwd_scratch {
  void *u, *g, *lt;
} blk_fwd_scratch;

typedef struct blk_bwd_scratch {
  void *dmod[2], *dse, *dx1[2], *t1, *t2, *t3, *f1, *f2, *dO, *dQ, *dK, *dV, *dqraw, *dkraw, *lt1, *lt2;
} blk_bwd_scratch;

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

static int64_t lora_rank(const qi_model *m) { return m->s.lora ? m->s.rank : 0; }

static void block_fwd_scratch(const qi_model *m, const blk_geo *g, bump *bp, blk_fwd_scratch *w) {
  size_t es = st_dtype_size(m->s.dt);
  int64_t rowsmax = g->B * max64(max64(g->N[0], g->N[1]), 1);
  w->u = take(bp, (size_t)(rowsmax * m->D) * es);
  w->g = take(bp, (size_t)(rowsmax * m->F) * es);
  w->lt = take(bp, (size_t)(rowsmax * lora_rank(m)) * es);
}

static void block_bwd_scratch(const qi_model *m, const blk_geo *g, bump *bp, blk_bwd_scratch *w) {
  size_t es = st_dtype_size(m->s.dt);
  int64_t B = g->B, D = m->D, rowsmax = B * max64(max64(g->N[0], g->N[1]), 1);
  for (int st = 0; st < 2; st++) {
    w->dmod[st] = take(bp, (size_t)(B * 6 * D) * es);
    w->dx1[st] = take(bp, (size_t)(B * g->N[st] * D) * es);
  }
  w->dse = take(bp, (size_t)(B * D) * es);
  w->t1 = take(bp, (size_t)(rowsmax * D) * es);
  w->t2 = take(bp, (size_t)(rowsmax * D) * es);
  w->t3 = take(bp, (size_t)(rowsmax * D) * es);
  w->f1 = take(bp, (size_t)(rowsmax * m->F) * es);
  w->f2 = take(bp, (size_t)(rowsmax * m->F) * es);
  w->dO = take(bp, (size_t)(B * g->Sq * D) * es);
  w->dQ = take(bp, (size_t)(B * g->Sq * D) * es);
  w->dqraw = take(bp, (size_t)(B * g->Sq * D) * es);
  w->dK = take(bp, (size_t)(B * g->S * D) * es);
  w->dV = take(bp, (size_t)(B * g->S * D) * es);
  w->dkraw = take(bp, (size_t)(B * g->S * D) * es);
  w->lt1 = take(bp, (size_t)(rowsmax * lora_rank(m)) * es);
  w->lt2 = take(bp, (size_t)(rowsmax * lora_rank(m)) * es);
}

typedef struct emb_saved {
  void *rn, *rstd, *t1, *ht;
} emb_saved;

static void embed_saved_layout(const qi_model *m, const qi_batch *b, bump *bp, emb_saved *s) {
  size_t es = st_dtype_size(m->s.dt);
  s->rn = take(bp, (size_t)(b->B * b->Nt * m->s.a.joint_dim) * es);
  s->rstd = take(bp, (size_t)(b->B * b->Nt) * es);
  s->t1 = take(bp, (size_t)(b->B * m->D) * es);
  s->ht = take(bp, (size_t)(b->B * m->D) * es);
}

typedef struct fin_saved {
  void *se, *mo, *mean, *rstd, *ln, *y;
} fin_saved;

static void final_saved_layout(const qi_model *m, const qi_batch *b, bump *bp, fin_saved *s) {
  size_t es = st_dtype_size(m->s.dt);
  int64_t n = b->B * b->Ni;
  s->se = take(bp, (size_t)(b->B * m->D) * es);
  s->mo = take(bp, (size_t)(b->B * 2 * m->D) * es);
  s->mean = take(bp, (size_t)n * es);
  s->rstd = take(bp, (size_t)n * es);
  s->ln = take(bp, (size_t)(n * m->D) * es);
  s->y = take(bp, (size_t)(n * m->D) * es);
}

/* scratch of embed and final: [rows, max(J, D)] x 2, [B, 2D] x 2, LoRA temporaries */
static size_t small_scratch(const qi_model *m, const qi_batch *b, void *base, void **p) {
  size_t es = st_dtype_size(m->s.dt);
  int64_t rowsmax = b->B * max64(max64(b->Ni, b->Nt), 1), wide = max64(m->s.a.joint_dim, m->D);
  bump bp = {base, 0};
  p[0] = take(&bp, (size_t)(rowsmax * wide) * es);
  p[1] = take(&bp, (size_t)(rowsmax * wide) * es);
  p[2] = take(&bp, (size_t)(b->B * 2 * m->D) * es);
  p[3] = take(&bp, (size_t)(b->B * 2 * m->D) * es);
  p[4] = take(&bp, (size_t)(rowsmax * lora_rank(m)) * es);
  p[5] = take(&bp, (size_t)(rowsmax * lora_rank(m)) * es);
  return bp.off;
}

static st_result qi_unit_memory(void *ctx, void *vb, int unit, size_t *saved, size_t *work, st_error *err) {
  qi_model *m = ctx;
  qi_batch *b = vb;
  (void)err;
  bump sb = {NULL, 0}, fb = {NULL, 0}, bb = {NULL, 0};
  void *p[6];
  size_t small = small_scratch(m, b, NULL, p);
  if (unit == 0) {
    emb_saved s;
    embed_saved_layout(m, b, &sb, &s);
    fb.off = bb.off = small;
  } else if (unit == m->n_units - 1) {
    fin_saved s;
    final_saved_layout(m, b, &sb, &s);
    fb.off = bb.off = small;
  } else {
    blk_geo g = block_geo(m, b, unit);
    blk_saved s;
    blk_fwd_scratch fw;
    blk_bwd_scratch bw;
    block_saved_layout(m, &g, &sb, &s);
    block_fwd_scratch(m, &g, &fb, &fw);
    block_bwd_scratch(m, &g, &bb, &bw);
  }
  *saved = sb.off;
  /* a forward without a saved buffer (validation) keeps its intermediates in the workspace */
  *work = sb.off + fb.off > bb.off ? sb.off + fb.off : bb.off;
  return ST_OK;
}

/* ---- linear layers (with optional LoRA) ----------------------------------------------------- */

/* y[:, :nout] = x W[:nout]^T + b[:nout] + s (x A^T) B[:nout]^T for nb samples of x.n rows. Only
 * the first nout outputs are computed (the last block's text modulation needs 2 of 6 chunks). */
static st_result lin_fwd(const qi_model *m, const st_tensor *P, const qi_lin *L, rows x, rows y, int64_t nb,
                         int64_t nout, int64_t ldy, void *lt) {
  const st_ops *o = m->host->ops;
  st_dtype dt = m->s.dt;
  if (x.n == 0 || nb == 0) return ST_OK;
  st_gemm_desc g = {.dtype = dt, .c_dtype = dt, .trans_b = true, .m = x.n, .n = nout, .k = L->in, .alpha = 1.0,
                    .beta = 0.0, .a = x.p, .lda = L->in, .stride_a = x.stride * L->in, .b = P[L->w].data,
                    .ldb = L->in, .c = y.p, .ldc = ldy, .stride_c = y.stride * ldy, .batch = nb,
                    .bias = P[L->b].data};
  ST_CHECK(o->gemm(o, &g));
  if (L->la < 0) return ST_OK;
  int64_t r = m->s.rank;
  st_gemm_desc g1 = {.dtype = dt, .c_dtype = dt, .trans_b = true, .m = x.n, .n = r, .k = L->in, .alpha = 1.0,
                     .beta = 0.0, .a = x.p, .lda = L->in, .stride_a = x.stride * L->in, .b = P[L->la].data,
                     .ldb = L->in, .c = lt, .ldc = r, .stride_c = x.n * r, .batch = nb};
  ST_CHECK(o->gemm(o, &g1));
  st_gemm_desc g2 = {.dtype = dt, .c_dtype = dt, .trans_b = true, .m = x.n, .n = nout, .k = r,
                     .alpha = m->lora_scale, .beta = 1.0, .a = lt, .lda = r, .stride_a = x.n * r,
                     .b = P[L->lb].data, .ldb = r, .c = y.p, .ldc = ldy, .stride_c = y.stride * ldy, .batch = nb};
  return o->gemm(o, &g2);
}

/* dW[:nout] += sum_i dy_i^T x_i over the nb samples (one GEMM when both are contiguous) */
static st_result acc_outer(const qi_model *m, rows dy, int64_t ldy, int64_t nout, rows x, int64_t ldx, int64_t nb,
                           double alpha, void *dw) {
  const st_ops *o = m->host->ops;
  st_dtype dt = m->s.dt;
  bool flat = (dy.stride == dy.n && x.stride == x.n) || nb == 1;
  int64_t calls = flat ? 1 : nb, k = flat ? x.n * nb : x.n;
  for (int64_t i = 0; i < calls; i++) {
    st_gemm_desc g = {.dtype = dt, .c_dtype = dt, .trans_a = true, .m = nout, .n = ldx, .k = k, .alpha = alpha,
                      .beta = 1.0, .a = at(m, dy.p, i * dy.stride * ldy), .lda = ldy,
                      .b = at(m, x.p, i * x.stride * ldx), .ldb = ldx, .c = dw, .ldc = ldx, .batch = 1};
    ST_CHECK(o->gemm(o, &g));
  }
  return ST_OK;
}

/* Backward of lin_fwd: dx = dy W (+ LoRA) written (dx_beta 0) or added (1) when dx.p; weight,
 * bias and adapter gradients accumulated where the window has a buffer for them. */
static st_result lin_bwd(const qi_model *m, const st_tensor *P, st_tensor *G, const qi_lin *L, rows x, rows dy,
                         rows dx, double dx_beta, int64_t nb, int64_t nout, int64_t ldy, void *lt1, void *lt2) {
  const st_ops *o = m->host->ops;
  st_dtype dt = m->s.dt;
  int64_t in = L->in;
  if (x.n == 0 || nb == 0) return ST_OK;
  if (dx.p) {
    st_gemm_desc g = {.dtype = dt, .c_dtype = dt, .m = x.n, .n = in, .k = nout, .alpha = 1.0, .beta = dx_beta,
                      .a = dy.p, .lda = ldy, .stride_a = dy.stride * ldy, .b = P[L->w].data, .ldb = in,
                      .c = dx.p, .ldc = in, .stride_c = dx.stride * in, .batch = nb};
    ST_CHECK(o->gemm(o, &g));
  }
  if (G[L->w].data) ST_CHECK(acc_outer(m, dy, ldy, nout, x, in, nb, 1.0, G[L->w].data));
  if (G[L->b].data) {
    bool flat = ldy == nout && (dy.stride == dy.n || nb == 1);
    if (flat) {
      ST_CHECK(o->bias_backward(o, dt, dy.p, dy.n * nb, nout, G[L->b].data));
    } else {
      for (int64_t i = 0; i < nb; i++)
        for (int64_t rr = 0; rr < dy.n; rr++)
          ST_CHECK(o->bias_backward(o, dt, at(m, dy.p, (i * dy.stride + rr) * ldy), 1, nout, G[L->b].data));
    }
  }
  if (L->la < 0) return ST_OK;
  int64_t r = m->s.rank;
  double s = m->lora_scale;
  /* t = x A^T (recomputed: cheaper than saving it) */
  st_gemm_desc g1 = {.dtype = dt, .c_dtype = dt, .trans_b = true, .m = x.n, .n = r, .k = in, .alpha = 1.0, .beta = 0.0,
                     .a = x.p, .lda = in, .stride_a = x.stride * in, .b = P[L->la].data, .ldb = in, .c = lt1,
                     .ldc = r, .stride_c = x.n * r, .batch = nb};
  ST_CHECK(o->gemm(o, &g1));
  if (G[L->lb].data) ST_CHECK(acc_outer(m, dy, ldy, nout, R(lt1, x.n, x.n), r, nb, s, G[L->lb].data));
  /* dt = s dy B[:nout] */
  st_gemm_desc g2 = {.dtype = dt, .c_dtype = dt, .m = x.n, .n = r, .k = nout, .alpha = s, .beta = 0.0, .a = dy.p,
                     .lda = ldy, .stride_a = dy.stride * ldy, .b = P[L->lb].data, .ldb = r, .c = lt2, .ldc = r,
                     .stride_c = x.n * r, .batch = nb};
  ST_CHECK(o->gemm(o, &g2));
  if (G[L->la].data) ST_CHECK(acc_outer(m, R(lt2, x.n, x.n), r, r, x, in, nb, 1.0, G[L->la].data));
  if (dx.p) {
    st_gemm_desc g3 = {.dtype = dt, .c_dtype = dt, .m = x.n, .n = in, .k = r, .alpha = 1.0, .beta = 1.0, .a = lt2,
                       .lda = r, .stride_a = x.n * r, .b = P[L->la].data, .ldb = in, .c = dx.p, .ldc = in,
                       .stride_c = dx.stride * in, .batch = nb};
    ST_CHECK(o->gemm(o, &g3));
  }
  return ST_OK;
}

#define CK(expr)                                                                                                   \
  do {                                                                                                             \
    st_result ck_r_ = (expr);                                                                                      \
    if (ck_r_ != ST_OK)                                                                                            \
      return st_error_set(err, ck_r_, m->units[unit].name, "kernel call failed (qwen_image.c:%d): %s", __LINE__,   \
                          st_result_string(ck_r_));                                                                \
  } while (0)

static st_result copy_dev(const qi_model *m, void *dst, const void *src, int64_t elems) {
  const st_ops *o = m->host->ops;
  return o->copy(o, dst, m->host->device, src, m->host->device, (size_t)elems * st_dtype_size(m->s.dt));
}

/* ---- embed ---------------------------------------------------------------------------------- */

static st_result embed_forward(qi_model *m, qi_batch *b, const st_tensor *P, st_tensor *cout, void *saved, void *work,
                               st_error *err) {
  const int unit = 0;
  const st_ops *o = m->host->ops;
  st_dtype dt = m->s.dt;
  const qi_lin *L = m->uinfo[0].lin;
  int64_t B = b->B, J = m->s.a.joint_dim, D = m->D;
  bump sb = {saved ? saved : work, 0};
  emb_saved s;
  embed_saved_layout(m, b, &sb, &s);
  void *p[6];
  small_scratch(m, b, saved ? work : (char *)work + sb.off, p);
  CK(lin_fwd(m, P, &L[E_IMG_IN], R(b->xin, B * b->Ni, 0), R(cout[0].data, B * b->Ni, 0), 1, D, D, p[4]));
  CK(o->rmsnorm_forward(o, dt, b->prompt, P[P_TXT_NORM].data, s.rn, s.rstd, B * b->Nt, J, QI_EPS));
  CK(lin_fwd(m, P, &L[E_TXT_IN], R(s.rn, B * b->Nt, 0), R(cout[1].data, B * b->Nt, 0), 1, D, D, p[4]));
  CK(lin_fwd(m, P, &L[E_T1], R(b->tproj, B, 0), R(s.t1, B, 0), 1, D, D, p[4]));
  CK(o->silu_forward(o, dt, s.t1, s.ht, B * D));
  CK(lin_fwd(m, P, &L[E_T2], R(s.ht, B, 0), R(cout[2].data, B, 0), 1, D, D, p[4]));
  return ST_OK;
}

static st_result embed_backward(qi_model *m, qi_batch *b, const st_tensor *P, st_tensor *G, const void *saved,
                                 const st_tensor *dout, void *work, st_error *err) {
  const int unit = 0;
  const st_ops *o = m->host->ops;
  st_dtype dt = m->s.dt;
  const qi_lin *L = m->uinfo[0].lin;
  int64_t B = b->B, J = m->s.a.joint_dim, D = m->D, nt = B * b->Nt;
  bump sb = {(void *)(uintptr_t)saved, 0};
  emb_saved s;
  embed_saved_layout(m, b, &sb, &s);
  void *p[6];
  small_scratch(m, b, work, p);
  CK(lin_bwd(m, P, G, &L[E_IMG_IN], R(b->xin, B * b->Ni, 0), R(dout[0].data, B * b->Ni, 0), R(NULL, 0, 0), 0, 1, D,
             D, p[4], p[5]));
  bool need_drn = G[P_TXT_NORM].data != NULL; /* the prompt is data: its gradient only feeds txt_norm's gain */
  CK(lin_bwd(m, P, G, &L[E_TXT_IN], R(s.rn, nt, 0), R(dout[1].data, nt, 0), R(need_drn ? p[0] : NULL, nt, 0), 0, 1, D,
             D, p[4], p[5]));
  if (need_drn) CK(o->rmsnorm_backward(o, dt, p[0], b->prompt, P[P_TXT_NORM].data, s.rstd, p[1], G[P_TXT_NORM].data, nt, J));
  CK(lin_bwd(m, P, G, &L[E_T2], R(s.ht, B, 0), R(dout[2].data, B, 0), R(p[2], B, 0), 0, 1, D, D, p[4], p[5]));
  CK(o->silu_backward(o, dt, s.t1, p[2], p[3], B * D));
  CK(lin_bwd(m, P, G, &L[E_T1], R(b->tproj, B, 0), R(p[3], B, 0), R(NULL, 0, 0), 0, 1, D, D, p[4], p[5]));
  return ST_OK;
}

/* ---- one dual-stream block ------------------------------------------------------------------ */

static const int lin_q[2] = {L_TO_Q, L_ADD_Q}, lin_k[2] = {L_TO_K, L_ADD_K}, lin_v[2] = {L_TO_V, L_ADD_V};
static const int lin_out[2] = {L_TO_OUT, L_TO_ADD_OUT}, lin_mod[2] = {L_IMG_MOD, L_TXT_MOD};
static const int lin_ff0[2] = {L_IMG_FF0, L_TXT_FF0}, lin_ff2[2] = {L_IMG_FF2, L_TXT_FF2};
static const int gain_q[2] = {P_NORM_Q, P_NORM_ADDED_Q}, gain_k[2] = {P_NORM_K, P_NORM_ADDED_K};

static st_attn_desc attn_desc(const qi_model *m, const qi_batch *b, const blk_geo *g, const blk_saved *s) {
  const qi_arch *a = &m->s.a;
  return (st_attn_desc){.dtype = m->s.dt, .batch = g->B, .seq_q = g->Sq, .seq_k = g->S, .heads = a->heads,
                        .kv_heads = a->heads, .head_dim = a->head_dim, .scale = 1.0 / sqrt((double)a->head_dim),
                        .key_mask = b->kmask, .q = s->q, .k = s->k, .v = s->v, .out = s->o, .lse = s->lse};
}

static st_result block_forward(qi_model *m, qi_batch *b, int unit, const st_tensor *P, const st_tensor *cin,
                               st_tensor *cout, void *saved, void *work, st_error *err) {
  const st_ops *o = m->host->ops;
  st_dtype dt = m->s.dt;
  const qi_lin *L = m->uinfo[unit].lin;
  blk_geo g = block_geo(m, b, unit);
  int64_t B = g.B, D = m->D, F = m->F, H = m->s.a.heads, d = m->s.a.head_dim, half = d / 2;
  bump sb = {saved ? saved : work, 0};
  blk_saved s;
  block_saved_layout(m, &g, &sb, &s);
  bump wb = {saved ? work : (char *)work + sb.off, 0};
  blk_fwd_scratch w;
  block_fwd_scratch(m, &g, &wb, &w);
  void *x[2] = {cin[0].data, cin[1].data}, *e = cin[2].data;
  void *out[2] = {cout[0].data, g.dead ? NULL : cout[1].data}, *eo = cout[g.dead ? 1 : 2].data;
  int nst = g.dead ? 1 : 2; /* streams that survive the attention */

  CK(o->silu_forward(o, dt, e, s.se, B * D));
  for (int st = 0; st < 2; st++) /* dead text stream: only shift1/scale1 are used */
    CK(lin_fwd(m, P, &L[lin_mod[st]], R(s.se, B, 0), R(s.mod[st], B, 0), 1, st && g.dead ? 2 * D : 6 * D, 6 * D, w.lt));
  for (int st = 0; st < 2; st++) {
    int64_t N = g.N[st];
    CK(o->layernorm_forward(o, dt, x[st], s.ln1[st], s.mean1[st], s.rstd1[st], B * N, D, QI_EPS));
    CK(o->modulate_forward(o, dt, s.ln1[st], s.mod[st], at(m, s.mod[st], D), 6 * D, w.u, B, N, D));
    if (!(st == 1 && g.dead))
      CK(lin_fwd(m, P, &L[lin_q[st]], R(w.u, N, N), R(at(m, s.qraw, g.qoff[st] * D), N, g.Sq), B, D, D, w.lt));
    CK(lin_fwd(m, P, &L[lin_k[st]], R(w.u, N, N), R(at(m, s.kraw, g.koff[st] * D), N, g.S), B, D, D, w.lt));
    CK(lin_fwd(m, P, &L[lin_v[st]], R(w.u, N, N), R(at(m, s.v, g.koff[st] * D), N, g.S), B, D, D, w.lt));
  }
  /* per-head QK RMSNorm: image and text rows have their own gains */
  for (int64_t i = 0; i < B; i++)
    for (int st = 0; st < 2; st++) {
      int64_t N = g.N[st];
      if (!(st == 1 && g.dead)) {
        int64_t row = i * g.Sq + g.qoff[st];
        CK(o->rmsnorm_forward(o, dt, at(m, s.qraw, row * D), P[gain_q[st]].data, at(m, s.q, row * D),
                              at(m, s.rq, row * H), N * H, d, QI_EPS));
      }
      int64_t row = i * g.S + g.koff[st];
      CK(o->rmsnorm_forward(o, dt, at(m, s.kraw, row * D), P[gain_k[st]].data, at(m, s.k, row * D),
                            at(m, s.rk, row * H), N * H, d, QI_EPS));
    }
  int64_t qtab = g.dead ? b->Nt * half : 0; /* image-only queries start at the image rows of the table */
  CK(o->rope_apply(o, dt, ST_ROPE_INTERLEAVED, s.q, at(m, b->cosv, qtab), at(m, b->sinv, qtab), 0, B, g.Sq, H, d, false));
  CK(o->rope_apply(o, dt, ST_ROPE_INTERLEAVED, s.k, b->cosv, b->sinv, 0, B, g.S, H, d, false));
  st_attn_desc ad = attn_desc(m, b, &g, &s);
  CK(o->attention_forward(o, &ad));
  for (int st = 0; st < nst; st++) {
    int64_t N = g.N[st], n = B * N;
    CK(lin_fwd(m, P, &L[lin_out[st]], R(at(m, s.o, g.qoff[st] * D), N, g.Sq), R(s.a[st], N, N), B, D, D, w.lt));
    CK(copy_dev(m, s.x1[st], x[st], n * D));
    CK(o->gated_residual_forward(o, dt, s.x1[st], at(m, s.mod[st], 2 * D), 6 * D, s.a[st], B, N, D));
    CK(o->layernorm_forward(o, dt, s.x1[st], s.ln2[st], s.mean2[st], s.rstd2[st], n, D, QI_EPS));
    CK(o->modulate_forward(o, dt, s.ln2[st], at(m, s.mod[st], 3 * D), at(m, s.mod[st], 4 * D), 6 * D, w.u, B, N, D));
    CK(lin_fwd(m, P, &L[lin_ff0[st]], R(w.u, n, 0), R(s.h[st], n, 0), 1, F, F, w.lt));
    CK(o->gelu_forward(o, dt, m->s.gelu, s.h[st], w.g, n * F));
    CK(lin_fwd(m, P, &L[lin_ff2[st]], R(w.g, n, 0), R(s.mm[st], n, 0), 1, D, D, w.lt));
    CK(copy_dev(m, out[st], s.x1[st], n * D));
    CK(o->gated_residual_forward(o, dt, out[st], at(m, s.mod[st], 5 * D), 6 * D, s.mm[st], B, N, D));
  }
  CK(copy_dev(m, eo, e, B * D));
  return ST_OK;
}

static st_result block_backward(qi_model *m, qi_batch *b, int unit, const st_tensor *P, st_tensor *G,
                                const st_tensor *cin, const void *saved, const st_tensor *dout, st_tensor *din,
                                void *work, st_error *err) {
  const st_ops *o = m->host->ops;
  st_dtype dt = m->s.dt;
  const qi_lin *L = m->uinfo[unit].lin;
  blk_geo g = block_geo(m, b, unit);
  int64_t B = g.B, D = m->D, F = m->F, H = m->s.a.heads, d = m->s.a.head_dim, half = d / 2;
  bump sb = {(void *)(uintptr_t)saved, 0};
  blk_saved s;
  block_saved_layout(m, &g, &sb, &s);
  bump wb = {work, 0};
  blk_bwd_scratch w;
  block_bwd_scratch(m, &g, &wb, &w);
  void *x[2] = {cin[0].data, cin[1].data}, *e = cin[2].data;
  void *dx_out[2] = {dout[0].data, g.dead ? NULL : dout[1].data}, *de_out = dout[g.dead ? 1 : 2].data;
  int nst = g.dead ? 1 : 2;

  CK(o->fill(o, dt, w.dmod[0], B * 6 * D, 0.0));
  CK(o->fill(o, dt, w.dmod[1], B * 6 * D, 0.0));
  for (int st = 0; st < nst; st++) {
    int64_t N = g.N[st], n = B * N;
    void *dmod = w.dmod[st], *mod = s.mod[st];
    /* MLP branch: out = x1 + gate2 * ff2(gelu(ff0(LN(x1)(1 + scale2) + shift2))) */
    CK(o->gated_residual_backward(o, dt, dx_out[st], at(m, mod, 5 * D), 6 * D, s.mm[st], w.t1, at(m, dmod, 5 * D), B,
                                  N, D));
    CK(o->modulate_forward(o, dt, s.ln2[st], at(m, mod, 3 * D), at(m, mod, 4 * D), 6 * D, w.t3, B, N, D));
    CK(o->gelu_forward(o, dt, m->s.gelu, s.h[st], w.f1, n * F));
    CK(lin_bwd(m, P, G, &L[lin_ff2[st]], R(w.f1, n, 0), R(w.t1, n, 0), R(w.f2, n, 0), 0, 1, D, D, w.lt1, w.lt2));
    CK(o->gelu_backward(o, dt, m->s.gelu, s.h[st], w.f2, w.f1, n * F));
    CK(lin_bwd(m, P, G, &L[lin_ff0[st]], R(w.t3, n, 0), R(w.f1, n, 0), R(w.t2, n, 0), 0, 1, F, F, w.lt1, w.lt2));
    CK(o->modulate_backward(o, dt, w.t2, s.ln2[st], at(m, mod, 4 * D), 6 * D, w.t1, at(m, dmod, 3 * D),
                            at(m, dmod, 4 * D), B, N, D));
    CK(o->layernorm_backward(o, dt, w.t1, s.x1[st], s.mean2[st], s.rstd2[st], w.t2, n, D));
    CK(o->add(o, dt, dx_out[st], w.t2, w.dx1[st], n * D));
    /* attention branch: x1 = x + gate1 * out_proj(O) */
    CK(o->gated_residual_backward(o, dt, w.dx1[st], at(m, mod, 2 * D), 6 * D, s.a[st], w.t1, at(m, dmod, 2 * D), B, N,
                                  D));
    CK(lin_bwd(m, P, G, &L[lin_out[st]], R(at(m, s.o, g.qoff[st] * D), N, g.Sq), R(w.t1, N, N),
               R(at(m, w.dO, g.qoff[st] * D), N, g.Sq), 0, B, D, D, w.lt1, w.lt2));
  }
  st_attn_desc ad = attn_desc(m, b, &g, &s);
  CK(o->attention_backward(o, &ad, w.dO, w.dQ, w.dK, w.dV));
  int64_t qtab = g.dead ? b->Nt * half : 0;
  CK(o->rope_apply(o, dt, ST_ROPE_INTERLEAVED, w.dQ, at(m, b->cosv, qtab), at(m, b->sinv, qtab), 0, B, g.Sq, H, d, true));
  CK(o->rope_apply(o, dt, ST_ROPE_INTERLEAVED, w.dK, b->cosv, b->sinv, 0, B, g.S, H, d, true));
  for (int64_t i = 0; i < B; i++)
    for (int st = 0; st < 2; st++) {
      int64_t N = g.N[st];
      if (!(st == 1 && g.dead)) {
        int64_t row = i * g.Sq + g.qoff[st];
        CK(o->rmsnorm_backward(o, dt, at(m, w.dQ, row * D), at(m, s.qraw, row * D), P[gain_q[st]].data,
                               at(m, s.rq, row * H), at(m, w.dqraw, row * D), G[gain_q[st]].data, N * H, d));
      }
      int64_t row = i * g.S + g.koff[st];
      CK(o->rmsnorm_backward(o, dt, at(m, w.dK, row * D), at(m, s.kraw, row * D), P[gain_k[st]].data,
                             at(m, s.rk, row * H), at(m, w.dkraw, row * D), G[gain_k[st]].data, N * H, d));
    }
  for (int st = 0; st < 2; st++) {
    int64_t N = g.N[st], n = B * N;
    void *dmod = w.dmod[st], *mod = s.mod[st];
    bool q_alive = !(st == 1 && g.dead);
    CK(o->modulate_forward(o, dt, s.ln1[st], mod, at(m, mod, D), 6 * D, w.t3, B, N, D));
    rows u = R(w.t3, N, N), du = R(w.t2, N, N);
    if (q_alive)
      CK(lin_bwd(m, P, G, &L[lin_q[st]], u, R(at(m, w.dqraw, g.qoff[st] * D), N, g.Sq), du, 0, B, D, D, w.lt1, w.lt2));
    CK(lin_bwd(m, P, G, &L[lin_k[st]], u, R(at(m, w.dkraw, g.koff[st] * D), N, g.S), du, q_alive ? 1 : 0, B, D, D,
               w.lt1, w.lt2));
    CK(lin_bwd(m, P, G, &L[lin_v[st]], u, R(at(m, w.dV, g.koff[st] * D), N, g.S), du, 1, B, D, D, w.lt1, w.lt2));
    CK(o->modulate_backward(o, dt, w.t2, s.ln1[st], at(m, mod, D), 6 * D, w.t1, dmod, at(m, dmod, D), B, N, D));
    CK(o->layernorm_backward(o, dt, w.t1, x[st], s.mean1[st], s.rstd1[st], w.t2, n, D));
    if (q_alive || st == 0) CK(o->add(o, dt, w.dx1[st], w.t2, din[st].data, n * D));
    else CK(copy_dev(m, din[st].data, w.t2, n * D)); /* dead text: only the attention K/V path */
  }
  /* modulation linears; the dead text stream has gradients only for shift1/scale1 (2 of 6 chunks) */
  for (int st = 0; st < 2; st++)
    CK(lin_bwd(m, P, G, &L[lin_mod[st]], R(s.se, B, 0), R(w.dmod[st], B, 0), R(w.dse, B, 0), st ? 1 : 0, 1,
               st && g.dead ? 2 * D : 6 * D, 6 * D, w.lt1, w.lt2));
  CK(o->silu_backward(o, dt, e, w.dse, w.t1, B * D));
  CK(o->add(o, dt, de_out, w.t1, din[2].data, B * D));
  return ST_OK;
}

/* ---- final ---------------------------------------------------------------------------------- */

static st_result final_forward(qi_model *m, qi_batch *b, int unit, const st_tensor *P, const st_tensor *cin,
                               st_tensor *cout, void *saved, void *work, st_error *err) {
  const st_ops *o = m->host->ops;
  st_dtype dt = m->s.dt;
  const qi_lin *L = m->uinfo[unit].lin;
  int64_t B = b->B, D = m->D, n = B * b->Ni;
  bump sb = {saved ? saved : work, 0};
  fin_saved s;
  final_saved_layout(m, b, &sb, &s);
  void *p[6];
  small_scratch(m, b, saved ? work : (char *)work + sb.off, p);
  CK(o->silu_forward(o, dt, cin[1].data, s.se, B * D));
  CK(lin_fwd(m, P, &L[F_NORM_OUT], R(s.se, B, 0), R(s.mo, B, 0), 1, 2 * D, 2 * D, p[4]));
  CK(o->layernorm_forward(o, dt, cin[0].data, s.ln, s.mean, s.rstd, n, D, QI_EPS));
  /* AdaLayerNormContinuous: (scale, shift) = chunk(linear(silu(e)), 2), scale first */
  CK(o->modulate_forward(o, dt, s.ln, at(m, s.mo, D), s.mo, 2 * D, s.y, B, b->Ni, D));
  CK(lin_fwd(m, P, &L[F_PROJ_OUT], R(s.y, n, 0), R(cout[0].data, n, 0), 1, m->P, m->P, p[4]));
  return ST_OK;
}

static st_result final_backward(qi_model *m, qi_batch *b, int unit, const st_tensor *P, st_tensor *G,
                                const st_tensor *cin, const void *saved, const st_tensor *dout, st_tensor *din,
                                void *work, st_error *err) {
  const st_ops *o = m->host->ops;
  st_dtype dt = m->s.dt;
  const qi_lin *L = m->uinfo[unit].lin;
  int64_t B = b->B, D = m->D, n = B * b->Ni;
  bump sb = {(void *)(uintptr_t)saved, 0};
  fin_saved s;
  final_saved_layout(m, b, &sb, &s);
  void *p[6];
  small_scratch(m, b, work, p);
  CK(lin_bwd(m, P, G, &L[F_PROJ_OUT], R(s.y, n, 0), R(dout[0].data, n, 0), R(p[0], n, 0), 0, 1, m->P, m->P, p[4], p[5]));
  CK(o->fill(o, dt, p[2], B * 2 * D, 0.0));
  CK(o->modulate_backward(o, dt, p[0], s.ln, s.mo, 2 * D, p[1], at(m, p[2], D), p[2], B, b->Ni, D));
  CK(o->layernorm_backward(o, dt, p[1], cin[0].data, s.mean, s.rstd, din[0].data, n, D));
  CK(lin_bwd(m, P, G, &L[F_NORM_OUT], R(s.se, B, 0), R(p[2], B, 0), R(p[3], B, 0), 0, 1, 2 * D, 2 * D, p[4], p[5]));
  CK(o->silu_backward(o, dt, cin[1].data, p[3], din[1].data, B * D));
  return ST_OK;
}

static st_result qi_unit_forward(void *ctx, void *vb, int unit, const st_tensor *params, const st_tensor *cin,
                                 st_tensor *cout, void *saved, void *work, st_error *err) {
  qi_model *m = ctx;
  if (unit < 0 || unit >= m->n_units)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "model.qwen_image", "unit %d out of range", unit);
  if (unit == 0) return embed_forward(m, vb, params, cout, saved, work, err);
  if (unit == m->n_units - 1) return final_forward(m, vb, unit, params, cin, cout, saved, work, err);
  return block_forward(m, vb, unit, params, cin, cout, saved, work, err);
}

static st_result qi_unit_backward(void *ctx, void *vb, int unit, const st_tensor *params, st_tensor *grads,
                                  const st_tensor *cin, const void *saved, const st_tensor *dout, st_tensor *din,
                                  void *work, st_error *err) {
  qi_model *m = ctx;
  if (unit < 0 || unit >= m->n_units)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "model.qwen_image", "unit %d out of range", unit);
  if (!saved)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, m->units[unit].name, "backward needs the unit's saved buffer");
  if (unit == 0) return embed_backward(m, vb, params, grads, saved, dout, work, err);
  if (unit == m->n_units - 1) return final_backward(m, vb, unit, params, grads, cin, saved, dout, din, work, err);
  return block_backward(m, vb, unit, params, grads, cin, saved, dout, din, work, err);
}

/* ---- loss, FLOPs ---------------------------------------------------------------------------- */

/* DiffSynth (batch 1): mse(pred, eps - x0) * w(t). For a batch: the mean over samples of each
 * sample's weighted mean squared error, i.e. sum_b w_b mean_c (pred_b - v_b)^2 / B. Each sample is one
 * loss item; the gradient is of the sum over them (model.h), hence B x grad_scale. */
static st_result qi_loss(void *ctx, void *vb, const st_tensor *final, double grad_scale, st_tensor *dfinal,
                         st_loss *out, st_error *err) {
  qi_model *m = ctx;
  qi_batch *b = vb;
  const st_ops *o = m->host->ops;
  int64_t cols = b->Ni * m->P;
  double loss = 0.0;
  st_result r = o->mse_forward(o, m->s.dt, final[0].data, b->target, b->weight, b->B, cols, &loss);
  if (r == ST_OK && dfinal)
    r = o->mse_backward(o, m->s.dt, final[0].data, b->target, b->weight, b->B, cols, grad_scale * (double)b->B, dfinal[0].data);
  if (r != ST_OK) return st_error_set(err, r, "model.qwen_image", "loss kernel failed: %s", st_result_string(r));
  double smean = 0.0;
  for (int64_t i = 0; i < b->B; i++) smean += b->sigma[i] / (double)b->B;
  *out = (st_loss){.loss = loss, .n_items = b->B, .n_metrics = 1, .metric_names = {"qwen_image/sigma_mean"},
                   .metric_values = {smean}};
  return ST_OK;
}

/* Reference §5: per layer and token 2*(4 D^2 + 2 D F) (each token meets one stream's weights) plus
 * attention 4 S D per query row; the embeddings and output projection per token; modulation,
 * norm_out and the timestep MLP once per sample. Padded text tokens are computed, so they count. */
static double qi_forward_flops(void *ctx, void *vb) {
  qi_model *m = ctx;
  qi_batch *b = vb;
  double D = (double)m->D, F = (double)m->F, S = (double)b->S, L = (double)m->s.a.layers;
  double Ni = (double)b->Ni, Nt = (double)b->Nt, J = (double)m->s.a.joint_dim;
  double per_layer = (8.0 * D * D + 4.0 * D * F) * S + 4.0 * D * S * S + 2.0 * 2.0 * D * 6.0 * D;
  double io = 2.0 * D * ((double)m->s.a.in_ch * Ni + J * Nt + (double)m->P * Ni);
  double once = 2.0 * (QI_T_DIM * D + D * D) + 2.0 * D * 2.0 * D;
  return L * per_layer + io + once;
}

/* ---- synthetic data ------------------------------------------------------------------------- */

/* Learnable on purpose: sample `index` belongs to one of 8 classes; its latents are the class's
 * smooth pattern plus a little noise and its prompt is the class's token sequence plus noise, so a
 * small model can learn the conditional mean and the loss visibly falls. Deterministic in
 * (seed, index) through host->rng. */
#define QI_SYNTH_CLASSES 8
static st_result qi_synth_sample(void *ctx, uint64_t seed, int64_t index, st_tensor_sink *sink, st_error *err) {
  qi_model *m = ctx;
  const st_rng_api *rng = m->host->rng;
  int64_t C = m->C, p = m->s.a.patch, hh = m->s.synth_h * p, ww = m->s.synth_w * p, J = m->s.a.joint_dim;
  int64_t cls = index % QI_SYNTH_CLASSES;
  int64_t nt = m->s.synth_text - (index / QI_SYNTH_CLASSES) % (m->s.synth_text > 3 ? 3 : m->s.synth_text);
  if (nt < 1) nt = 1;
  float *lat = malloc(sizeof(float) * (size_t)(C * hh * ww)), *pe = malloc(sizeof(float) * (size_t)(nt * J));
  uint8_t *mask = malloc((size_t)nt);
  double par[6 * 64];
  st_result r = ST_OK;
  if (!lat || !pe || !mask || C > 64) r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen_image", "synthetic sample");
  if (r == ST_OK) {
    uint64_t cseed = seed ^ 0x73796e7468ull; /* class parameters depend on the seed, not the index */
    rng->uniform(cseed, 1000 + (uint64_t)cls, 0, 6 * C, 0.0, 1.0, ST_F64, par);
    rng->normal(seed, 2000, (uint64_t)(index * C * hh * ww), C * hh * ww, 0.0, 0.1, ST_F32, lat);
    for (int64_t c = 0; c < C; c++) {
      double fy = 0.3 + 1.2 * par[6 * c], fx = 0.3 + 1.2 * par[6 * c + 1], ph = 6.283185307179586 * par[6 * c + 2];
      double fy2 = 0.2 + par[6 * c + 3], fx2 = 0.2 + par[6 * c + 4], ph2 = 6.283185307179586 * par[6 * c + 5];
      for (int64_t y = 0; y < hh; y++)
        for (int64_t x = 0; x < ww; x++)
          lat[(c * hh + y) * ww + x] += (float)(sin(fy * (double)y + fx * (double)x + ph) +
                                                cos(fy2 * (double)y - fx2 * (double)x + ph2));
    }
    rng->normal(cseed, 3000 + (uint64_t)cls, 0, nt * J, 0.0, 1.0, ST_F32, pe);
    float *jit = malloc(sizeof(float) * (size_t)(nt * J));
    if (!jit) r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen_image", "synthetic sample");
    if (jit) {
      rng->normal(seed, 4000, (uint64_t)(index * nt * J), nt * J, 0.0, 0.1, ST_F32, jit);
      for (int64_t i = 0; i < nt * J; i++) pe[i] += jit[i];
      free(jit);
    }
    memset(mask, 1, (size_t)nt);
  }
  st_device cpu = {ST_DEVICE_CPU, 0};
  if (r == ST_OK) {
    st_tensor t = st_tensor_make(lat, ST_F32, cpu, 3, (int64_t[]){C, hh, ww});
    r = sink->put(sink, "latents", &t, err);
  }
  if (r == ST_OK) {
    st_tensor t = st_tensor_make(pe, ST_F32, cpu, 2, (int64_t[]){nt, J});
    r = sink->put(sink, "prompt_emb", &t, err);
  }
  if (r == ST_OK) {
    st_tensor t = st_tensor_make(mask, ST_U8, cpu, 1, (int64_t[]){nt});
    r = sink->put(sink, "prompt_mask", &t, err);
  }
  free(lat);
  free(pe);
  free(mask);
  return r;
}

/* ---- export --------------------------------------------------------------------------------- */

/* diffusers: config.json of QwenImageTransformer2DModel + every base tensor under its own name
 * (LoRA folded in as W += (alpha/r) B A when merge_lora).
 * peft: adapter_config.json + adapter_model.safetensors with keys
 * "transformer.<module>.lora_A.weight" / ".lora_B.weight": diffusers' QwenImage
 * load_lora_weights keeps only keys under the "transformer." prefix (unless they are in a
 * non-diffusers layout it converts), and reads no alpha from a plain file, so the scale alpha/r is
 * folded into B and the config says lora_alpha = r: every loader then computes W + B A exactly. */
static st_result export_diffusers(qi_model *m, bool merge, st_param_source *src, st_tensor_sink *sink, st_error *err) {
  const qi_arch *a = &m->s.a;
  char cfg[1024];
  int n = snprintf(cfg, sizeof cfg,
                   "{\n  \"_class_name\": \"QwenImageTransformer2DModel\",\n  \"_diffusers_version\": \"0.35.0\",\n"
                   "  \"attention_head_dim\": %lld,\n  \"axes_dims_rope\": [%lld, %lld, %lld],\n"
                   "  \"guidance_embeds\": false,\n  \"in_channels\": %lld,\n  \"joint_attention_dim\": %lld,\n"
                   "  \"num_attention_heads\": %lld,\n  \"num_layers\": %lld,\n  \"out_channels\": %lld,\n"
                   "  \"patch_size\": %lld\n}\n",
                   (long long)a->head_dim, (long long)a->axes[0], (long long)a->axes[1], (long long)a->axes[2],
                   (long long)a->in_ch, (long long)a->joint_dim, (long long)a->heads, (long long)a->layers,
                   (long long)a->out_ch, (long long)a->patch);
  ST_CHECK(sink->put_file(sink, "config.json", cfg, (size_t)n, err));
  st_device cpu = {ST_DEVICE_CPU, 0};
  for (int u = 0; u < m->n_units; u++) {
    const qi_unit *ui = &m->uinfo[u];
    for (int k = 0; k < m->units[u].n_params; k++) {
      const st_param_desc *p = &m->units[u].params[k];
      if (p->flags & ST_PARAM_LORA) continue;
      st_tensor t = st_tensor_make(NULL, ST_F32, cpu, p->ndim, p->shape);
      size_t bytes = st_tensor_nbytes(&t);
      t.data = malloc(bytes ? bytes : 4);
      if (!t.data) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->name, "export buffer");
      st_result r = src->read(src, u, k, ST_F32, t.data, err);
      const qi_lin *L = NULL;
      for (int l = 0; l < ui->n_lin; l++)
        if (ui->lin[l].w == k && ui->lin[l].la >= 0) L = &ui->lin[l];
      if (r == ST_OK && merge && L) {
        int64_t rk = m->s.rank;
        float *A = malloc(sizeof(float) * (size_t)(rk * L->in)), *Bm = malloc(sizeof(float) * (size_t)(L->out * rk));
        if (!A || !Bm) r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->name, "LoRA merge buffers");
        if (r == ST_OK) r = src->read(src, u, L->la, ST_F32, A, err);
        if (r == ST_OK) r = src->read(src, u, L->lb, ST_F32, Bm, err);
        if (r == ST_OK) {
          float *W = t.data;
          for (int64_t i = 0; i < L->out; i++)
            for (int64_t j = 0; j < L->in; j++) {
              double acc = 0.0;
              for (int64_t q = 0; q < rk; q++) acc += (double)Bm[i * rk + q] * (double)A[q * L->in + j];
              W[i * L->in + j] = (float)((double)W[i * L->in + j] + m->lora_scale * acc);
            }
        }
        free(A);
        free(Bm);
      }
      if (r == ST_OK) r = sink->put(sink, p->name, &t, err);
      free(t.data);
      if (r != ST_OK) return r;
    }
  }
  return ST_OK;
}

static st_result export_peft(qi_model *m, st_param_source *src, st_tensor_sink *sink, st_error *err) {
  if (!m->s.lora)
    return st_error_set(err, ST_ERR_CONFIG, "model.lora", "--format peft exports LoRA adapters, and this model has "
                        "none (add a model.lora block, or export --format diffusers)");
  size_t cap = 4096 + 64 * m->s.n_targets, n = 0;
  char *cfg = malloc(cap);
  if (!cfg) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.qwen_image", "adapter_config.json");
  n += (size_t)snprintf(cfg + n, cap - n,
                        "{\n  \"peft_type\": \"LORA\",\n  \"task_type\": null,\n  \"r\": %lld,\n  \"lora_alpha\": %.17g,\n"
                        "  \"lora_dropout\": 0.0,\n  \"bias\": \"none\",\n  \"fan_in_fan_out\": false,\n"
                        "  \"init_lora_weights\": %s,\n  \"use_rslora\": false,\n  \"use_dora\": false,\n"
                        "  \"inference_mode\": true,\n  \"base_model_name_or_path\": null,\n"
                        "  \"target_modules\": [",
                        (long long)m->s.rank, (double)m->s.rank, m->s.lora_gaussian ? "\"gaussian\"" : "true");
  for (size_t i = 0; i < m->s.n_targets; i++)
    n += (size_t)snprintf(cfg + n, cap - n, "%s\"%s\"", i ? ", " : "", m->s.targets[i]);
  n += (size_t)snprintf(cfg + n, cap - n, "]\n}\n");
  st_result r = sink->put_file(sink, "adapter_config.json", cfg, n, err);
  free(cfg);
  ST_CHECK(r);
  st_device cpu = {ST_DEVICE_CPU, 0};
  for (int u = 0; u < m->n_units; u++)
    for (int k = 0; k < m->units[u].n_params; k++) {
      const st_param_desc *p = &m->units[u].params[k];
      if (!(p->flags & ST_PARAM_LORA)) continue;
      st_tensor t = st_tensor_make(NULL, ST_F32, cpu, p->ndim, p->shape);
      t.data = malloc(st_tensor_nbytes(&t));
      if (!t.data) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->name, "export buffer");
      r = src->read(src, u, k, ST_F32, t.data, err);
      if (r == ST_OK && m->kinds[m->uinfo[u].first_param + k] == K_LORA_B)
        for (int64_t i = 0; i < st_tensor_numel(&t); i++) ((float *)t.data)[i] *= (float)m->lora_scale;
      char key[600];
      snprintf(key, sizeof key, "transformer.%s", p->name);
      if (r == ST_OK) r = sink->put(sink, key, &t, err);
      free(t.data);
      if (r != ST_OK) return r;
    }
  return ST_OK;
}

static st_result qi_export_weights(void *ctx, const char *format, bool merge_lora, st_param_source *params,
                                   st_tensor_sink *sink, st_error *err) {
  qi_model *m = ctx;
  if (!strcmp(format, "diffusers")) return export_diffusers(m, merge_lora, params, sink, err);
  if (!strcmp(format, "peft")) return export_peft(m, params, sink, err);
  return st_error_set(err, ST_ERR_UNSUPPORTED, "--format", "qwen_image exports \"diffusers\" or \"peft\", not \"%s\"",
                      format);
}

ST_EXPORT const st_model_plugin_v1 strata_model_plugin_v1 = {
    .header = ST_PLUGIN_HEADER("model", "qwen_image", ST_VERSION_STRING, st_model_plugin_v1),
    .validate = qi_validate,
    .init = qi_init,
    .finalize = qi_finalize,
    .describe = qi_describe,
    .init_param = qi_init_param,
    .batch_prepare = qi_batch_prepare,
    .batch_release = qi_batch_release,
    .carry_layout = qi_carry_layout,
    .unit_memory = qi_unit_memory,
    .unit_forward = qi_unit_forward,
    .unit_backward = qi_unit_backward,
    .loss = qi_loss,
    .forward_flops = qi_forward_flops,
    .synth_sample = qi_synth_sample,
    .export_weights = qi_export_weights,
};
