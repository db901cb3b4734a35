//! `coordinator`: parse arguments, set up logging, run.

use std::ffi::OsString;
use std::io::IsTerminal;

use clap::Parser;
use coordinator::cli::{Cli, Command, LogFormat};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // `--config FILE` becomes flags in front of the real ones, so the command line overrides it.
    let args = match coordinator::config_file::expand(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // Parsed first so the log format is known; `--help` and usage errors exit here.
    let cli = Cli::parse_from(args);
    let log_format = cli.log_format;
    init_logging(log_format);
    if let Some(command) = &cli.command {
        use coordinator::tools;
        let tool = |result| tool(result, log_format);
        return match command {
            Command::Health { addr } => health(addr),
            Command::Sample(args) => tool(tools::samples::run(args)),
            Command::Reconstruct(args) => tool(tools::reconstruct::run(args)),
            Command::Traverse(args) => tool(tools::traverse::run(args)),
            Command::Scatter(args) => tool(tools::scatter::run(args)),
            Command::Evaluate(args) => tool(tools::evaluate::run(args)),
            Command::Plot(args) => tool(tools::plot::run(args)),
        };
    }
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(e) => {
            report(log_format, &e);
            return std::process::ExitCode::from(2);
        }
    };
    match coordinator::run::run(config).await {
        // 0, or 130/143 after SIGINT/SIGTERM stopped the run with a checkpoint.
        Ok(outcome) => std::process::ExitCode::from(outcome.exit_code()),
        Err(e) => {
            tracing::error!("{e}");
            if log_format == LogFormat::Text {
                eprintln!("error: {e}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `RUST_LOG`'s levels (default `info`), as text or one JSON object per line.
// The worker's main.rs has the same function: neither binary's library crate nor `common`
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

/// Tells the user about `e`: `error: ...` on stderr, or a log record with `--log-format json`
/// (so that stderr stays one JSON object per line).
fn report(format: LogFormat, e: &coordinator::Error) {
    match format {
        LogFormat::Text => eprintln!("error: {e}"),
        LogFormat::Json => tracing::error!("{e}"),
    }
}

/// The exit status of a tool subcommand (its error reported).
fn tool(result: coordinator::Result<()>, format: LogFormat) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            report(format, &e);
            std::process::ExitCode::FAILURE
        }
    }
}

/// Connects to `addr` with a short timeout.
fn health(addr: &str) -> std::process::ExitCode {
    use std::net::ToSocketAddrs;
    let timeout = std::time::Duration::from_secs(1);
    let reachable = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, timeout).is_ok());
    if reachable {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("unhealthy: nothing accepts connections at {addr}");
        std::process::ExitCode::FAILURE
    }
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
