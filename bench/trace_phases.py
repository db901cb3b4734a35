#!/usr/bin/env python3
"""Where a step goes: the median time between consecutive trace events of the same run.

    RUST_LOG=worker=trace,coordinator=trace VAE_LOG_FORMAT=json \\
        coordinator --workers 1 --local --epochs 1 --iw-samples 0 > run.log 2>&1
    python3 bench/trace_phases.py run.log                 # steps 100-400
    python3 bench/trace_phases.py run.log --steps 130 235

The coordinator and its workers log `step N: <event>` messages at trace level (JSON lines with
`VAE_LOG_FORMAT=json`). This sorts every such event of the steps asked for by time, and prints,
in order of first appearance, the median gap between each pair of consecutive events that occurs
in at least a third of the steps, then the median time between one `task received` and the next
(a step). Gaps are between events whatever their process, so the phases of a 1-worker run read
as one timeline. With several workers, each worker's events (which carry its id when tracing is
on for the worker, as `RUST_LOG=worker=trace` does) and the coordinator's events about its
results are read as that worker's timeline, together with the events that name no worker (the
update's, among others) in the steps where that worker has events of its own; the medians are
over all workers' timelines, and each worker's step follows. docs/scaling.md §31 onwards report
these medians. Standard library only.
"""
import argparse, collections, datetime, json, re, statistics

STEP_EVENT = re.compile(r"step (\d+): (.*)")


def timestamp(text):
    """Seconds since the epoch of an RFC 3339 UTC time, to the microsecond or finer."""
    main, _, frac = text.rstrip("Z").partition(".")
    whole = datetime.datetime.fromisoformat(main).replace(tzinfo=datetime.timezone.utc)
    return whole.timestamp() + float("0." + (frac or "0"))


def events(path):
    """(time, step, event, worker) of every `step N: event` trace message in the log, sorted by
    time; `worker` is the id the event names (a field, or its span's), else None."""
    found = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            message = entry.get("fields", {}).get("message") or entry.get("message") or ""
            m = STEP_EVENT.match(message)
            if m and "timestamp" in entry:
                worker = entry.get("worker") or (entry.get("span") or {}).get("worker")
                found.append((timestamp(entry["timestamp"]), int(m.group(1)), m.group(2), worker))
    return sorted(found, key=lambda e: e[:3])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", help="the run's output, JSON lines")
    p.add_argument("--steps", nargs=2, type=int, default=(100, 400), metavar=("FIRST", "LAST"),
                   help="the steps whose events count [default: 100 400]")
    a = p.parse_args()
    first, last = a.steps
    trace = events(a.log)
    # Numbers in an event (a worker's id, a step) are not part of its name.
    name = lambda event: re.sub(r"\d+", "N", event)[:50]
    workers = sorted({w for _, _, _, w in trace if w is not None})
    # One timeline per worker: its own events, and those that name no worker (the update's) in
    # the steps it has events in (a worker that registers again gets a new id mid-run).
    steps_of = {w: {step for _, step, _, v in trace if v == w} for w in workers}
    timelines = {
        w: [e[:3] for e in trace if e[3] == w or (e[3] is None and e[1] in steps_of[w])]
        for w in workers
    }
    if len(workers) <= 1:
        timelines = {workers[0] if workers else None: [e[:3] for e in trace]}
    gaps, order = collections.defaultdict(list), {}
    for timeline in timelines.values():
        for (t0, step, e0), (t1, _, e1) in zip(timeline, timeline[1:]):
            if first <= step <= last:
                pair = (name(e0), name(e1))
                gaps[pair].append((t1 - t0) * 1e3)
                order.setdefault(pair, len(order))
    if not gaps:
        raise SystemExit(f"{a.log}: no `step N: ...` trace events in steps {first}-{last} "
                         "(run with RUST_LOG=worker=trace,coordinator=trace VAE_LOG_FORMAT=json)")
    if len(timelines) > 1:
        print(f"{len(timelines)} workers; phases over all their timelines")
    print(f"{'median ms':>10} {'count':>6}  from -> to")
    for pair in sorted(gaps, key=order.get):
        if len(gaps[pair]) >= (last - first) // 3:
            print(f"{statistics.median(gaps[pair]):10.3f} {len(gaps[pair]):6d}  {pair[0]} -> {pair[1]}")
    for worker, timeline in timelines.items():
        starts = [t for t, step, e in timeline
                  if e.startswith("task received") and first <= step <= last]
        if len(starts) > 2:
            step = statistics.median(b - a for a, b in zip(starts, starts[1:]))
            label = "step (task received -> next task received)"
            if len(timelines) > 1:
                label += f", worker {worker}"
            print(f"{step * 1e3:10.3f} {len(starts) - 1:6d}  {label}")


if __name__ == "__main__":
    main()
