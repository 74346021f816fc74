#!/usr/bin/env bash
# End-to-end checks of `strata train` with the mlp model: resume reproduces an uninterrupted run
# exactly, a SIGKILL during a save leaves the previous checkpoint loadable, SIGINT saves and stops,
# non-finite losses stop the run, and bad input fails with a clear message and exit code.
# usage: trainer_test.sh STRATA SOURCE_ROOT CASE
set -uo pipefail
strata=$1 src=$2 case=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export STRATA_PLUGIN_PATH=""
fail() { echo "FAIL ($case): $*"; exit 1; }

# a small, fast run; the scheduler has a fixed horizon so shortening max_steps does not change it
cat >"$work/cfg.json" <<JSON
{
  "train_micro_batch_size_per_gpu": 8,
  "gradient_accumulation_steps": 2,
  "gradient_clipping": 1.0,
  "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "weight_decay": 0.01}},
  "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 5, "total_num_steps": 40, "warmup_max_lr": 0.003}},
  "model": {"name": "mlp", "hidden": 32, "ffn": 64, "layers": 2},
  "data": {"synthetic": {"num_samples": 96}, "num_workers": 1},
  "train": {"max_steps": 24, "save_steps": 8, "output_path": "$work/run", "seed": 3},
  "device": {"threads": 1}
}
JSON

losses() { # metrics.jsonl -> "step loss" lines, full precision as written
  python3 -c '
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["step"], repr(r["train/loss"]), repr(r["train/grad_norm"]))' "$1"
}

case $case in
resume)
  "$strata" train "$work/cfg.json" --set train.output_path="$work/a" >"$work/a.log" 2>&1 || fail "run a: $(tail -5 "$work/a.log")"
  "$strata" train "$work/cfg.json" --set train.output_path="$work/b" --set train.max_steps=8 >"$work/b1.log" 2>&1 \
    || fail "run b (first half): $(tail -5 "$work/b1.log")"
  [ "$(cat "$work/b/latest")" = step-000008 ] || fail "latest after 8 steps is '$(cat "$work/b/latest")'"
  mv "$work/b/metrics.jsonl" "$work/b/metrics-first.jsonl"
  "$strata" train "$work/cfg.json" --set train.output_path="$work/b" --set train.resume=latest >"$work/b2.log" 2>&1 \
    || fail "run b (resumed): $(tail -5 "$work/b2.log")"
  grep -q "resumed from" "$work/b2.log" || fail "no 'resumed from' line"
  losses "$work/a/metrics.jsonl" | awk '$1 > 8' >"$work/a.txt"
  losses "$work/b/metrics.jsonl" >"$work/b.txt"
  [ "$(wc -l <"$work/a.txt")" -eq 16 ] || fail "expected 16 steps after the resume point, got $(wc -l <"$work/a.txt")"
  diff "$work/a.txt" "$work/b.txt" >"$work/diff.txt" || fail "resumed run differs: $(head -5 "$work/diff.txt")"
  # the first half also matched the uninterrupted run
  losses "$work/a/metrics.jsonl" | awk '$1 <= 8' | diff - <(losses "$work/b/metrics-first.jsonl") >/dev/null \
    || fail "first half differs"
  # and the loss fell
  python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
first, last = rows[0]["train/loss"], rows[-1]["train/loss"]
sys.exit(0 if last < 0.7 * first else f"loss did not fall: {first} -> {last}")' "$work/a/metrics.jsonl" || fail "loss"
  [ -f "$work/a/step-000024/model.safetensors" ] || fail "no final checkpoint"
  [ -f "$work/a/step-000024/trainer_state.json" ] || fail "no trainer_state.json"
  ;;
kill-during-save)
  STRATA_TEST_SLOW_SAVE_MS=400 "$strata" train "$work/cfg.json" --set train.max_steps=1000 --set train.save_steps=4 \
    >"$work/log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do # wait for the second save to be under way
    [ -d "$work/run/.step-000008.tmp" ] && [ "$(cat "$work/run/latest" 2>/dev/null)" = step-000004 ] && break
    sleep 0.05
  done
  [ -d "$work/run/.step-000008.tmp" ] || { kill -9 $pid; fail "the second save never started: $(tail -3 "$work/log")"; }
  kill -9 $pid
  wait $pid 2>/dev/null
  [ "$(cat "$work/run/latest")" = step-000004 ] || fail "latest is '$(cat "$work/run/latest")' after the kill"
  [ ! -d "$work/run/step-000008" ] || fail "a half-written step-000008 was moved into place"
  "$strata" train "$work/cfg.json" --set train.resume=latest --set train.max_steps=6 >"$work/resume.log" 2>&1 \
    || fail "cannot resume after the kill: $(tail -5 "$work/resume.log")"
  grep -q "resumed from .*step-000004 at step 4" "$work/resume.log" || fail "did not resume from step 4"
  [ "$(cat "$work/run/latest")" = step-000006 ] || fail "latest after resuming is '$(cat "$work/run/latest")'"
  ;;
