//! Workers that send wrong results (issue 10): loud ones are rejected by the numeric checks,
//! quiet ones caught by verification; either way the run ends with the honest fingerprint. A
//! co-located worker that rewrites its results after they were accepted is caught by the update's
//! second check and quarantined.

mod common;

use std::time::Duration;

use common::{Coordinator, SMALL_RUN, finish_worker, summary, train, worker};

/// The honest fingerprint of a one-epoch run, and a coordinator for the same run waiting for
/// two workers with `extra` flags.
fn reference_and_run(extra: &[&str]) -> (String, tempfile::TempDir, Coordinator) {
    let clean = tempfile::tempdir().unwrap();
    let reference = train(clean.path(), 1, &["--epochs", "1"]);
    let out = tempfile::tempdir().unwrap();
    let mut args = SMALL_RUN.to_vec();
    args.extend_from_slice(&["--workers", "2", "--epochs", "1"]);
    args.extend_from_slice(extra);
    let c = Coordinator::start(out.path(), &args);
    (reference, out, c)
}

fn fingerprint(out: &tempfile::TempDir) -> String {
    summary(out.path())["fingerprint"]
        .as_str()
        .unwrap()
        .to_string()
}

// The fault-injection hook exists only in debug builds of the worker.
#[cfg(debug_assertions)]
#[test]
fn a_finite_but_huge_gradient_is_rejected_and_the_parameters_stay_honest() {
    let (reference, out, c) = reference_and_run(&[]);
    let honest = worker(&c.addr, &[]);
    let hostile = worker(&c.addr, &["--inject-fault", "huge@3"]);
    let (ok, log) = c.finish(Duration::from_secs(240));
    assert!(ok, "{log}");
    assert!(
        log.contains("step 3") && log.contains("no honest gradient is that large"),
        "{log}"
    );
    assert_eq!(fingerprint(&out), reference);
    for w in [honest, hostile] {
        assert!(finish_worker(w, Duration::from_secs(30)).0.success());
    }
}

#[cfg(debug_assertions)]
#[test]
fn verification_catches_a_one_ulp_error_and_quarantines_the_worker() {
    let (reference, out, c) = reference_and_run(&["--verify", "1.0"]);
    let honest = worker(&c.addr, &[]);
    let quiet = worker(
        &c.addr,
        &["--inject-fault", "ulp@3", "--name", "flaky-host"],
    );
    let (ok, log) = c.finish(Duration::from_secs(240));
    assert!(ok, "{log}");
    assert!(
        log.contains("flaky-host") && log.contains("quarantined") && log.contains("step 3"),
        "{log}"
    );
    assert_eq!(fingerprint(&out), reference, "the honest bits, exactly");
    assert!(finish_worker(honest, Duration::from_secs(30)).0.success());
    // It registers again and is refused under its name.
    let (status, err) = finish_worker(quiet, Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("quarantined"), "{err}");
}

/// A co-located worker that overwrites its gradients with NaN in shared memory once the
/// coordinator has accepted them, while the step's update may still read them there: the update's
/// second check takes those values as zeros, never as they are, and the worker is quarantined.
/// It does so at every step from step 3 on, so that some step's update reads after the rewrite
/// (any step where its result is not the last to arrive).
#[cfg(debug_assertions)]
#[test]
fn a_worker_that_rewrites_accepted_gradients_in_shared_memory_is_quarantined() {
    let (reference, out, c) = reference_and_run(&[]);
    let honest = worker(&c.addr, &[]);
    let rewriter = worker(
        &c.addr,
        &["--inject-fault", "rewrite@3", "--name", "rewriting-host"],
    );
    let (ok, log) = c.finish(Duration::from_secs(240));
    assert!(ok, "{log}");
    assert!(
        log.lines().any(|line| line.contains("rewriting-host")
            && line.contains("quarantined")
            && line.contains("changed in shared memory after it was accepted")),
        "{log}"
    );
    let heldout = summary(out.path())["heldout_elbo"].as_f64().unwrap();
    assert!(heldout.is_finite(), "held-out ELBO {heldout}");
    assert_ne!(
        fingerprint(&out),
        reference,
        "the values the update found rewritten count as zeros"
    );
    assert!(finish_worker(honest, Duration::from_secs(30)).0.success());
    let (status, err) = finish_worker(rewriter, Duration::from_secs(30));
    assert!(err.contains("overwrote our accepted gradient"), "{err}");
    assert_eq!(status.code(), Some(3), "{err}");
}

#[test]
fn verifying_every_node_changes_nothing_for_honest_workers_alone_or_together() {
    for workers in [1, 2] {
        let clean = tempfile::tempdir().unwrap();
        let reference = train(clean.path(), 1, &["--epochs", "1"]);
        let out = tempfile::tempdir().unwrap();
        let verified = train(out.path(), workers, &["--epochs", "1", "--verify", "1.0"]);
        assert_eq!(
            verified, reference,
            "{workers} worker(s) under --verify 1.0"
        );
    }
}
