#!/usr/bin/env python3
"""Issue 8's target table: our engine, our distributed trainer and the PyTorch reference, run
side by side and interleaved, then the target ratios.

    cargo build --release
    python3 bench/distributed.py                       # 3 rounds, PyTorch rows if available
    /path/to/venv/bin/python bench/distributed.py      # a Python that has torch: adds its rows
    python3 bench/distributed.py --rounds 1 --no-torch --json out.json -- --transport tcp

Two builds against each other, interleaved (how docs/scaling.md measures each change: a few
percent is lost in this table's round-to-round noise but shows in pairs run back to back):

    git worktree add /tmp/base <rev>
    (cd /tmp/base && CARGO_TARGET_DIR=/tmp/base-target cargo build --release -p worker -p coordinator)
    mkdir -p /tmp/ab/old /tmp/ab/new
    cp /tmp/base-target/release/{coordinator,worker} /tmp/ab/old/
    cp target/release/{coordinator,worker} /tmp/ab/new/
    python3 bench/distributed.py --ab /tmp/ab/old /tmp/ab/new --rounds 5 --rows coord_w1,coord_w4

Arguments after `--` are passed to every `coordinator` run. Standard library only; the PyTorch
rows run `--torch-script` with `--torch-python` (default: this interpreter) and are skipped when
either is missing or has no torch. Each round runs every row once, so slow drift of a noisy
machine hits all rows alike; the table shows medians and min-max over rounds. Each target's line
also counts the rounds whose own ratio meets it, and rows whose rounds differ by more than 25% are
listed as noisy: on a machine with spells those say more than a ratio of medians.
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
# A row whose fastest round beats its slowest by more than this factor ran through a spell.
NOISY_SPREAD = 1.25
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


def engine(a, shards, bin_dir=None):
    cmd = [os.path.join(bin_dir or a.bin_dir, "worker"), "bench", "--batch", "128", "--threads", "2",
           "--seconds", str(a.seconds), "--shards", str(shards)]
    rc, out = run(cmd, 120 + 4 * a.seconds)
    return (samples_per_s(out) if rc == 0 else None), {}, out


def coordinator(a, workers, bin_dir=None):
    bin_dir = bin_dir or a.bin_dir
    with tempfile.TemporaryDirectory(prefix="vae-bench-") as tmp:
        cmd = [os.path.join(bin_dir, "coordinator"), "--workers", str(workers), "--local",
               "--epochs", str(a.epochs), "--iw-samples", "0", "--out", tmp] + a.coord_args
        # The local workers are this build's, not whatever worker sits beside another coordinator.
        env = dict(os.environ, VAE_WORKER_BIN=os.path.join(bin_dir, "worker"))
        rc, out = run(cmd, a.timeout, env)
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
        split["fingerprint"] = summary.get("fingerprint", "")
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
    """The CPU's name with what tells machines of one name apart: family and model numbers (a
    virtual machine often reports only "Intel(R) Xeon(R) Processor"), the widest vectors our
    kernels use, and whether it runs under a hypervisor."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    break  # the first processor's block ends
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown"
    flags = set(fields.get("flags", "").split())
    vectors = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags
               else "SSE2" if "sse2" in flags else platform.machine())
    guest = ", virtual machine" if "hypervisor" in flags else ""
    name = fields.get("model name") or platform.processor() or "unknown"
    return (f"{name} (family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')}, {vectors}{guest})")


def git_commit():
    """HEAD of this repository, `+dirty` when sources outside bench/ and docs/ differ from it."""
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()
    try:
        head = git("log", "-1", "--format=%h") or "unknown"
        dirty = git("status", "--porcelain", "--", ".", ":!bench", ":!docs")
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


# Our rows: key -> (label, run(a, bin_dir)). The target table adds PyTorch's; --ab picks from these.
OUR_ROWS = {
    "engine_1shard": ("engine: worker bench, 2 threads, 1 shard", lambda a, d: engine(a, 1, d)),
    "engine_16shards": ("engine: worker bench, 2 threads, 16 shards", lambda a, d: engine(a, 16, d)),
    "coord_w1": ("coordinator --workers 1 --local", lambda a, d: coordinator(a, 1, d)),
    "coord_w4": ("coordinator --workers 4 --local", lambda a, d: coordinator(a, 4, d)),
}


def require_binaries(bin_dir, hint):
    for b in ("worker", "coordinator"):
        if not os.access(os.path.join(bin_dir, b), os.X_OK):
            sys.exit(f"no {b} binary in {bin_dir}{hint}")


def fingerprint_verdict(old, new):
    """Whether two builds' runs of one row agree: one fingerprint each, the same."""
    if not (old or new):
        return ""
    if old == new and len(old) == 1:
        return "  same fingerprint"
    short = lambda prints: ",".join(sorted(f[:8] for f in prints))
    return f"  FINGERPRINTS DIFFER: old {short(old)} new {short(new)}"


