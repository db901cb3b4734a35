//! `worker`: parse arguments, set up logging, run (or benchmark).

use std::time::Duration;

use clap::{Parser, Subcommand};
use worker::client::{self, WorkerConfig};
#[cfg(debug_assertions)]
use worker::compute::Fault;

/// Computes ELBO gradients for the shards a coordinator hands out. Needs no flag but the
/// coordinator's address: the model and run settings come from the coordinator.
#[derive(Debug, Parser)]
#[command(version, about, long_about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Coordinator address, `host:port`.
    #[arg(long, default_value = "127.0.0.1:50051", env = "VAE_COORDINATOR")]
    addr: String,
    /// Threads for gradient computation [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Shared secret the coordinator expects.
    #[arg(long, env = "VAE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Name in the coordinator's logs [default: host name and process id].
    #[arg(long)]
    name: Option<String>,
    /// Seconds to keep retrying an unreachable coordinator before giving up.
    #[arg(long, default_value_t = 60.0)]
    retry_for: f64,
    /// Touch this file after every successful heartbeat (for container health checks).
    #[arg(long)]
    status_file: Option<std::path::PathBuf>,
    /// How tensors travel: `auto` accepts the coordinator's shared memory when it runs on this
    /// host (same results, less copying); `tcp` always uses gRPC.
    #[arg(long, value_enum, default_value_t = Transport::Auto)]
    transport: Transport,
    /// Test hook (debug builds only): misbehave (`nan@STEP`, `short@STEP`, `stall@STEP`).
    #[cfg(debug_assertions)]
    #[arg(long, hide = true)]
    inject_fault: Option<Fault>,
    /// Test hook: announce another protocol version.
    #[arg(long, hide = true)]
    protocol_version: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    Auto,
    Tcp,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Time full training steps (forward, backward, optimizer) on random data.
    Bench(worker::bench::BenchArgs),
    /// Exit 0 if the worker's status file was touched recently (a container health check).
    Health {
        #[arg(long)]
        status_file: std::path::PathBuf,
        /// Seconds after which the worker counts as unhealthy.
        #[arg(long, default_value_t = 10.0)]
        max_age: f64,
    },
}

// One async thread is plenty: gradients are computed on the worker's own rayon pool, and fewer
// threads contend less with co-located workers.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(Command::Bench(args)) = &cli.command {
        return match worker::bench::run(args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Health {
        status_file,
        max_age,
    }) = &cli.command
    {
        return match worker::client::status_age(status_file) {
            Some(age) if age.as_secs_f64() <= *max_age => std::process::ExitCode::SUCCESS,
            Some(age) => {
                eprintln!("unhealthy: last heartbeat {:.1}s ago", age.as_secs_f64());
                std::process::ExitCode::FAILURE
            }
            None => {
                eprintln!(
                    "unhealthy: no heartbeat yet ({} missing)",
                    status_file.display()
                );
                std::process::ExitCode::FAILURE
            }
        };
    }
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let name = cli.name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into());
        format!("{host}:{}", std::process::id())
    });
    let config = WorkerConfig {
        addr: cli.addr,
        token: cli.token.filter(|t| !t.is_empty()),
        threads: threads.max(1),
        name,
        retry_for: Duration::from_secs_f64(cli.retry_for.max(0.0)),
        protocol_version: cli.protocol_version.unwrap_or(proto::PROTOCOL_VERSION),
        #[cfg(debug_assertions)]
        fault: cli.inject_fault,
        #[cfg(not(debug_assertions))]
        fault: None,
        status_file: cli.status_file,
        shared_memory: cli.transport == Transport::Auto,
    };
    match client::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            match e {
                worker::Error::Refused { .. } => std::process::ExitCode::from(3),
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}
