#!/usr/bin/env bash
# strata vs PyTorch eager on one Qwen-Image CPU training step (forward + backward + AdamW), same
# shapes, same thread count, in one run; prints both and the ratio for each config.
#   bench/qwen_image_vs_torch.sh [BUILD_DIR (build)] [THREADS (2)] [STEPS (5)] [CONFIGS ("tiny mid")] [ROUNDS (2)]
# Each round runs strata then torch; the summary takes each side's best round (the machine may be
# shared: interleaving and best-of keep other load from deciding the ratio).
# Needs a build with the bench (meson setup BUILD; ninja -C BUILD) and torch + diffusers: the python
# of .venv-interop (scripts/interop-setup) when present, else python3. Each side runs in its own
# process, one after the other, so peak RSS is per side. On a shared machine the medians move with
# the other load; the fastest-step ratio is printed too.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
threads=${2:-2}
steps=${3:-5}
configs=${4:-tiny mid}
rounds=${5:-2}
py=python3
[ -x .venv-interop/bin/python ] && py=.venv-interop/bin/python
bench="$build/bench/bench_qwen_image"
module="$build/models/qwen_image/libstrata-model-qwen_image.so"
[ -x "$bench" ] || ninja -C "$build" bench/bench_qwen_image models/qwen_image/libstrata-model-qwen_image.so >/dev/null
if ! "$py" -c 'import torch, diffusers' 2>/dev/null; then
  echo "qwen_image_vs_torch: $py cannot import torch and diffusers; run scripts/interop-setup" >&2
  exit 1
fi
cores=$(nproc --all)
# the same thread count for every pool on both sides
export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
echo "threads $threads, $cores cores, load average $(cut -d" " -f1-3 /proc/loadavg), steps $steps (median after 1 warm-up step)"
for c in $configs; do
  best=""  # per side: lowest median, lowest single step, peak RSS
  for r in $(seq "$rounds"); do
    s_out=$("$bench" "$module" --config "$c" --threads "$threads" --steps "$steps")
    t_out=$("$py" bench/qwen_image_torch.py --config "$c" --threads "$threads" --steps "$steps")
    echo "$s_out" | grep -v '^RESULT'
    echo "$t_out" | grep -v '^RESULT'
    fields='s/^RESULT [a-z]* .* step_s=\([0-9.]*\) min_s=\([0-9.]*\) peak_rss_mib=\([0-9.]*\).*/\1 \2 \3/p'
    cur="$(echo "$s_out" | sed -n "$fields") $(echo "$t_out" | sed -n "$fields")"
    best=$(echo "$best $cur" | awk '{ if (NF == 6) print; else {
      for (i = 1; i <= 6; i++) b[i] = ($i < $(i + 6) || i == 3 || i == 6) ? $i : $(i + 6)
      if ($(9) > b[3]) b[3] = $(9); if ($(12) > b[6]) b[6] = $(12)
      print b[1], b[2], b[3], b[4], b[5], b[6] } }')
  done
  echo "$best" | awk -v c="$c" -v r="$rounds" '{
    printf "%s (best of %d rounds): median strata %.4f s/step, torch %.4f s/step, torch/strata = %.2fx " \
           "(fastest steps %.4f vs %.4f, %.2fx); peak RSS strata %.0f MiB, torch %.0f MiB\n",
           c, r, $1, $4, $4 / $1, $2, $5, $5 / $2, $3, $6 }'
done
