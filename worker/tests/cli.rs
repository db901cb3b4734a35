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
fn bench_products_times_every_product_of_the_step() {
    let out = worker()
        .args([
            "bench",
            "--batch",
            "32",
            "--threads",
            "1",
            "--seconds",
            "0.1",
        ])
        .args([
            "--hidden",
            "32",
            "--latent",
            "4",
            "--shards",
            "4",
            "--samples",
            "2",
        ])
        .arg("--products")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    // Each layer's forward product and weight gradient, and `delta W` for every layer but the
    // first (fed by the data), each with its shape and two times.
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(": x W^T") || l.contains(": delta"))
        .collect();
    assert_eq!(rows.len(), 14, "{stdout}");
    let row = |product: &str| {
        let found = rows.iter().find(|r| r.trim_start().starts_with(product));
        *found.unwrap_or_else(|| panic!("no {product} in {stdout}"))
    };
    // The encoder sees a row per example (32), the decoder one per sample (64).
    for (product, shape) in [
        ("fc1: x W^T", "32 x 784 x 32"),
        ("fc1: delta^T x, 4 shards", "32 x 32 x 784"),
        ("fc21: delta W", "32 x 4 x 32"),
        ("fc3: x W^T", "64 x 4 x 32"),
        ("fc4: x W^T", "64 x 32 x 784"),
        ("fc4: delta^T x, 4 shards", "784 x 64 x 32"),
        ("fc4: delta W", "64 x 784 x 32"),
    ] {
        assert!(row(product).contains(shape), "{product}: {stdout}");
    }
    assert!(!rows.iter().any(|r| r.contains("fc1: delta W")), "{stdout}");
    for row in &rows {
        // Printed in ms to three places: a tiny product may read 0.000.
        let times = row.split_whitespace().rev().skip(1).take(2);
        for time in times {
            let ms: f64 = time
                .parse()
                .unwrap_or_else(|_| panic!("no times in {row:?}"));
            assert!(ms.is_finite(), "{row}");
        }
    }
    assert!(!row("fc4: x W^T").contains(" 0.000 "), "{stdout}");
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

#[test]
fn piped_logs_are_plain_text_or_json_lines() {
    // An unreachable coordinator: an info line per retry, then an error.
    let run = |format: &[&str]| {
        let out = worker()
            .args(["--addr", "127.0.0.1:1", "--retry-for", "0.3"])
            .args(format)
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .env_remove("VAE_LOG_FORMAT")
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(!out.stderr.contains(&0x1b), "escape codes: {out:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let text = run(&[]);
    assert!(
        text.contains("INFO") && text.contains("error: cannot reach"),
        "{text}"
    );
    let json = run(&["--log-format", "json"]);
    let records: Vec<serde_json::Value> = json
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    for record in &records {
        assert!(
            record["level"].is_string() && record["message"].is_string(),
            "no level or message: {record}"
        );
    }
    assert!(
        records
            .iter()
            .any(|r| r["level"] == "ERROR"
                && r["message"].as_str().unwrap().contains("cannot reach")),
        "no error record: {json}"
    );
}
