//! The worker binary's own commands. (Also makes `cargo test --workspace` build the worker
//! binary, which the coordinator's end-to-end tests start.)

use std::process::Command;
use std::time::Duration;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_worker"))
}

#[test]
fn bench_prints_a_throughput_line() {
    let out = worker()
        .args([
            "bench",
            "--batch",
            "32",
            "--threads",
            "1",
            "--seconds",
            "0.2",
        ])
        .args(["--hidden", "32", "--latent", "4"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rate: f64 = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("samples/s="))
        .unwrap_or_else(|| panic!("no samples/s= in {stdout}"))
        .parse()
        .unwrap();
    assert!(rate > 0.0, "{stdout}");
}

#[test]
fn health_follows_the_status_file() {
    let dir = tempfile::tempdir().unwrap();
    let status = dir.path().join("status");
    let check = |max_age: &str| {
        worker()
            .args(["health", "--status-file"])
            .arg(&status)
            .args(["--max-age", max_age])
            .output()
            .unwrap()
    };
    let missing = check("10");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no heartbeat yet"));
    std::fs::write(&status, "alive\n").unwrap();
    assert!(check("10").status.success());
    std::thread::sleep(Duration::from_millis(300));
    let stale = check("0.1");
    assert!(!stale.status.success());
    assert!(String::from_utf8_lossy(&stale.stderr).contains("last heartbeat"));
}

#[test]
fn a_malformed_fault_or_address_is_refused_clearly() {
    let out = worker().args(["--inject-fault", "boom"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nan@STEP"));
    let out = worker()
        .args(["--addr", "not an address", "--retry-for", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an address"));
}