def compare(a):
    """`--ab OLD NEW`: each row run with both builds back to back, the order swapped every round
    so that a machine drifting one way favours neither; then per row the medians and in how many
    rounds the new build was faster, and whether the two builds' fingerprints agree."""
    old, new = a.ab
    keys = [k.strip() for k in a.rows.split(",") if k.strip()]
    unknown = [k for k in keys if k not in OUR_ROWS]
    if unknown or not keys:
        sys.exit(f"--rows: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(OUR_ROWS)}")
    for d in (old, new):
        require_binaries(d, " (--ab)")
    print(f"# A/B  {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M:%S %z}  cpu: {cpu_model()} x "
          f"{os.cpu_count()}\n# old: {old}\n# new: {new}")
    if a.coord_args:
        print(f"# coordinator extra args: {' '.join(a.coord_args)}")
    got = {k: {"old": [], "new": []} for k in keys}
    prints = {k: {"old": set(), "new": set()} for k in keys}
    for r in range(a.rounds):
        for key in keys:
            label, fn = OUR_ROWS[key]
            for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                value, split, out = fn(a, old if side == "old" else new)
                got[key][side].append(value)
                if split.get("fingerprint"):
                    prints[key][side].add(split["fingerprint"])
                parts = "  ".join(f"{k[:-2]} {split[k]:.3f}" for k in SPLIT_KEYS if k in split)
                shown = f"{value:,.0f}" if value else "FAILED"
                print(f"  round {r + 1}/{a.rounds}  {label:<44} {side:<3} {shown:>9} samples/s"
                      f"  {parts + ' ms/step' if parts else ''}", flush=True)
                if value is None or a.verbose:
                    print("    " + "\n    ".join(out.strip().splitlines()[-15:]))
    print(f"\n{'row':<44} {'old median':>11} {'new median':>11} {'new/old':>8}  new faster")
    for key in keys:
        o, n = got[key]["old"], got[key]["new"]
        pairs = [(x, y) for x, y in zip(o, n) if x and y]
        if not pairs:
            print(f"{OUR_ROWS[key][0]:<44} {'FAILED':>11}")
            continue
        mo, mn = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        faster = sum(y > x for x, y in pairs)
        same = fingerprint_verdict(prints[key]["old"], prints[key]["new"])
        print(f"{OUR_ROWS[key][0]:<44} {mo:>11,.0f} {mn:>11,.0f} {mn / mo:>7.3f}x  {faster} of {len(pairs)}{same}")


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
    p.add_argument("--ab", nargs=2, metavar=("OLD_DIR", "NEW_DIR"),
                   help="compare two builds (directories holding `coordinator` and `worker`), interleaved")
    p.add_argument("--rows", default="coord_w1,coord_w4",
                   help=f"with --ab, the rows to run, comma-separated: {', '.join(OUR_ROWS)}")
    a = p.parse_args(argv)
    a.coord_args = shlex.split(a.coordinator_args) + extra
    a.torch_script = os.path.normpath(a.torch_script)
    commit = a.commit or git_commit()
    if a.rounds < 1:
        sys.exit("--rounds must be at least 1")
    if a.ab:
        return compare(a)
    require_binaries(a.bin_dir, ": run `cargo build --release` first")

    have_torch, torch_note = torch_available(a)
    rows = [(key, label, lambda fn=fn: fn(a, None)) for key, (label, fn) in OUR_ROWS.items()]
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
        names += [k for k in (parts[0] if parts else {})
                  if k not in names and k not in ("steps", "step_s", "fingerprint")]
        split = "  ".join(f"{k[:-2]} {statistics.median(s[k] for s in parts):.2f}" for k in names)
        if parts and "step_s" in parts[0]:
            split = f"step {statistics.median(s['step_s'] for s in parts):.2f} = " + split
        print(f"{label:<46} {med(key):>9,.0f} {min(vals):>8,.0f}-{max(vals):<8,.0f}  {split}")

    print(f"\n{'ratio (medians; round range, rounds met)':<46} {'value':>7} {'target':>8}  verdict")
    for label, num, den, target in TARGETS + [(l, n, d, None) for l, n, d in INFO]:
        if med(num) is None or med(den) is None:
            print(f"{label:<46} {'-':>7} {'>= ' + format(target, 'g') if target else '':>8}  n/a")
            continue
        per_round = [x / y for x, y in zip(raw[num], raw[den]) if x and y]
        ratio = med(num) / med(den)
        verdict = ("PASS" if ratio >= target else "MISS") if target else "(info)"
        rng = f"({min(per_round):.2f}-{max(per_round):.2f})" if len(per_round) > 1 else ""
        if target and a.rounds > 1:
            # Within one round the two rows ran minutes apart at most: a count of rounds that
            # meet the target says more than one ratio of medians when the machine has spells.
            met = sum(r >= target for r in per_round)
            rng += f" met in {met} of {len(per_round)} rounds"
            if len(per_round) < a.rounds:
                rng += f" ({a.rounds - len(per_round)} with a failed row)"
        print(f"{label:<46} {ratio:>6.2f}x {'>= ' + format(target, 'g') if target else '':>8}  {verdict} {rng}")

    noisy = [(label, min(v), max(v)) for key, label, _ in rows
             for v in [[x for x in raw[key] if x]] if len(v) > 1 and max(v) > NOISY_SPREAD * min(v)]
    if noisy:
        print(f"\nnoisy rows (fastest round over {NOISY_SPREAD - 1:.0%} above the slowest: the same binary, so "
              "the machine's spells;\nratios with these rows move as much: rerun, or read the per-round counts):")
        for label, lo, hi in noisy:
            print(f"  {label:<44} {lo:>9,.0f}-{hi:<9,.0f} ({hi / lo:.2f}x)")

    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": datetime.datetime.now().astimezone().isoformat(), "cpu": cpu_model(),
                       "commit": commit, "rounds": a.rounds, "epochs": a.epochs,
                       "coordinator_args": a.coord_args, "torch": torch_note,
                       "samples_per_s": raw, "split_ms_per_step": splits}, f, indent=1)
        print(f"\nraw figures written to {a.json}")


if __name__ == "__main__":
    main()
