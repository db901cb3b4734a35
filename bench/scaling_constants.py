#!/usr/bin/env python3
"""Measures the constants of docs/scaling.md's step-time model from runs of our own binaries,
checks the model against the local runs (W = 1..4), and prints its predictions for W = 1..256.

    cargo build --release
    python3 bench/scaling_constants.py --json bench/scaling.json   # measure (~15 min), predict
    python3 bench/scaling_constants.py --from bench/scaling.json   # predict again, no runs
    python3 bench/scaling_constants.py --from F --rebench --json F # benches again (noisy machine)
    python3 bench/scaling_constants.py -- --transport tcp          # extra coordinator flags

Standard library only. Every figure is printed beside the command that produced it, the commit
and the time, so docs/scaling.md can be refreshed by pasting. Waits (up to --max-wait seconds)
for the 1-minute load average to drop below --max-load before measuring.
"""
import argparse, datetime, json, math, os, re, shlex, signal, statistics, subprocess, sys
import tempfile, threading, time

from distributed import git_commit  # bench/distributed.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (hidden, latent). Parameter counts are read back from each run's model.safetensors.
MODELS = {"tiny": ("1", 1), "default": ("400", 20), "wide": ("1024", 64), "large": ("1024,1024", 64)}
LINKS = {"10GbE": (1.1e9, 50e-6), "100GbE": (11e9, 20e-6)}  # assumed effective bytes/s, RTT
WS = [1, 4, 16, 64, 256]
CHUNK = 256 * 1024  # bytes per pipelined chunk in the tree designs
LOOPBACK_BYTES = 4 * 652_824  # the default model's parameters: one task's or one result's tensor


