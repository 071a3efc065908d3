//! The crate's one error type.
//!
//! Every fallible function of the core returns [`Error`]. The Python bindings
//! map it to exceptions in one place (`python/errors.rs`): argument errors to
//! `ValueError`, I/O errors to `OSError`/`FileNotFoundError`. Messages name the
//! argument or file, what was seen and what was expected, so they read well
//! from both languages.

use std::path::PathBuf;

/// Errors of the grouploss core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument has a wrong shape, type, value or device.
    #[error("{arg}: expected {expected}, got {seen}")]
    InvalidArgument {
        arg: String,
        seen: String,
        expected: String,
    },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file exists but its content is not what its format requires.
    #[error("{path}{}: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Format {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },

    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    /// The user interrupted a long computation (Ctrl-C).
    #[error("interrupted")]
    Interrupted,
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::InvalidArgument`] from three displayable parts.
    pub fn invalid(
        arg: impl Into<String>,
        seen: impl std::fmt::Display,
        expected: impl std::fmt::Display,
    ) -> Self {
        Error::InvalidArgument {
            arg: arg.into(),
            seen: seen.to_string(),
            expected: expected.to_string(),
        }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Format`] for `path`, optionally at a 1-based `line`.
    pub fn format(
        path: impl Into<PathBuf>,
        line: Option<usize>,
        message: impl Into<String>,
    ) -> Self {
        Error::Format {
            path: path.into(),
            line,
            message: message.into(),
        }
    }
}

/// Returns `Err(Error::InvalidArgument)` unless `cond` holds.
pub(crate) fn ensure(
    cond: bool,
    arg: &str,
    seen: impl FnOnce() -> String,
    expected: impl std::fmt::Display,
) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::invalid(arg, seen(), expected))
    }
}
