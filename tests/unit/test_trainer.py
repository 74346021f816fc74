#!/usr/bin/env python3
"""End-to-end trainer checks through the `strata` binary on the tiny Qwen-Image model (seconds each).
Usage: test_trainer.py STRATA SOURCE_ROOT CASE, CASE one of resume, kill-during-save, sigint, nan,
bad-input. Each case asserts exit codes, messages and files; failures print what differed."""
import json, os, shutil, signal, subprocess, sys, tempfile, time

STRATA, ROOT, CASE = sys.argv[1], sys.argv[2], sys.argv[3]
DEMO = os.path.join(ROOT, "configs/demo/qwen_image_tiny.json")
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what, file=sys.stderr)


def run(args, env=None, cfg=DEMO):
    e = dict(os.environ, **(env or {}))
    p = subprocess.run([STRATA, "train", cfg] + args, capture_output=True, text=True, env=e, timeout=300)
    return p.returncode, p.stdout + p.stderr


def sets(out, steps, save, extra=()):
    base = ["train.output_path=" + out, "train.max_steps=%d" % steps, "train.save_steps=%d" % save,
            "train.keep_last=5", "data.synthetic.num_samples=32", "gradient_accumulation_steps=2",
            "train_micro_batch_size_per_gpu=4"] + list(extra)
    r = []
    for s in base:
        r += ["--set", s]
    return r


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {j["step"]: j["train/loss"] for j in map(json.loads, f)}


def latest(out):
    with open(os.path.join(out, "latest")) as f:
        return f.read().strip()


def case_resume(tmp):
    a = os.path.join(tmp, "a")
    rc, log = run(sets(a, 20, 10))
    check(rc == 0, "uninterrupted run failed:\n" + log)
    check(os.path.exists(os.path.join(a, "step-000020", "model.safetensors")), "no model.safetensors in a local run")
    # a LoRA run saves only the adapters, whole: still a loadable model file
    lora = os.path.join(tmp, "lora")
    rc, log = run(sets(lora, 2, 2, ["model.lora={\"rank\": 4, \"alpha\": 8}"]))
    check(rc == 0 and os.path.exists(os.path.join(lora, "step-000002", "model.safetensors")),
          "LoRA checkpoint without model.safetensors (rc %d):\n%s" % (rc, log))
    # the same run resumed from its step-10 checkpoint must repeat steps 11..20 bit for bit
    b = os.path.join(tmp, "b")
    shutil.copytree(a, b)
    shutil.rmtree(os.path.join(b, "step-000020"))
    with open(os.path.join(b, "latest"), "w") as f:
        f.write("step-000010\n")
    rc, log = run(sets(b, 20, 10, ["train.resume=latest"]))
    check(rc == 0, "resumed run failed:\n" + log)
    check("resumed from" in log and "step 10" in log, "no 'resumed from ... step 10' line:\n" + log)
    la, lb = losses(a), losses(b)
    check(sorted(lb) == list(range(1, 21)), "resumed metrics.jsonl steps %s" % sorted(lb))
    for s in range(11, 21):
        check(la.get(s) == lb.get(s), "step %d loss %r (uninterrupted) != %r (resumed)" % (s, la.get(s), lb.get(s)))
    check(la[20] != la[11], "loss did not change between steps 11 and 20")
    # a resume path that does not exist
    rc, log = run(sets(os.path.join(tmp, "c"), 20, 10, ["train.resume=" + os.path.join(tmp, "nope/step-000010")]))
    check(rc != 0 and "nope/step-000010" in log, "missing resume path: rc %d\n%s" % (rc, log))


def wait_for(pred, timeout):
    t = time.time() + timeout
    while time.time() < t:
        if pred():
            return True
        time.sleep(0.02)
    return False