def run(cmd, timeout=900):
    """Runs cmd in its own process group; returns (rc, output, CPU seconds of the process itself,
    CPU seconds of its descendants), CPU read from /proc every 50 ms (0 where there is no /proc)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    out, cpu, start = [], {}, time.time()
    reader = threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True)
    reader.start()
    while p.poll() is None:
        for pid in family(p.pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                cpu[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
        if time.time() - start > timeout:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return -1, "".join(out), 0.0, 0.0
        time.sleep(0.05)
    reader.join()
    own = cpu.pop(p.pid, 0.0)
    return p.returncode, "".join(out), own, sum(cpu.values())


def family(pid):
    """pid and its descendants, from /proc/PID/task/TID/children."""
    todo, seen = [pid], []
    while todo:
        q = todo.pop()
        seen.append(q)
        try:
            for tid in os.listdir(f"/proc/{q}/task"):
                with open(f"/proc/{q}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return seen


COMMIT = None  # of the binaries measured: --commit, else git_commit()


def stamp():
    return {"commit": COMMIT or git_commit(), "time": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "load": round(os.getloadavg()[0], 2)}


def wait_for_quiet(a):
    waited = 0
    while os.getloadavg()[0] > a.max_load and waited < a.max_wait:
        print(f"  load {os.getloadavg()[0]:.2f} > {a.max_load}: waiting 30 s", flush=True)
        time.sleep(30)
        waited += 30
        a.max_wait -= 30  # a budget over the whole script


def param_count(path):
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def bench(a, model, batch, shards, threads):
    hidden, latent = MODELS[model]
    cmd = [os.path.join(a.bin_dir, "worker"), "bench", "--hidden", hidden, "--latent", str(latent),
           "--batch", str(batch), "--shards", str(shards), "--threads", str(threads),
           "--seconds", str(a.seconds)]
    tries = []
    for _ in range(a.bench_repeats):  # the least disturbed of a few runs
        wait_for_quiet(a)
        rc, out, _, _ = run(cmd)
        med = re.search(r"step time: median ([0-9.]+) ms", out)
        adam = re.search(r"optimizer \(Adam\)\s+([0-9.]+) ms", out)
        if rc != 0 or not med:
            sys.exit(f"failed: {' '.join(cmd)}\n{out}")
        tries.append((float(med.group(1)) / 1e3, float(adam.group(1)) / 1e3 if adam else 0.0))
    step, opt = min(tries)
    r = {"cmd": " ".join(cmd[1:]).replace(a.bin_dir + "/", ""), "step_s": step, "adam_s": opt,
         "grad_s": step - opt, "per_example_s": (step - opt) / batch, **stamp()}
    print(f"  {r['cmd']}: step {step * 1e3:.3f} ms, Adam {opt * 1e3:.3f} ms", flush=True)
    return r


def coord(a, model, workers, steps, batch=128, epochs=2):
    """A run of `epochs` epochs of `steps` steps. Its per-step figures are the means of the epochs
    after the first: the first also carries one-time costs (connecting, registering, every shard's
    rows sent to the workers; in one traced 120-step run over TCP, 1.4 ms a step: docs/scaling.md
    section 40), which are no part of a step's cost."""
    hidden, latent = MODELS[model]
    holdout = 256
    with tempfile.TemporaryDirectory(prefix="vae-scaling-") as tmp:
        cmd = [os.path.join(a.bin_dir, "coordinator"), "--workers", str(workers), "--local",
               "--hidden", hidden, "--latent", str(latent), "--batch", str(batch),
               "--data", f"synthetic:{steps * batch + holdout}", "--holdout", str(holdout),
               "--epochs", str(epochs), "--iw-samples", "0", "--checkpoint-every", "0",
               "--checkpoint-seconds", "0", "--out", tmp] + a.extra
        wait_for_quiet(a)
        rc, out, cpu_coord, cpu_workers = run(cmd)
        if rc != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{out[-3000:]}")
        lines = [json.loads(l) for l in open(os.path.join(tmp, "metrics.jsonl")) if l.strip()]
        def means(lines):
            n = sum(l["examples"] for l in lines) / batch
            return {k.replace("_s", "_ms"): sum(l[k] for l in lines) / n * 1e3
                    for k in lines[0] if k.endswith("_s") and k != "samples_per_s"}
        steady, first = means(lines[1:] or lines), means(lines[:1])
        params = param_count(os.path.join(tmp, "model.safetensors"))
    shown = " ".join(cmd[1:]).replace(tmp, "DIR")
    r = {"cmd": shown, "model": model, "workers": workers, "batch": batch, "steps": steps,
         "epochs": epochs, "params": params, "cpu_coordinator_s": cpu_coord, "cpu_workers_s": cpu_workers,
         **steady, "first_epoch": first, **stamp()}
    print(f"  W={workers} {model:<7} P={params:>9,} x {epochs} epochs: step {r['step_ms']:.2f} = compute "
          f"{r['compute_ms']:.2f} + comm {r['communicate_ms']:.2f} + update {r['update_ms']:.2f} ms "
          f"(first epoch: comm {first['communicate_ms']:.2f})", flush=True)
    return r


def loopback_socket(payload, rounds=200):
    """The floor under our TCP path on this host: the median round trip of `payload` bytes each
    way through a plain TCP socket (TCP_NODELAY) between two processes, in seconds."""
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port, data = srv.getsockname()[1], b"\0" * payload

    def receive(conn, into):
        got = 0
        while got < payload:
            k = conn.recv_into(memoryview(into)[got:])
            if k == 0:
                return False
            got += k
        return True

    child = os.fork()
    if child == 0:  # the echoing peer
        try:
            conn, _ = srv.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            into = bytearray(payload)
            while receive(conn, into):
                conn.sendall(data)
        finally:
            os._exit(0)
    srv.close()
    times = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        into = bytearray(payload)
        for _ in range(rounds):
            t = time.perf_counter()
            s.sendall(data)
            receive(s, into)
            times.append(time.perf_counter() - t)
    os.waitpid(child, 0)
    return statistics.median(times)


