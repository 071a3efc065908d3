//! The one mapping from the core's [`Error`] to Python exceptions, and the
//! wrapper that runs core code with the GIL released and no panic escaping.

use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyPermissionError, PyRuntimeError,
    PyValueError,
};
use pyo3::prelude::*;

use crate::error::Error;
pub(crate) use crate::error::{catch_panic, install_panic_hook};

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
            Error::Torch(_) | Error::Collective { .. } | Error::Internal(_) => {
                PyRuntimeError::new_err(msg)
            }
            Error::Interrupted => PyKeyboardInterrupt::new_err(msg),
        }
    }
}

/// Runs `f` with the GIL released, its panics caught ([`catch_panic`]):
/// a `RuntimeError` naming the panic instead of pyo3's `PanicException`.
pub(crate) fn without_gil<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: FnOnce() -> crate::Result<T> + Send,
    T: Send,
{
    py.allow_threads(|| catch_panic(f)).map_err(PyErr::from)
}