def case_kill_during_save(tmp):
    out = os.path.join(tmp, "k")
    env = dict(os.environ, STRATA_TEST_SLOW_SAVE_MS="1500")
    p = subprocess.Popen([STRATA, "train", DEMO] + sets(out, 10, 5), env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ok = wait_for(lambda: os.path.exists(os.path.join(out, "latest")) and latest(out) == "step-000005", 120)
    check(ok, "first checkpoint never appeared")
    staging = os.path.join(out, ".step-000010.tmp")
    ok = wait_for(lambda: os.path.isdir(staging), 120)
    check(ok, "second save never started (no %s)" % staging)
    p.send_signal(signal.SIGKILL)
    p.wait()
    check(latest(out) == "step-000005", "latest is %s after a kill during save" % latest(out))
    check(not os.path.exists(os.path.join(out, "step-000010")), "a half-written step-000010 is visible")
    rc, log = run(sets(out, 10, 5, ["train.resume=latest"]))
    check(rc == 0, "resume after the kill failed:\n" + log)
    check("resumed from" in log, "did not resume:\n" + log)
    check(latest(out) == "step-000010", "latest after resume: " + latest(out))
    check(not os.path.exists(staging), "staging folder left behind")


def case_sigint(tmp):
    out = os.path.join(tmp, "s")
    p = subprocess.Popen([STRATA, "train", DEMO] + sets(out, 100000, 0), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    ok = wait_for(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")) and len(losses(out)) >= 3, 120)
    check(ok, "training never started")
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        check(False, "SIGINT did not stop the run within 60 s")
    check(p.returncode not in (0, None), "exit code %r after SIGINT" % p.returncode)
    check("stopped by a signal" in err and "train.resume=latest" in err, "message after SIGINT:\n" + err)
    step = int(latest(out).split("-")[1])
    check(step >= 3, "checkpoint at step %d" % step)
    rc, log = run(sets(out, step + 2, 0, ["train.resume=latest"]))
    check(rc == 0 and ("at step %d" % step) in log, "resume after SIGINT:\n" + log)


def case_nan(tmp):
    out = os.path.join(tmp, "n")
    rc, log = run(sets(out, 50, 0, ["optimizer.params.lr=1e30", "gradient_clipping=0", "train.max_bad_steps=3"]))
    check(rc == 1, "exit code %d, expected 1" % rc)
    check("not finite for 3 consecutive steps" in log and "lower the learning rate" in log, "message:\n" + log)


def write(tmp, name, text):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def case_bad_input(tmp):
    demo = json.load(open(DEMO))
    def cfg(name, **changes):
        d = json.loads(json.dumps(demo))
        for k, v in changes.items():
            node = d
            keys = k.split("__")
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = v
        return write(tmp, name, json.dumps(d, indent=2))
    cases = [
        # (config path, extra args, expected exit code, substrings of the message)
        (write(tmp, "syntax.json", '{\n  "train": {\n    "max_steps": 10,\n  }\n}\n'), [], 2, ["syntax.json:4:"]),
        (cfg("top.json", trian={"max_steps": 1}), [], 2, ["trian", "did you mean", "train"]),
        (cfg("nested.json", train__max_step=5), [], 2, ["train.max_step", "did you mean", "max_steps"]),
        (cfg("type.json", train__max_steps="ten"), [], 2, ["train.max_steps", "string"]),
        (cfg("triple.json", train_batch_size=10), [], 2, ["train_batch_size", "10", "8"]),
        (cfg("plugin.json", model__name="no_such_model"), [], 2, ["libstrata-model-no_such_model.so"]),
        (DEMO, ["--set", "train.output_path=/proc/strata-cannot-write"], 1, ["/proc/strata-cannot-write"]),
        (DEMO, ["--set", "train.nosuch=1"], 2, ["train.nosuch"]),
    ]
    for path, extra, want_rc, needles in cases:
        rc, log = run(extra or ["--set", "train.output_path=" + os.path.join(tmp, "o")], cfg=path)
        check(rc == want_rc, "%s %s: exit %d, expected %d\n%s" % (os.path.basename(path), extra, rc, want_rc, log))
        for n in needles:
            check(n in log, "%s %s: %r not in:\n%s" % (os.path.basename(path), extra, n, log))
    # a truncated checkpoint on resume: clear error, exit 1
    out = os.path.join(tmp, "t")
    rc, log = run(sets(out, 2, 2))
    check(rc == 0, "run for the truncation check failed:\n" + log)
    st = os.path.join(out, "step-000002", "model.safetensors")
    with open(st, "r+b") as f:
        f.truncate(os.path.getsize(st) // 2)
    rc, log = run(sets(out, 4, 2, ["train.resume=latest"]))
    check(rc == 1 and "model.safetensors" in log, "truncated checkpoint: exit %d\n%s" % (rc, log))


with tempfile.TemporaryDirectory(prefix="strata-trainer-") as tmp:
    {"resume": case_resume, "kill-during-save": case_kill_during_save, "sigint": case_sigint, "nan": case_nan,
     "bad-input": case_bad_input}[CASE](tmp)
print("%s: %d failure(s)" % (CASE, len(failures)))
sys.exit(1 if failures else 0)
