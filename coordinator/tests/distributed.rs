//! End-to-end: the real binaries on 127.0.0.1, ephemeral ports, a small built-in dataset.

mod common;

use std::time::Duration;

use common::{Coordinator, SMALL_RUN, finish_worker, metrics, summary, train, worker};

#[test]
fn four_workers_train_and_the_heldout_elbo_improves() {
    let out = tempfile::tempdir().unwrap();
    train(out.path(), 4, &[]);
    let m = metrics(out.path());
    assert_eq!(m.len(), 2, "one metrics line per epoch");
    for line in &m {
        for key in [
            "epoch",
            "train_elbo",
            "heldout_elbo",
            "recon",
            "kl",
            "samples_per_s",
            "compute_s",
            "communicate_s",
        ] {
            assert!(line.get(key).is_some(), "metrics line lacks {key}: {line}");
        }
    }
    let first = m[0]["heldout_elbo"].as_f64().unwrap();
    let last = m[1]["heldout_elbo"].as_f64().unwrap();
    assert!(
        last > first,
        "held-out ELBO did not improve: {first} -> {last}"
    );
    let s = summary(out.path());
    assert!(s["samples_per_s"].as_f64().unwrap() > 0.0);
    assert!(s["heldout_iw_bound"].as_f64().unwrap() >= s["heldout_elbo"].as_f64().unwrap() - 0.5);
    assert_eq!(s["fingerprint"].as_str().unwrap().len(), 64);
    for file in ["model.safetensors", "config.json", "checkpoint.safetensors"] {
        assert!(out.path().join(file).is_file(), "{file} missing");
    }
}

/// The fingerprint of a clean 1-worker run, and a coordinator of the same run waiting for two
/// workers (the tests below start them, one misbehaving).
#[cfg(debug_assertions)]
fn reference_and_two_worker_run() -> (String, tempfile::TempDir, Coordinator) {
    let clean = tempfile::tempdir().unwrap();
    let reference = train(clean.path(), 1, &["--epochs", "1"]);
    let out = tempfile::tempdir().unwrap();
    let mut args = SMALL_RUN.to_vec();
    args.extend_from_slice(&["--workers", "2", "--epochs", "1"]);
    let c = Coordinator::start(out.path(), &args);
    (reference, out, c)
}

// The fault-injection hook exists only in debug builds of the worker.
#[cfg(debug_assertions)]
#[test]
fn a_worker_that_heartbeats_but_never_answers_does_not_stall_the_run() {
    let (reference, out, c) = reference_and_two_worker_run();
    let good = worker(&c.addr, &[]);
    let mut stuck = worker(&c.addr, &["--inject-fault", "stall@3"]);
    let (ok, log) = c.finish(Duration::from_secs(240));
    let _ = stuck.kill();
    let _ = stuck.wait();
    assert!(ok, "{log}");
    assert!(
        log.contains("computes them too"),
        "a backup was issued: {log}"
    );
    assert!(
        log.contains("held its work"),
        "the stuck worker was removed: {log}"
    );
    assert!(finish_worker(good, Duration::from_secs(30)).0.success());
    assert_eq!(
        summary(out.path())["fingerprint"].as_str().unwrap(),
        reference,
        "backups change no bit"
    );
}

