#!/usr/bin/env python3
"""Issue 8's target table: our engine, our distributed trainer and the PyTorch reference, run
side by side and interleaved, then the target ratios.

    cargo build --release
    python3 bench/distributed.py                       # 3 rounds, PyTorch rows if available
    /path/to/venv/bin/python bench/distributed.py      # a Python that has torch: adds its rows
    python3 bench/distributed.py --rounds 1 --no-torch --json out.json -- --transport tcp

Arguments after `--` are passed to every `coordinator` run. Standard library only; the PyTorch
rows run `--torch-script` with `--torch-python` (default: this interpreter) and are skipped when
either is missing or has no torch. Each round runs every row once, so slow drift of a noisy
machine hits all rows alike; the table shows medians and min-max over rounds.
"""
import argparse, datetime, json, os, platform, re, shlex, signal, socket, statistics
import subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT_KEYS = ("compute_s", "communicate_s", "update_s")  # shown first when present

# (label, numerator, denominator, target ratio)
TARGETS = [
    ("4 workers / PyTorch DDP", "coord_w4", "torch_ddp4", 2.5),
    ("4 workers / engine 2 threads", "coord_w4", "engine_1shard", 0.40),
    ("1 worker / engine 2 threads", "coord_w1", "engine_1shard", 0.75),
    ("engine 16 shards / PyTorch 2 threads", "engine_16shards", "torch_2t", 2.0),
]
INFO = [  # not targets, but useful beside them
    ("1 worker / engine 16 shards", "coord_w1", "engine_16shards"),
    ("4 workers / 1 worker", "coord_w4", "coord_w1"),
    ("engine 16 shards / 1 shard", "engine_16shards", "engine_1shard"),
]


