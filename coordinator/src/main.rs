//! `coordinator`: parse arguments, set up logging, run.

use clap::Parser;
use coordinator::cli::{Cli, Command};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(command) = &cli.command {
        use coordinator::tools;
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
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match coordinator::run::run(config).await {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The exit status of a tool subcommand (its error printed).
fn tool(result: coordinator::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
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
