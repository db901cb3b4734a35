//! Helpers for end-to-end tests that run the real `coordinator` and `worker` binaries on
//! 127.0.0.1 with ephemeral ports.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The arguments of a small, fast run: a small synthetic dataset and model.
pub const SMALL_RUN: &[&str] = &[
    "--data",
    "synthetic:2400",
    "--holdout",
    "400",
    "--hidden",
    "64",
    "--latent",
    "8",
    "--batch",
    "64",
    "--shards",
    "8",
    "--epochs",
    "2",
    "--iw-samples",
    "10",
];

pub fn coordinator_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_coordinator"))
}

/// The worker binary, built beside the coordinator by `cargo test --workspace`.
pub fn worker_bin() -> PathBuf {
    let path = coordinator_bin().with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace` so both binaries are built",
        path.display()
    );
    path
}

/// A running coordinator whose stderr is collected.
pub struct Coordinator {
    pub child: Child,
    pub addr: String,
    pub out: PathBuf,
    stderr: mpsc::Receiver<String>,
    stdout: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

impl Coordinator {
    /// Starts `coordinator --listen 127.0.0.1:0 --out OUT ARGS...` and waits for its address.
    pub fn start(out: &Path, args: &[&str]) -> Coordinator {
        let mut child = Command::new(coordinator_bin())
            .args(["--listen", "127.0.0.1:0", "--out"])
            .arg(out)
            .args(args)
            .env("VAE_WORKER_BIN", worker_bin())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start coordinator");
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        let mut c = Coordinator {
            child,
            addr: String::new(),
            out: out.to_path_buf(),
            stderr,
            stdout,
            log: Vec::new(),
        };
        let line = c
            .wait_stdout(
                |l| l.starts_with("coordinator listening on "),
                Duration::from_secs(60),
            )
            .unwrap_or_else(|| {
                panic!(
                    "coordinator did not report its address; log:\n{}",
                    c.log.join("\n")
                )
            });
        c.addr = line
            .trim_start_matches("coordinator listening on ")
            .trim()
            .to_string();
        c
    }

    fn drain(&mut self) {
        while let Ok(l) = self.stderr.try_recv() {
            self.log.push(l);
        }
    }

    /// Waits for a stdout line matching `pred`.
    pub fn wait_stdout(
        &mut self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            self.drain();
            match self.stdout.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if pred(&line) {
                        return Some(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(200));
                    self.drain();
                    return None;
                }
            }
        }
        None
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            if self.log.iter().any(|l| l.contains(needle)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for exit; returns success and the full log.
    pub fn finish(mut self, timeout: Duration) -> (bool, String) {
        let status = wait_timeout(&mut self.child, timeout);
        std::thread::sleep(Duration::from_millis(100));
        while let Ok(l) = self.stdout.try_recv() {
            self.log.push(l);
        }
        self.drain();
        let log = self.log.join("\n");
        match status {
            Some(s) => (s.success(), log),
            None => {
                let _ = self.child.kill();
                panic!("coordinator did not finish within {timeout:?}; log:\n{log}");
            }
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a worker dialing `addr`.
pub fn worker(addr: &str, extra: &[&str]) -> Child {
    Command::new(worker_bin())
        .args(["--addr", addr, "--threads", "1", "--retry-for", "20"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start worker")
}

/// Waits for a child with a timeout; returns its status, or None on timeout.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A worker's exit status and stderr.
pub fn finish_worker(mut child: Child, timeout: Duration) -> (std::process::ExitStatus, String) {
    let status = wait_timeout(&mut child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("worker did not exit within {timeout:?}")
    });
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    (status, err)
}

pub fn summary(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("summary.json")).expect("summary.json written");
    serde_json::from_str(&text).expect("summary.json is JSON")
}

pub fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .expect("metrics.jsonl written")
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line is JSON"))
        .collect()
}

/// Runs a whole training with `workers` separate worker processes; returns the fingerprint.
pub fn train(out: &Path, workers: usize, extra: &[&str]) -> String {
    let n = workers.to_string();
    let mut args: Vec<&str> = SMALL_RUN.to_vec();
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--workers", &n]);
    let c = Coordinator::start(out, &args);
    let children: Vec<Child> = (0..workers).map(|_| worker(&c.addr, &[])).collect();
    let (ok, log) = c.finish(Duration::from_secs(240));
    assert!(ok, "training failed; log:\n{log}");
    for child in children {
        let (status, err) = finish_worker(child, Duration::from_secs(30));
        assert!(status.success(), "worker failed: {err}");
    }
    summary(out)["fingerprint"].as_str().unwrap().to_string()
}

fn lines(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
