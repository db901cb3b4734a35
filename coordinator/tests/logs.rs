//! The coordinator's log lines through the real binary, with stderr a pipe (as under a log
//! collector): no terminal escape codes, and `--log-format json` writes one JSON object per line.

mod common;

use std::process::{Command, Output};

/// A one-epoch run on a tiny model and dataset with one local worker (a few seconds), its
/// stdout and stderr piped. Without RUST_LOG the coordinator logs at `info` and the local worker
/// only warnings; NO_COLOR and VAE_LOG_FORMAT are cleared so the test sees the defaults.
fn tiny_run(extra: &[&str]) -> Output {
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(common::coordinator_bin())
        .args(["--local", "--workers", "1", "--data", "synthetic:512"])
        .args(["--holdout", "128", "--hidden", "16", "--latent", "2"])
        .args(["--batch", "64", "--shards", "8", "--epochs", "1"])
        .args(["--iw-samples", "0", "--out"])
        .arg(out.path())
        .args(extra)
        .env("VAE_WORKER_BIN", common::worker_bin())
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env_remove("VAE_LOG_FORMAT")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Every non-empty line of `stderr` as a JSON object with a `level` and a `message`.
fn json_lines(stderr: &[u8]) -> Vec<serde_json::Map<String, serde_json::Value>> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let record = match serde_json::from_str(line) {
                Ok(serde_json::Value::Object(record)) => record,
                other => panic!("not a JSON object ({other:?}): {line}"),
            };
            for field in ["level", "message"] {
                assert!(
                    record.get(field).is_some_and(|v| v.is_string()),
                    "no `{field}` string in {line}"
                );
            }
            record
        })
        .collect()
}

#[test]
fn piped_logs_carry_no_escape_codes() {
    let run = tiny_run(&[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("INFO") && stderr.contains("epoch 1/1"),
        "the run logged nothing: {stderr}"
    );
    assert!(
        !run.stderr.contains(&0x1b) && !run.stdout.contains(&0x1b),
        "escape codes in piped output: {stderr:?}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let run = tiny_run(&["--log-format", "json"]);
    let records = json_lines(&run.stderr);
    assert!(
        records
            .iter()
            .any(|r| r["level"] == "INFO" && r["message"].as_str().unwrap().contains("epoch 1/1")),
        "no epoch line among {records:?}"
    );
    assert!(!run.stderr.contains(&0x1b));
}

#[test]
fn json_logs_carry_errors_and_follow_the_environment() {
    // A tool's error is a JSON record too, with the flag after the subcommand (clap refuses it
    // before one) or with VAE_LOG_FORMAT.
    let failed = |flag: &[&str], env: Option<&str>| {
        let mut command = Command::new(common::coordinator_bin());
        command
            .args(["evaluate", "--model", "/nonexistent/model.safetensors"])
            .args(flag)
            .env_remove("RUST_LOG")
            .env_remove("VAE_LOG_FORMAT");
        if let Some(format) = env {
            command.env("VAE_LOG_FORMAT", format);
        }
        let out = command.output().unwrap();
        assert!(!out.status.success());
        out.stderr
    };
    for stderr in [
        failed(&["--log-format", "json"], None),
        failed(&[], Some("json")),
    ] {
        let records = json_lines(&stderr);
        assert!(
            records.iter().any(|r| r["level"] == "ERROR"
                && r["message"].as_str().unwrap().contains("/nonexistent")),
            "no error record among {records:?}"
        );
    }
    // In text, the error is a plain line.
    let text = String::from_utf8_lossy(&failed(&[], None)).into_owned();
    assert!(text.starts_with("error: "), "{text}");
}
