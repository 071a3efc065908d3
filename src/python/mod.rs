//! Python bindings (feature `python`): argument conversion, GIL release and
//! error mapping only; the work is done by the core modules.

mod convert;
mod data;
mod errors;
mod eval;
mod index;
mod loss;
mod sampler;
mod train;
mod triplet;

use pyo3::prelude::*;

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::install_panic_hook();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    loss::register(m)?;
    sampler::register(m)?;
    data::register(m)?;
    eval::register(m)?;
    index::register(m)?;
    train::register(m)?;
    triplet::register(m)?;
    Ok(())
}