sigint)
  "$strata" train "$work/cfg.json" --set train.max_steps=100000 --set train.save_steps=0 >"$work/log" 2>&1 &
  pid=$!
  for _ in $(seq 1 400); do [ -s "$work/run/metrics.jsonl" ] && break; sleep 0.05; done
  kill -INT $pid
  wait $pid
  rc=$?
  [ $rc -eq 130 ] || fail "exit code $rc after SIGINT, expected 130: $(tail -3 "$work/log")"
  grep -q "resume with" "$work/log" || fail "no resume hint: $(tail -3 "$work/log")"
  [ -f "$work/run/latest" ] || fail "no checkpoint saved on SIGINT"
  ;;
nan)
  "$strata" train "$work/cfg.json" --set optimizer.type=SGD --set optimizer.params.lr=1e30 --set optimizer.params.weight_decay=0 \
    --set gradient_clipping=0 --set scheduler.type=WarmupLR --set scheduler.params.warmup_num_steps=2 \
    --set 'scheduler.params={"warmup_min_lr": 1e30, "warmup_max_lr": 1e30, "warmup_num_steps": 2}' \
    --set train.max_bad_steps=3 >"$work/log" 2>&1
  rc=$?
  [ $rc -eq 1 ] || fail "exit code $rc, expected 1: $(tail -3 "$work/log")"
  grep -q "not finite for 3 consecutive steps" "$work/log" || fail "message: $(tail -3 "$work/log")"
  ;;
bad-input)
  # not writable output directory
  touch "$work/afile"
  "$strata" train "$work/cfg.json" --set train.output_path="$work/afile/out" >"$work/log" 2>&1
  rc=$?
  [ $rc -ne 0 ] || fail "a file as output parent was accepted"
  grep -q "afile/out" "$work/log" || fail "message does not name the path: $(tail -3 "$work/log")"
  # resume path that does not exist
  "$strata" train "$work/cfg.json" --set train.resume="$work/nope" >"$work/log" 2>&1
  rc=$?
  [ $rc -eq 2 ] || fail "resume of a missing path: exit $rc"
  grep -q "nope does not exist" "$work/log" || fail "message: $(tail -3 "$work/log")"
  "$strata" train "$work/cfg.json" --set train.resume=latest --set train.output_path="$work/empty" >"$work/log" 2>&1
  [ $? -eq 2 ] || fail "resume=latest without checkpoints was accepted"
  grep -q "no checkpoint has been saved" "$work/log" || fail "message: $(tail -3 "$work/log")"
  # missing plugin: every path tried is listed
  "$strata" train "$work/cfg.json" --set model.name=nosuchmodel >"$work/log" 2>&1
  [ $? -eq 2 ] || fail "missing model plugin: exit code"
  grep -q "libstrata-model-nosuchmodel.so" "$work/log" || fail "message: $(tail -3 "$work/log")"
  # unknown key with a did-you-mean
  "$strata" train "$work/cfg.json" --set train.max_stesp=3 >"$work/log" 2>&1
  [ $? -eq 2 ] || fail "unknown key: exit code"
  grep -q "max_steps" "$work/log" || fail "no did-you-mean: $(tail -3 "$work/log")"
  # a corrupt sample names the file
  "$strata" train "$work/cfg.json" --set train.max_steps=1 >/dev/null 2>&1 || fail "setup run"
  head -c 20 "$work/run/synthetic-data/sample-000003.safetensors" >"$work/trunc" && mv "$work/trunc" "$work/run/synthetic-data/sample-000003.safetensors"
  "$strata" train "$work/cfg.json" --set data.synthetic.num_samples=0 --set data.dataset_base_path="$work/run/synthetic-data" \
    --set data.shuffle=false --set train.output_path="$work/run2" >"$work/log" 2>&1
  [ $? -ne 0 ] || fail "a truncated sample was accepted"
  grep -q "sample-000003.safetensors" "$work/log" || fail "message does not name the sample: $(tail -3 "$work/log")"
  ;;
*) fail "unknown case";;
esac
echo "ok ($case)"