#[test]
fn shared_memory_and_tcp_give_the_same_fingerprint() {
    const ATTACHED: &str = "exchanges tensors through shared memory";
    let run = |coordinator: &[&str], workers: &[&[&str]]| {
        let out = tempfile::tempdir().unwrap();
        let n = workers.len().to_string();
        let mut args = SMALL_RUN.to_vec();
        args.extend_from_slice(&["--epochs", "1", "--workers", &n]);
        args.extend_from_slice(coordinator);
        let c = Coordinator::start(out.path(), &args);
        let children: Vec<_> = workers.iter().map(|extra| worker(&c.addr, extra)).collect();
        let (ok, log) = c.finish(Duration::from_secs(240));
        assert!(ok, "{log}");
        // Each worker's tally: (parameters read in place, decoded inline, shards mapped,
        // streamed, calls through the mailbox, through gRPC, shards whose rows were gathered
        // ahead, shards computed).
        let tallies: Vec<[u64; 8]> = children
            .into_iter()
            .map(|child| {
                let (status, log) = finish_worker(child, Duration::from_secs(30));
                assert!(status.success(), "{log}");
                tally(&log)
            })
            .collect();
        let attached = log.matches(ATTACHED).count();
        (
            summary(out.path())["fingerprint"]
                .as_str()
                .unwrap()
                .to_string(),
            attached,
            tallies,
        )
    };
    // Workers on the coordinator's host attach to its shared memory by default, and then read
    // parameters in place (all but the first step's, sent before any parameter file exists),
    // map shards, and make every per-step call through their mailbox...
    let (shared, attached, tallies) = run(&[], &[&[], &[]]);
    assert_eq!(attached, 2, "both local workers use shared memory");
    // (Shards may still be streamed when /dev/shm is short of space.)
    for &[
        in_place,
        inline,
        mapped,
        _streamed,
        mailbox,
        service,
        ahead,
        shards,
    ] in &tallies
    {
        assert!(in_place > inline && mapped > 0, "{tallies:?}");
        // Every step but an epoch's last hints the next one's examples; the workers' nodes
        // stay the same while both stay, so most rows are read ahead.
        assert!(2 * ahead > shards, "{tallies:?}");
        // (A worker declared lost on a loaded machine may make a call or two through gRPC
        // before it notices and registers again.)
        assert!(mailbox > in_place && service <= 2, "{tallies:?}");
    }
    // ...not when either side says tcp, and a mix of the two paths is fine.
    let (tcp, attached, tallies) = run(&["--transport", "tcp"], &[&[], &[]]);
    assert_eq!(attached, 0);
    for &[
        in_place,
        inline,
        mapped,
        streamed,
        mailbox,
        service,
        ahead,
        shards,
    ] in &tallies
    {
        assert!(
            in_place == 0 && inline > 0 && mapped == 0 && streamed > 0,
            "{tallies:?}"
        );
        assert!(
            2 * ahead > shards,
            "gathered ahead over gRPC too: {tallies:?}"
        );
        assert!(mailbox == 0 && service > inline, "{tallies:?}");
    }
    // The third worker reads each step's rows only when its task comes: the bits are the same.
    let (mixed, attached, tallies) = run(
        &[],
        &[&[], &["--transport", "tcp"], &["--read-ahead", "off"]],
    );
    assert_eq!(attached, 2);
    assert_eq!(tallies[2][6], 0, "rows read ahead: {tallies:?}");
    assert!(
        tallies[0][6] > 0 && tallies[1][6] > 0,
        "hints were sent: {tallies:?}"
    );
    assert_eq!(tallies[1][0], 0, "the tcp worker reads no parameter file");
    assert_eq!(tallies[1][4], 0, "the tcp worker has no mailbox");
    assert!(tallies[0][0] > 0 && tallies[2][0] > 0, "{tallies:?}");
    assert!(tallies[0][4] > 0 && tallies[2][4] > 0, "{tallies:?}");
    assert_eq!(shared, tcp, "the transport changed the parameters");
    assert_eq!(shared, mixed, "a mix of transports changed the parameters");
}

#[test]
fn the_fingerprint_does_not_depend_on_the_number_of_workers() {
    let runs: Vec<String> = (1..=4)
        .map(|n| {
            let out = tempfile::tempdir().unwrap();
            train(out.path(), n, &["--epochs", "1"])
        })
        .collect();
    assert!(
        runs.iter().all(|f| *f == runs[0]),
        "fingerprints differ: {runs:?}"
    );
    let out = tempfile::tempdir().unwrap();
    let other_seed = train(out.path(), 2, &["--epochs", "1", "--seed", "1"]);
    assert_ne!(
        other_seed, runs[0],
        "another seed must give other parameters"
    );
}

#[test]
fn local_mode_spawns_its_own_workers() {
    let out = tempfile::tempdir().unwrap();
    let mut args = SMALL_RUN.to_vec();
    args.extend_from_slice(&["--workers", "2", "--local", "--epochs", "1"]);
    let c = Coordinator::start(out.path(), &args);
    let (ok, log) = c.finish(Duration::from_secs(240));
    assert!(ok, "{log}");
    assert!(log.contains("fingerprint "), "{log}");
    let reference = tempfile::tempdir().unwrap();
    assert_eq!(
        summary(out.path())["fingerprint"],
        train(reference.path(), 1, &["--epochs", "1"])
    );
}

