//! The crate's one error type.
//!
//! Every fallible function of the core returns [`Error`]. The Python bindings
//! map it to exceptions in one place (`python/errors.rs`): argument errors to
//! `ValueError`, I/O errors to `OSError`/`FileNotFoundError`. Messages name the
//! argument or file, what was seen and what was expected, so they read well
//! from both languages.

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Once;

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

    /// A collective operation of a data-parallel run failed.
    #[error("torch.distributed {op} failed on rank {rank}: {message}")]
    Collective {
        op: String,
        rank: usize,
        message: String,
    },

    /// A bug: a panic inside the core, with its message and location.
    #[error("internal error (please report it): {0}")]
    Internal(String),

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

/// Returns `Err(Error::InvalidArgument)` ("`arg`: expected an integer >=
/// `min`, got `value`") unless `value >= min`.
pub(crate) fn at_least<T: PartialOrd + std::fmt::Display>(
    arg: &str,
    value: T,
    min: T,
) -> Result<()> {
    if value >= min {
        Ok(())
    } else {
        Err(Error::invalid(arg, value, format!("an integer >= {min}")))
    }
}

/// Returns `Err(Error::InvalidArgument)` ("`arg`: expected at most `max`,
/// got `value`") unless `value <= max`.
pub(crate) fn at_most<T: PartialOrd + std::fmt::Display>(
    arg: &str,
    value: T,
    max: T,
) -> Result<()> {
    if value <= max {
        Ok(())
    } else {
        Err(Error::invalid(arg, value, format!("at most {max}")))
    }
}

/// Returns `Err(Error::InvalidArgument)` ("`arg`: expected a finite number
/// > 0, got `value`") unless `value` is finite and positive.
pub(crate) fn positive(arg: &str, value: f64) -> Result<()> {
    ensure(
        value.is_finite() && value > 0.0,
        arg,
        || value.to_string(),
        "a finite number > 0",
    )
}

/// Likewise for a finite `value >= 0`.
pub(crate) fn non_negative(arg: &str, value: f64) -> Result<()> {
    ensure(
        value.is_finite() && value >= 0.0,
        arg,
        || value.to_string(),
        "a finite number >= 0",
    )
}

/// Returns `Err(`[`not_one_of`]`)` unless `value` is one of `allowed`.
pub(crate) fn one_of(arg: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(not_one_of(arg, value, allowed))
    }
}

/// The error of a name outside its choices: "`arg`: expected one of "a",
/// "b", got "`value`"".
pub(crate) fn not_one_of(arg: &str, value: &str, allowed: &[&str]) -> Error {
    let names: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
    Error::invalid(
        arg,
        format!("{value:?}"),
        format!("one of {}", names.join(", ")),
    )
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

thread_local! {
    /// Set while core code runs under [`catch_panic`], whose panics become
    /// errors and need not also be printed to stderr.
    static CAUGHT: Cell<bool> = const { Cell::new(false) };
    /// Where the last caught panic of this thread happened.
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs a panic hook that stays quiet for panics `python::errors::without_gil` turns
/// into exceptions and prints all others as usual.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CAUGHT.with(Cell::get) {
                let at = info.location().map(ToString::to_string);
                LOCATION.with(|l| l.replace(at));
            } else {
                default(info)
            }
        }));
    });
}

/// Runs `f`; a panic inside (libtorch errors surface as panics from tch's
/// infallible methods) becomes [`Error::Internal`] with the panic's
/// message and location.
pub fn catch_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let outer = CAUGHT.with(|c| c.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    CAUGHT.with(|c| c.set(outer));
    result.unwrap_or_else(|p| {
        let at = LOCATION.with(|l| l.take());
        let at = at.map_or_else(String::new, |l| format!(" (at {l})"));
        Err(Error::Internal(format!("{}{at}", panic_message(&*p))))
    })
}

#[cfg(test)]
mod panic_tests {
    use super::*;

    #[test]
    fn a_caught_panic_keeps_its_message_and_location() {
        install_panic_hook();
        let line = line!() + 1;
        let e = catch_panic(|| -> Result<()> { panic!("boom at step {}", 3) }).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Internal(_)), "{msg}");
        assert!(msg.contains("boom at step 3"), "{msg}");
        assert!(msg.contains(&format!("src/error.rs:{line}:")), "{msg}");
        // No panic: the closure's own result.
        assert_eq!(catch_panic(|| Ok(7)).unwrap(), 7);
    }
}
