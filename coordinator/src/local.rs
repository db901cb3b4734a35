//! `--local`: spawn the workers as processes on this machine, so one command trains a model.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::process::{Child, Command};

use crate::error::{Error, Result};

/// Environment variable naming the worker executable (default: `worker` beside this binary).
pub const WORKER_BIN_ENV: &str = "VAE_WORKER_BIN";

/// Where the worker executable is.
pub fn worker_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(WORKER_BIN_ENV) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::Io(format!("cannot locate this executable: {e}")))?;
    let candidate = exe.with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX));
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(Error::Config(format!(
            "--local needs the worker binary, expected at {}: build it with `cargo build \
             --release` (it builds both binaries) or set {WORKER_BIN_ENV}",
            candidate.display()
        )))
    }
}

/// Threads per local worker: the machine's cores shared out, but at least two where the machine
/// has two. With more workers than cores each worker spends part of a step waiting for the others
/// (and the coordinator), and a second thread lets the ones still computing use the idle core.
/// Four workers on two cores, one epoch, one and two threads interleaved: two were faster in 8 of
/// 9 pairs (medians 18,949 and 19,949 samples/s; docs/scaling.md §13).
pub fn default_threads(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    threads_for(cores, workers)
}

fn threads_for(cores: usize, workers: usize) -> usize {
    (cores / workers.max(1)).max(cores.min(2))
}

/// What local workers' idle compute threads do (`worker --idle-threads`): spin while the
/// workers' threads fit the cores, sleep once they share them (a spinning thread would take the
/// core another worker needs).
fn idle_threads_for(cores: usize, workers: usize, threads: usize) -> &'static str {
    if workers * threads <= cores {
        "spin"
    } else {
        "sleep"
    }
}

/// Starts `count` workers dialing `addr`. They are killed if the coordinator exits first.
pub fn spawn_workers(
    count: usize,
    addr: SocketAddr,
    threads: usize,
    token: Option<&str>,
) -> Result<Vec<Child>> {
    let bin = worker_binary()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let idle_threads = idle_threads_for(cores, count, threads);
    // Workers dial the coordinator over loopback even when it listens on all interfaces.
    let dial = SocketAddr::new(
        if addr.ip().is_unspecified() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            addr.ip()
        },
        addr.port(),
    );
    (0..count)
        .map(|i| {
            let mut cmd = Command::new(&bin);
            cmd.arg("--addr")
                .arg(dial.to_string())
                .arg("--threads")
                .arg(threads.to_string())
                .arg("--idle-threads")
                .arg(idle_threads)
                .arg("--name")
                .arg(format!("local-{i}"))
                .kill_on_drop(true);
            if let Some(token) = token {
                cmd.env("VAE_TOKEN", token);
            }
            // Local workers only speak up about problems; the coordinator reports progress.
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "warn");
            }
            cmd.spawn()
                .map_err(|e| Error::Io(format!("cannot start worker {}: {e}", bin.display())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{idle_threads_for, threads_for};

    #[test]
    fn local_workers_spin_only_while_their_threads_fit_the_cores() {
        assert_eq!(idle_threads_for(2, 1, 2), "spin");
        assert_eq!(idle_threads_for(2, 4, 2), "sleep");
        assert_eq!(idle_threads_for(8, 2, 4), "spin");
        assert_eq!(idle_threads_for(8, 16, 2), "sleep");
    }

    #[test]
    fn local_workers_share_the_cores_with_at_least_two_threads_where_there_are_two() {
        assert_eq!(threads_for(1, 1), 1);
        assert_eq!(threads_for(1, 4), 1);
        assert_eq!(threads_for(2, 1), 2);
        assert_eq!(threads_for(2, 4), 2);
        assert_eq!(threads_for(8, 2), 4);
        assert_eq!(threads_for(8, 16), 2);
    }
}