def run(cmd, timeout, env=None):
    """Runs cmd in its own process group; returns (rc, stdout+stderr). Kills the group on timeout."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return -1, (out or "") + f"\n[timed out after {timeout}s]"
    return p.returncode, out


def samples_per_s(text):
    m = re.findall(r"samples/s=([0-9.]+)", text)
    return float(m[-1]) if m else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine(a, shards):
    cmd = [os.path.join(a.bin_dir, "worker"), "bench", "--batch", "128", "--threads", "2",
           "--seconds", str(a.seconds), "--shards", str(shards)]
    rc, out = run(cmd, 120 + 4 * a.seconds)
    return (samples_per_s(out) if rc == 0 else None), {}, out


def coordinator(a, workers):
    with tempfile.TemporaryDirectory(prefix="vae-bench-") as tmp:
        cmd = [os.path.join(a.bin_dir, "coordinator"), "--workers", str(workers), "--local",
               "--epochs", str(a.epochs), "--iw-samples", "0", "--out", tmp] + a.coord_args
        rc, out = run(cmd, a.timeout)
        if rc != 0:
            return None, {}, out
        with open(os.path.join(tmp, "summary.json")) as f:
            summary = json.load(f)
        totals, steps = {}, 0
        with open(os.path.join(tmp, "metrics.jsonl")) as f:
            for line in f:
                if not line.strip():
                    continue
                m = json.loads(line)
                steps = max(steps, int(m.get("global_step", 0)))
                for k, v in m.items():  # every time figure the run reports, whatever its name
                    if k.endswith("_s") and k != "samples_per_s" and isinstance(v, (int, float)):
                        totals[k] = totals.get(k, 0.0) + v
        # ms per step of each part of the split
        split = {k: 1e3 * v / max(steps, 1) for k, v in totals.items()}
        split["steps"] = steps
        return float(summary["samples_per_s"]), split, out


def torch_row(a, mode):
    if mode == "speed":
        args = ["speed", "--threads", "2", "--batch", "128", "--seconds", str(a.seconds)]
    else:
        args = ["ddp", "--procs", "4", "--threads", "1", "--batch", "32", "--steps", str(a.ddp_steps)]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    rc, out = run([a.torch_python, a.torch_script] + args, 600, env)
    return (samples_per_s(out) if rc == 0 else None), {}, out


def torch_available(a):
    if a.no_torch:
        return False, "skipped (--no-torch)"
    if not os.path.isfile(a.torch_script):
        return False, f"skipped: no reference script at {a.torch_script}"
    rc, out = run([a.torch_python, "-c", "import torch; print(torch.__version__)"], 120)
    if rc != 0:
        return False, f"skipped: {a.torch_python} cannot import torch"
    return True, "torch " + out.strip().splitlines()[-1]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit():
    """HEAD of this repository, `+dirty` when sources outside bench/ and docs/ differ from it."""
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()
    try:
        head = git("log", "-1", "--format=%h") or "unknown"
        dirty = git("status", "--porcelain", "--", ".", ":!bench", ":!docs")
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    p.add_argument("--epochs", type=int, default=1, help="epochs of each coordinator run")
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds of worker bench and torch speed")
    p.add_argument("--ddp-steps", type=int, default=200)
    p.add_argument("--coordinator-args", default="", help="extra coordinator flags, one string")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a coordinator run is killed")
    p.add_argument("--torch-script", default=os.path.join(ROOT, "..", "shared", "anchors", "torch_vae_ref.py"))
    p.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON", sys.executable))
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json", help="write the raw figures of every round here")
    p.add_argument("--commit", help="label of the binaries' source [default: this repository's HEAD]")
    p.add_argument("--verbose", action="store_true", help="print each command's output")
    a = p.parse_args(argv)
    a.coord_args = shlex.split(a.coordinator_args) + extra
    a.torch_script = os.path.normpath(a.torch_script)
    commit = a.commit or git_commit()
    if a.rounds < 1:
        sys.exit("--rounds must be at least 1")
    for b in ("worker", "coordinator"):
        if not os.access(os.path.join(a.bin_dir, b), os.X_OK):
            sys.exit(f"no {b} binary in {a.bin_dir}: run `cargo build --release` first")

    have_torch, torch_note = torch_available(a)
    rows = [("engine_1shard", "engine: worker bench, 2 threads, 1 shard", lambda: engine(a, 1)),
            ("engine_16shards", "engine: worker bench, 2 threads, 16 shards", lambda: engine(a, 16)),
            ("coord_w1", "coordinator --workers 1 --local", lambda: coordinator(a, 1)),
            ("coord_w4", "coordinator --workers 4 --local", lambda: coordinator(a, 4))]
    if have_torch:
        rows += [("torch_2t", "PyTorch, 2 threads, batch 128", lambda: torch_row(a, "speed")),
                 ("torch_ddp4", "PyTorch DDP gloo, 4 procs x 1 thread x 32", lambda: torch_row(a, "ddp"))]

    print(f"# distributed benchmark  {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M:%S %z}")
    print(f"# cpu: {cpu_model()} x {os.cpu_count()}  load: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          f"  commit: {commit}")
    print(f"# default model 784-400-20, global batch 128, {a.epochs} epoch(s); PyTorch: {torch_note}")
    if a.coord_args:
        print(f"# coordinator extra args: {' '.join(a.coord_args)}")
    raw = {key: [] for key, _, _ in rows}
    splits = {key: [] for key, _, _ in rows}
    for r in range(a.rounds):
        for key, label, fn in rows:
            t0 = time.time()
            value, split, out = fn()
            raw[key].append(value)
            splits[key].append(split)
            shown = f"{value:,.0f}" if value else "FAILED"
            print(f"  round {r + 1}/{a.rounds}  {label:<44} {shown:>9} samples/s  ({time.time() - t0:.0f}s)",
                  flush=True)
            if value is None or a.verbose:
                print("    " + "\n    ".join(out.strip().splitlines()[-15:]))

    def med(key):
        vals = [v for v in raw.get(key, []) if v]
        return statistics.median(vals) if vals else None

    print(f"\n{'row':<46} {'median':>9} {'min-max':>17}  split, ms/step (median)")
    for key, label, _ in rows:
        vals = [v for v in raw[key] if v]
        if not vals:
            print(f"{label:<46} {'FAILED':>9}")
            continue
        parts = [s for s in splits[key] if s]
        names = [k for k in SPLIT_KEYS if parts and k in parts[0]]
        names += [k for k in (parts[0] if parts else {}) if k not in names and k not in ("steps", "step_s")]
        split = "  ".join(f"{k[:-2]} {statistics.median(s[k] for s in parts):.2f}" for k in names)
        if parts and "step_s" in parts[0]:
            split = f"step {statistics.median(s['step_s'] for s in parts):.2f} = " + split
        print(f"{label:<46} {med(key):>9,.0f} {min(vals):>8,.0f}-{max(vals):<8,.0f}  {split}")

    print(f"\n{'ratio (of medians; per-round range)':<46} {'value':>7} {'target':>8}  verdict")
    for label, num, den, target in TARGETS + [(l, n, d, None) for l, n, d in INFO]:
        if med(num) is None or med(den) is None:
            print(f"{label:<46} {'-':>7} {'>= ' + format(target, 'g') if target else '':>8}  n/a")
            continue
        per_round = [x / y for x, y in zip(raw[num], raw[den]) if x and y]
        ratio = med(num) / med(den)
        verdict = ("PASS" if ratio >= target else "MISS") if target else "(info)"
        rng = f"({min(per_round):.2f}-{max(per_round):.2f})" if len(per_round) > 1 else ""
        print(f"{label:<46} {ratio:>6.2f}x {'>= ' + format(target, 'g') if target else '':>8}  {verdict} {rng}")

    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": datetime.datetime.now().astimezone().isoformat(), "cpu": cpu_model(),
                       "commit": commit, "rounds": a.rounds, "epochs": a.epochs,
                       "coordinator_args": a.coord_args, "torch": torch_note,
                       "samples_per_s": raw, "split_ms_per_step": splits}, f, indent=1)
        print(f"\nraw figures written to {a.json}")


if __name__ == "__main__":
    main()
