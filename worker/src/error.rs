//! The worker's error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator refused us (protocol version, token): retrying will not help.
    #[error("refused by the coordinator at {addr}: {reason}")]
    Refused { addr: String, reason: String },
    /// The coordinator could not be reached within the retry budget.
    #[error(
        "cannot reach the coordinator at {addr} after {seconds:.0}s of retries: {last_error}; \
         check the address and that the coordinator is running"
    )]
    Unreachable {
        addr: String,
        seconds: f64,
        last_error: String,
    },
    /// The coordinator sent something this worker cannot use.
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Core(#[from] common::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
