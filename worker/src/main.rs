//! `worker`: parse arguments, set up logging, run (or benchmark).

use std::ffi::OsString;
use std::io::IsTerminal;
use std::time::Duration;

use clap::{Parser, Subcommand};
use proto::credentials::Token;
use worker::client::{self, WorkerConfig};
#[cfg(debug_assertions)]
use worker::compute::Fault;
use worker::compute::IdleThreads;

/// Computes ELBO gradients for the shards a coordinator hands out. Needs no flag but the
/// coordinator's address: the model and run settings come from the coordinator.
#[derive(Debug, Parser)]
// A flag given twice takes its last value, so scripts can append overrides.
#[command(
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true,
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Log lines on stderr: `text` (coloured only on a terminal and without NO_COLOR) or `json`
    /// (one object per line, for log collectors).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "VAE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// What the compute threads do between a step's parallel sections: `spin` (the default:
    /// faster where the worker has its cores to itself) or `sleep` (workers sharing cores).
    #[arg(long, value_enum, default_value_t = IdleThreads::Spin, env = "VAE_IDLE_THREADS")]
    idle_threads: IdleThreads,
    /// Coordinator address, `host:port`.
    #[arg(long, default_value = "127.0.0.1:50051", env = "VAE_COORDINATOR")]
    addr: String,
    /// Threads for gradient computation [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Shared secret the coordinator expects. Visible to other local users in `ps`: prefer
    /// --token-file or the VAE_TOKEN variable.
    #[arg(
        long,
        env = "VAE_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// Read the shared secret from this file (surrounding whitespace ignored).
    #[arg(long, env = "VAE_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// TLS: verify the coordinator's certificate against this CA (PEM); turns TLS on.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// Mutual TLS: this worker's certificate chain (PEM). Needs --tls-key and --tls-ca.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// Mutual TLS: the private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// The name the coordinator's certificate must carry [default: the host of --addr].
    #[arg(long, requires = "tls_ca")]
    tls_server_name: Option<String>,
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
    /// Read the next step's rows while the coordinator handles this step's result (`on`, the
    /// default), or only once the next task arrives (`off`): the same results either way.
    #[arg(long, value_enum, default_value_t = ReadAhead::On)]
    read_ahead: ReadAhead,
    /// Test hook (debug builds only): misbehave (`nan@STEP`, `short@STEP`, `huge@STEP`, `ulp@STEP`,
    /// `stall@STEP`, `rewrite@STEP`).
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReadAhead {
    On,
    Off,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
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
    // Parsed first so the log format is known; `--help` and usage errors exit here.
    let cli = Cli::parse();
    init_logging(cli.log_format);
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
    let (token, tls) = match security(&cli) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
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
        token,
        tls,
        threads: threads.max(1),
        idle_threads: cli.idle_threads,
        name,
        // Longer than `Duration` holds (or infinite) is for ever; NaN or negative, not at all.
        retry_for: Duration::try_from_secs_f64(cli.retry_for.max(0.0)).unwrap_or(Duration::MAX),
        protocol_version: cli.protocol_version.unwrap_or(proto::PROTOCOL_VERSION),
        #[cfg(debug_assertions)]
        fault: cli.inject_fault,
        #[cfg(not(debug_assertions))]
        fault: None,
        status_file: cli.status_file,
        shared_memory: cli.transport == Transport::Auto,
        read_ahead: cli.read_ahead == ReadAhead::On,
    };
    match client::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            // With `--log-format json` stderr stays one JSON object per line.
            if cli.log_format == LogFormat::Text {
                eprintln!("error: {e}");
            }
            match e {
                worker::Error::Refused { .. } => std::process::ExitCode::from(3),
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}

/// The token and TLS settings, read and checked before anything connects.
fn security(
    cli: &Cli,
) -> Result<(Option<Token>, Option<tonic::transport::ClientTlsConfig>), String> {
    let secret = match &cli.token_file {
        Some(path) => Some(proto::credentials::read_token_file(path)?),
        None => cli.token.clone().filter(|t| !t.is_empty()),
    };
    let token = secret
        .as_deref()
        .map(Token::new)
        .transpose()
        .map_err(|e| format!("--token: {e}"))?;
    let Some(ca) = &cli.tls_ca else {
        return Ok((token, None));
    };
    let host = cli
        .addr
        .rsplit_once("://")
        .map_or(cli.addr.as_str(), |(_, rest)| rest);
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let server_name = cli
        .tls_server_name
        .clone()
        .unwrap_or_else(|| host.trim_matches(['[', ']']).to_string());
    let identity = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => Some(proto::tls::IdentityFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    let loaded = proto::tls::client_config(ca, &server_name, identity.as_ref())?;
    if let Some(left) = loaded.expires_in
        && left < proto::tls::EXPIRY_WARNING
    {
        tracing::warn!(
            "this worker's TLS certificate expires in {} day(s): renew it",
            left.as_secs() / 86_400
        );
    }
    Ok((token, Some(loaded.config)))
}

/// Logs to stderr at `RUST_LOG`'s levels (default `info`), as text or one JSON object per line.
// The coordinator's main.rs has the same function: neither binary's library crate nor `common`
// depends on tracing-subscriber.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(use_colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR"),
            ))
            .init(),
        LogFormat::Json => logs.with_ansi(false).json().flatten_event(true).init(),
    }
}

/// Colour only on a terminal, and never when `NO_COLOR` is set to anything but "" (no-color.org).
fn use_colour(is_terminal: bool, no_color: Option<OsString>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some("".into())));
        assert!(!use_colour(true, Some("1".into())));
        assert!(!use_colour(false, None));
        assert!(!use_colour(false, Some("1".into())));
    }
}
