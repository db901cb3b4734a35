//! The error type of the numerical core.

use std::path::PathBuf;

/// Everything that can go wrong in `common`. Messages name the thing (file, tensor, setting) and
/// what is wrong with it, and where possible what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is out of range or inconsistent with another.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A data file exists but its content is not what it claims to be.
    #[error("{path}: {problem}")]
    Malformed { path: PathBuf, problem: String },

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The data does not fit the model or the observation model.
    #[error("data does not fit: {0}")]
    DataMismatch(String),

    /// A download failed or produced the wrong bytes.
    #[error("download failed: {0}")]
    Download(String),

    /// A tensor (gradient, parameters) has the wrong length or non-finite values.
    #[error("invalid tensor: {0}")]
    Tensor(String),

    /// A model or checkpoint file could not be read back.
    #[error("model file {path}: {problem}")]
    ModelFile { path: PathBuf, problem: String },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::Malformed`].
    pub fn malformed(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Malformed {
            path: path.into(),
            problem: problem.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
