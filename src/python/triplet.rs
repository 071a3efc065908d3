//! Binding of the triplet margin loss with batch-hard mining.

use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use super::errors::without_gil;
use crate::loss::triplet;

/// pytorch-metric-learning's `TripletMarginLoss(margin)` over
/// `BatchHardMiner` triplets; a 0-d tensor that carries the autograd graph
/// back to `embeddings`.
#[pyfunction]
#[pyo3(signature = (embeddings, labels, margin = 0.1))]
fn triplet_margin_loss(
    py: Python<'_>,
    embeddings: PyTensor,
    labels: PyTensor,
    margin: f64,
) -> PyResult<PyTensor> {
    let loss = without_gil(py, move || {
        triplet::triplet_margin_batch_hard(&embeddings, &labels, margin)
    })?;
    Ok(PyTensor(loss))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(triplet_margin_loss, m)?)?;
    Ok(())
}
