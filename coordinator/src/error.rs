//! The coordinator's error type, and its one mapping to gRPC statuses.

/// What can stop a run or refuse a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Core(#[from] common::Error),
    #[error("{0}")]
    Io(String),
    /// A worker of another protocol version.
    #[error("protocol version mismatch: {0}")]
    Version(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("training failed: {0}")]
    Training(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::Version(_) => tonic::Status::failed_precondition(msg),
            Error::Auth(_) => tonic::Status::unauthenticated(msg),
            Error::BadRequest(_) | Error::Config(_) => tonic::Status::invalid_argument(msg),
            Error::Core(_) | Error::Io(_) | Error::Training(_) => tonic::Status::internal(msg),
        }
    }
}