#[test]
fn a_worker_with_the_wrong_token_is_refused_on_both_sides() {
    let out = tempfile::tempdir().unwrap();
    let mut args = SMALL_RUN.to_vec();
    args.extend_from_slice(&["--workers", "1", "--token", "s3cret"]);
    let mut c = Coordinator::start(out.path(), &args);
    let (status, err) = finish_worker(
        worker(&c.addr, &["--token", "wrong"]),
        Duration::from_secs(30),
    );
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("refused") && err.contains("token"), "{err}");
    assert!(
        c.wait_log(
            "refused a call without the right token",
            Duration::from_secs(5)
        ),
        "{}",
        c.log.join("\n")
    );
    let (status, err) = finish_worker(
        worker(&c.addr, &["--token", "s3cret", "--protocol-version", "99"]),
        Duration::from_secs(30),
    );
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("protocol 99"), "{err}");
    // The right token works.
    let good = worker(&c.addr, &["--token", "s3cret"]);
    let (ok, log) = c.finish(Duration::from_secs(240));
    assert!(ok, "{log}");
    assert!(finish_worker(good, Duration::from_secs(30)).0.success());
}

// The fault-injection hook exists only in debug builds of the worker.
#[cfg(debug_assertions)]
#[test]
fn poisoned_gradients_are_rejected_and_do_not_change_the_result() {
    let (reference, out, c) = reference_and_two_worker_run();
    let bad = worker(&c.addr, &["--inject-fault", "nan@3"]);
    let short = worker(&c.addr, &["--inject-fault", "short@5"]);
    let (ok, log) = c.finish(Duration::from_secs(240));
    assert!(ok, "{log}");
    assert!(
        log.contains("rejected the result of worker") && log.contains("step 3"),
        "{log}"
    );
    assert!(log.contains("not finite"), "{log}");
    assert!(
        log.contains("step 5") && log.contains("values, the model has"),
        "{log}"
    );
    assert_eq!(
        summary(out.path())["fingerprint"].as_str().unwrap(),
        reference
    );
    for w in [bad, short] {
        assert!(finish_worker(w, Duration::from_secs(30)).0.success());
    }
}

#[test]
fn an_unreachable_coordinator_makes_the_worker_give_up_clearly() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let child = std::process::Command::new(common::worker_bin())
        .args(["--addr", &addr, "--retry-for", "2"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (status, err) = finish_worker(child, Duration::from_secs(30));
    assert!(!status.success());
    assert!(
        err.contains("cannot reach the coordinator") && err.contains(&addr),
        "{err}"
    );
}

#[test]
fn bad_settings_are_refused_before_anything_starts() {
    let out = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(common::coordinator_bin())
        .args(["--batch", "100", "--shards", "16", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("multiple of --shards"), "{err}");
}

#[test]
fn a_saved_model_continues_training_with_init_from() {
    let first = tempfile::tempdir().unwrap();
    train(first.path(), 1, &["--epochs", "1"]);
    let trained = metrics(first.path())[0]["heldout_elbo"].as_f64().unwrap();
    let model = first.path().join("model.safetensors");
    let model = model.to_str().unwrap();

    let second = tempfile::tempdir().unwrap();
    train(second.path(), 1, &["--epochs", "1", "--init-from", model]);
    let continued = metrics(second.path())[0]["heldout_elbo"].as_f64().unwrap();
    assert!(
        continued > trained,
        "continuing from the saved model should improve on it: {trained} -> {continued}"
    );

    // Another architecture is refused with a message naming the flags to fix.
    let out = tempfile::tempdir().unwrap();
    let mut args = SMALL_RUN.to_vec();
    args.extend_from_slice(&["--workers", "1", "--hidden", "32", "--init-from", model]);
    let output = std::process::Command::new(common::coordinator_bin())
        .args(&args)
        .args(["--listen", "127.0.0.1:0", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("--init-from") && err.contains("--hidden"),
        "{err}"
    );
}

/// The figures of a worker's tally lines (one per registration), summed: parameters read in
/// place, decoded inline, shards mapped, shards streamed, calls through the mailbox, calls
/// through gRPC, shards whose rows were gathered ahead, shards computed.
fn tally(log: &str) -> [u64; 8] {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("task(s) computed"))
        .collect();
    assert!(!lines.is_empty(), "no tally in the worker's log:\n{log}");
    lines.iter().fold([0; 8], |sum, line| {
        let figures = line_tally(line);
        std::array::from_fn(|i| sum[i] + figures[i])
    })
}

fn line_tally(line: &str) -> [u64; 8] {
    let after = |label: &str| -> u64 {
        let rest = &line[line
            .find(label)
            .unwrap_or_else(|| panic!("{label}: {line}"))
            + label.len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().unwrap_or_else(|_| panic!("{label}: {line}"))
    };
    [
        after("read in place"),
        after("decoded inline"),
        after("mapped from shared memory"),
        after("streamed"),
        after("through the mailbox"),
        after("through gRPC"),
        after("rows gathered ahead for"),
        after("shard(s) of"),
    ]
}
