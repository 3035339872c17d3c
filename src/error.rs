//! The library's one error type. Library code returns it; only `main` decides exit codes.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file, manifest or graph is missing, malformed or unsupported.
    #[error("{0}")]
    Model(String),
    /// Input given by a user or client is invalid (an image that does not decode, a bad option).
    #[error("{0}")]
    Input(String),
    /// A dataset (annotations, detections file) is malformed.
    #[error("{0}")]
    Data(String),
    /// The inference backend failed.
    #[error("inference failed: {0}")]
    Inference(String),
    // The io error is part of the message and deliberately not a `source`: error chains
    // (`{:#}` in `main`) would print it twice.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }
}

/// Reads a whole file, naming the path in the error.
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}