def fit(xs, ys):
    """Least squares y = a + b x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


BENCHES = [("default", 128, 16, 1), ("default", 128, 16, 2), ("default", 32, 4, 2), ("default", 8, 1, 2),
           ("large", 1024, 16, 1), ("large", 1024, 16, 2), ("large", 256, 4, 2), ("large", 64, 1, 2),
           ("large", 16, 1, 2), ("large", 4, 1, 2)]


def measure(a):
    m = {"stamp": stamp(), "bench": {}, "runs": []}
    print("compute per example (worker bench; Adam timed alone and subtracted)")
    for model, batch, shards, threads in BENCHES:
        m["bench"][f"{model}/{batch}/{shards}/{threads}"] = bench(a, model, batch, shards, threads)
    print("a plain TCP socket between two processes on this host (median round trip)")
    wait_for_quiet(a)
    m["loopback"] = {"small_bytes": 8, "small_rt_s": loopback_socket(8),
                     "large_bytes": LOOPBACK_BYTES, "large_rt_s": loopback_socket(LOOPBACK_BYTES), **stamp()}
    for size in ("small", "large"):
        print(f"  {m['loopback'][size + '_bytes']:>9,} bytes each way: {m['loopback'][size + '_rt_s'] * 1e3:.3f} ms")
    print("coordinator runs (per-step means from metrics.jsonl after the first epoch; CPU seconds from /proc)")
    n, h = a.steps, a.steps // 2
    # Each (model, W) measured twice differs by one epoch of the same data: the difference of
    # their CPU seconds is that epoch's, without the run's one-time costs.
    plan = [("tiny", w, n, 128, 2) for w in (1, 2, 3, 4)] + [("default", w, n, 128, 2) for w in (1, 2, 3, 4)]
    plan += [("tiny", 1, n, 128, 3), ("tiny", 4, n, 128, 3)]
    plan += [("default", 1, n, 128, 3), ("default", 4, n, 128, 3), ("wide", 1, h, 128, 2)]
    plan += [("large", w, h, 128, 2) for w in (1, 2, 4)] + [("large", 1, h, 128, 3), ("large", 4, h, 128, 3)]
    plan += [("large", 1, 24, 1024, 2), ("large", 4, 24, 1024, 2)]
    for model, w, steps, batch, epochs in plan:
        m["runs"].append(coord(a, model, w, steps, batch, epochs))
    return m


def constants(m):
    runs = m["runs"]
    def get(model, w, b=128, longest=False):
        rs = sorted((r for r in runs if r["model"] == model and r["workers"] == w and r["batch"] == b),
                    key=lambda r: (r.get("epochs", 1), r["steps"]))
        return rs[-1] if longest else rs[0]
    c = {"params": {k: get(k, 1)["params"] for k in MODELS}}
    # (1) per-step overhead: the tiny model moves ~19 KB a step, so its communication is overhead
    tiny = [get("tiny", w) for w in (1, 2, 3, 4)]
    c["alpha_w1_s"] = tiny[0]["communicate_ms"] / 1e3
    c["alpha0_s"], c["alpha1_s"] = [x / 1e3 for x in fit([r["workers"] for r in tiny], [r["communicate_ms"] for r in tiny])]
    # (2) bytes per second of the whole path at W=1: communication against the 8P bytes a step moves
    w1 = [get(k, 1) for k in MODELS]
    c["path_a_s"], b = fit([8 * r["params"] for r in w1], [r["communicate_ms"] / 1e3 for r in w1])
    c["path_bytes_per_s"] = 1 / b
    # (3) coordinator CPU per step and per extra worker: CPU of a run one epoch longer minus the other's
    for model in ("tiny", "default", "large"):
        for w in (1, 4):
            lo, hi = get(model, w), get(model, w, longest=True)
            # (Files measured before runs had epochs: one run of 2N steps, one of N.)
            if "epochs" in hi:
                assert hi["steps"] == lo["steps"] and hi["epochs"] > lo["epochs"], (lo["cmd"], hi["cmd"])
                dn = (hi["epochs"] - lo["epochs"]) * hi["steps"]
            else:
                dn = hi["steps"] - lo["steps"]
            c[f"coord_cpu_step_s_{model}_w{w}"] = (hi["cpu_coordinator_s"] - lo["cpu_coordinator_s"]) / dn
            c[f"worker_cpu_step_s_{model}_w{w}"] = (hi["cpu_workers_s"] - lo["cpu_workers_s"]) / dn / w
        c[f"coord_cpu_per_worker_s_{model}"] = (c[f"coord_cpu_step_s_{model}_w4"] - c[f"coord_cpu_step_s_{model}_w1"]) / 3
    ks = ("tiny", "default", "large")
    c["coord_cpu_per_msg_s"], c["coord_cpu_per_byte_s"] = fit(
        [8 * c["params"][k] for k in ks], [c[f"coord_cpu_per_worker_s_{k}"] for k in ks])
    # (4) update on the coordinator: Adam per parameter (W=1), tree sum per parameter per extra worker
    for model in ("default", "large"):
        rs = [r for r in runs if r["model"] == model and r["batch"] == 128]
        i, s = fit([r["workers"] for r in rs], [r["update_ms"] / 1e3 for r in rs])
        c[f"update_w1_per_param_s_{model}"] = (i + s) / c["params"][model]
        c[f"reduce_per_param_s_{model}"] = max(s, 0.0) / c["params"][model]
    c["adam_per_param_s_bench"] = m["bench"]["large/1024/16/2"]["adam_s"] / c["params"]["large"]
    c["adam_per_param_s"] = c["update_w1_per_param_s_large"]
    c["reduce_per_param_s"] = c["reduce_per_param_s_large"]
    lb = m.get("loopback")
    if lb:  # two transfers a round trip
        c["loopback_latency_s"] = lb["small_rt_s"]
        c["loopback_bytes_per_s"] = 2 * (lb["large_bytes"] - lb["small_bytes"]) / (lb["large_rt_s"] - lb["small_rt_s"])
    return c


def compute_s(m, model, per_worker_batch):
    """Per-worker gradient time at this per-worker batch (2 threads), interpolating the per-example
    cost log-linearly in the batch between the benched batches."""
    pts = sorted((int(k.split("/")[1]), v["per_example_s"]) for k, v in m["bench"].items()
                 if k.startswith(model + "/") and k.endswith("/2"))
    b = min(max(per_worker_batch, pts[0][0]), pts[-1][0])
    for (b0, c0), (b1, c1) in zip(pts, pts[1:]):
        if b0 <= b <= b1:
            t = math.log(b / b0) / math.log(b1 / b0)
            return per_worker_batch * (c0 + t * (c1 - c0))
    return per_worker_batch * pts[0][1]


def comm_star_local(c, p, w):
    """Communication per step of the star on loopback: W=1 path plus the coordinator's CPU for each
    extra worker (its share of the tree sum is counted in the update)."""
    extra = c["coord_cpu_per_msg_s"] + 8 * p * c["coord_cpu_per_byte_s"] - p * c["reduce_per_param_s"]
    return c["path_a_s"] + 8 * p / c["path_bytes_per_s"] + (w - 1) * max(extra, 0.0)


def step_time(m, c, model, batch, shards, W, link, design):
    """(compute, communication, update) seconds of one step."""
    p, wk = c["params"][model], min(W, shards)  # workers beyond the shards get no tree node
    comp = compute_s(m, model, batch / wk)
    if design == "compute":
        return comp, 0.0, 0.0
    bw, rtt = LINKS[link]
    wire_only = design.endswith("wire")
    if design.startswith("star"):
        sw = 0.0 if wire_only else comm_star_local(c, p, wk)
        comm = sw + rtt + 8 * p * wk / bw  # every byte through the coordinator's link, no overlap
        upd = p * (c["adam_per_param_s"] + c["reduce_per_param_s"] * (wk - 1))
    elif design.startswith("ptree"):  # tree reduce to the coordinator, tree broadcast, both pipelined
        hops = (math.ceil(math.log2(wk)) if wk > 1 else 0) + 1  # the root worker sends to the coordinator
        sw = 0.0 if wire_only else 1 / c["path_bytes_per_s"]
        per_hop = rtt / 2 + CHUNK / bw + (0.0 if wire_only else c["alpha_w1_s"] / 2)
        comm = 2 * (4 * p * (1 / bw + sw) + hops * per_hop)  # up, then down
        upd = p * (c["adam_per_param_s"] + c["reduce_per_param_s"] * min(wk - 1, 1))  # adds pipelined
    else:  # reduce-scatter by recursive halving along the fixed tree, sharded Adam, all-gather
        hops = 2 * math.ceil(math.log2(wk)) if wk > 1 else 0
        moved = 2 * (wk - 1) / wk * 4 * p  # through each worker's link
        per_hop = rtt / 2 + (0.0 if wire_only else c["alpha_w1_s"] / 2)
        comm = hops * per_hop + moved * (1 / bw + (0.0 if wire_only else 1 / c["path_bytes_per_s"]))
        upd = p / wk * c["adam_per_param_s"] + (wk - 1) / wk * p * c["reduce_per_param_s"]
    return comp, comm, upd


DESIGNS = [("star", "star, today's software"), ("star-wire", "star, wire only"),
           ("ptree-wire", "pipelined tree to coordinator, wire only"),
           ("tree", "reduce-scatter + sharded Adam, today's software"),
           ("tree-wire", "reduce-scatter + sharded Adam, wire only")]


def report(m, c):
    s = m["stamp"]
    ms, ns = lambda x: f"{x * 1e3:.3f} ms", lambda x: f"{x * 1e9:.2f} ns"
    print(f"\n## constants (commit {s['commit']}, {s['time']}, load {s['load']})")
    print(f"per-step overhead at W=1 (tiny model's communicate):  {ms(c['alpha_w1_s'])}")
    print(f"  fit over W=1..4:                                     {ms(c['alpha0_s'])} + {ms(c['alpha1_s'])} x W")
    print(f"path bytes/s at W=1 (fit of communicate vs 8P):        {c['path_bytes_per_s'] / 1e9:.3f} GB/s, "
          f"intercept {ms(c['path_a_s'])}")
    for k in ("tiny", "default", "large"):
        print(f"coordinator CPU per step, {k}: W=1 {ms(c[f'coord_cpu_step_s_{k}_w1'])}, W=4 "
              f"{ms(c[f'coord_cpu_step_s_{k}_w4'])}; worker CPU per step per worker: W=1 "
              f"{ms(c[f'worker_cpu_step_s_{k}_w1'])}, W=4 {ms(c[f'worker_cpu_step_s_{k}_w4'])}")
    print(f"coordinator CPU per extra worker: {ms(c['coord_cpu_per_msg_s'])} + {ns(c['coord_cpu_per_byte_s'])}/byte"
          f" (= {1 / c['coord_cpu_per_byte_s'] / 1e9 if c['coord_cpu_per_byte_s'] > 0 else float('inf'):.2f} GB/s)")
    for k in ("default", "large"):
        print(f"update per parameter at W=1 ({k}): {ns(c[f'update_w1_per_param_s_{k}'])}; "
              f"tree sum per parameter per extra worker: {ns(c[f'reduce_per_param_s_{k}'])}")
    print(f"Adam per parameter, worker bench (large model, 2 threads): {ns(c['adam_per_param_s_bench'])}")
    if "loopback_bytes_per_s" in c:
        print(f"plain TCP socket on this host: round trip {ms(c['loopback_latency_s'])}, "
              f"{c['loopback_bytes_per_s'] / 1e9:.3f} GB/s (two 4P-byte transfers of the default model)")
    print(f"parameters: {c['params']}")
    print("\n## compute (worker bench; gradient = step - Adam)")
    for k, r in m["bench"].items():
        print(f"  {r['cmd']:<88} {r['grad_s'] * 1e3:8.3f} ms {r['per_example_s'] * 1e6:8.2f} us/example")
    print("\n## check: local runs (loopback) against the model; ms per step")
    print("| run | W | steps x epochs | step | compute | bench compute | comm | comm model | update | update model |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in m["runs"]:
        if r["model"] in ("tiny", "wide"):
            continue
        p, w, b = r["params"], r["workers"], r["batch"]
        bench_c = compute_s(m, r["model"], b / w) if r["model"] in ("default", "large") else float("nan")
        upd = p * (c["adam_per_param_s"] + c["reduce_per_param_s"] * (w - 1))
        print(f"| {r['model']} b={b} | {w} | {r['steps']:.0f} x {r.get('epochs', 1)} | {r['step_ms']:.2f} | {r['compute_ms']:.2f} | "
              f"{bench_c * 1e3:.2f} | {r['communicate_ms']:.2f} | {comm_star_local(c, p, w) * 1e3:.2f} | "
              f"{r['update_ms']:.2f} | {upd * 1e3:.2f} |")
    for model, batch, shards, weak in [("default", 128, 16, False), ("large", 1024, 16, False),
                                       ("large", 1024, 256, False), ("default", 128, 16, True)]:
        base = compute_s(m, model, batch)  # one worker, compute only: the efficiency yardstick
        p = c["params"][model]
        scale = (lambda w: w) if weak else (lambda w: 1)  # weak scaling: batch and shards grow with W
        what = (f"per-worker batch {batch} (global {batch} W), {shards} W shards" if weak
                else f"global batch {batch}, {shards} shards")
        print(f"\n## prediction: {model} ({p:,} parameters), {what}; "
              f"samples/s (efficiency vs W x one worker's compute-only speed)")
        print("| link | design | " + " | ".join(f"W={w}" for w in WS) + " |")
        print("|---|---|" + "---|" * len(WS))
        rows = [("-", "compute only")] + [(l, d) for l in LINKS for d in DESIGNS]
        for link, design in rows:
            key, label = (design if isinstance(design, tuple) else ("compute", design))
            cells = []
            for w in WS:
                t = sum(step_time(m, c, model, batch * scale(w), shards * scale(w), w,
                                  link if link != "-" else "10GbE", key))
                sps = batch * scale(w) / t
                cells.append(f"{sps:,.0f} ({100 * sps / (w * batch / base):.0f}%)")
            print(f"| {link} | {label} | " + " | ".join(cells) + " |")
        for link, (bw, _) in LINKS.items():
            if weak:
                sat = next((w for w in range(1, 4097) if 8 * p * w / bw > compute_s(m, model, batch)), None)
                print(f"{link}: the star's coordinator link needs longer than a worker's compute from W = {sat}")
                continue
            sat = next((w for w in range(1, 4097)
                        if 8 * p * min(w, shards) / bw > compute_s(m, model, batch / min(w, shards))), None)
            star = [step_time(m, c, model, batch, shards, w, link, "star-wire") for w in (1, 16)]
            print(f"{link}: the coordinator link's transfer (8 P W / bandwidth = {8 * p / bw * 1e3:.2f} ms x W) "
                  f"exceeds a worker's compute from W = {sat}; at W = 16 the wire alone costs "
                  f"{star[1][1] * 1e3:.1f} ms a step against {star[1][0] * 1e3:.1f} ms of compute")


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    p.add_argument("--json", help="save measurements and constants here")
    p.add_argument("--from", dest="source", help="predict from saved measurements; run nothing")
    p.add_argument("--rebench", action="store_true",
                   help="with --from: run the worker benches again, keep the faster of each")
    p.add_argument("--steps", type=int, default=120, help="steps per epoch of each coordinator run (large: half)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per worker bench")
    p.add_argument("--bench-repeats", type=int, default=2, help="runs of each bench; the fastest counts")
    p.add_argument("--commit", help="label of the binaries' source [default: this repository's HEAD]")
    p.add_argument("--max-load", type=float, default=1.5)
    p.add_argument("--max-wait", type=float, default=600)
    a = p.parse_args(argv)
    a.extra = extra
    global COMMIT
    COMMIT = a.commit
    if a.source:
        m = json.load(open(a.source))
        if a.rebench:  # measure the benches again; keep each one's faster run
            for model, batch, shards, threads in BENCHES:
                key = f"{model}/{batch}/{shards}/{threads}"
                r = bench(a, model, batch, shards, threads)
                if key not in m["bench"] or r["step_s"] < m["bench"][key]["step_s"]:
                    m["bench"][key] = r
    else:
        m = measure(a)
        m["extra_args"] = extra
    c = constants(m)
    m["constants"] = c
    if a.json:
        with open(a.json, "w") as f:
            json.dump(m, f, indent=1)
    report(m, c)


if __name__ == "__main__":
    main()
