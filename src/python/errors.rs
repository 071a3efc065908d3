//! The one mapping from the core's [`Error`] to Python exceptions, and the
//! wrapper that runs core code with the GIL released and no panic escaping.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyPermissionError, PyRuntimeError,
    PyValueError,
};
use pyo3::prelude::*;

use crate::error::Error;

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let msg = err.to_string();
        match err {
            Error::InvalidArgument { .. } | Error::Format { .. } => PyValueError::new_err(msg),
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
                std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
                _ => PyOSError::new_err(msg),
            },
            Error::Torch(_) => PyRuntimeError::new_err(msg),
            Error::Interrupted => PyKeyboardInterrupt::new_err(msg),
        }
    }
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
    /// Set while core code runs under [`without_gil`], whose panics become
    /// Python exceptions and need not also be printed to stderr.
    static CAUGHT: Cell<bool> = const { Cell::new(false) };
}

/// Installs a panic hook that stays quiet for panics [`without_gil`] turns
/// into exceptions and prints all others as usual.
pub(crate) fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CAUGHT.with(Cell::get) {
                default(info)
            }
        }));
    });
}

/// Runs `f` with the GIL released. A panic inside (libtorch errors surface as
/// panics from tch's infallible methods) becomes a `RuntimeError` instead of
/// pyo3's `PanicException`.
pub(crate) fn without_gil<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: FnOnce() -> crate::Result<T> + Send,
    T: Send,
{
    py.allow_threads(|| {
        let outer = CAUGHT.with(|c| c.replace(true));
        let result = catch_unwind(AssertUnwindSafe(f));
        CAUGHT.with(|c| c.set(outer));
        result
    })
    .map_err(|p| {
        PyRuntimeError::new_err(format!("grouploss internal error: {}", panic_message(&*p)))
    })?
    .map_err(PyErr::from)
}
