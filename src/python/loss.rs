//! Bindings of the loss module.

use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use super::errors::without_gil;
use crate::loss::{self, AnchorMode, GroupLossOptions, Similarity};

type LossParts = (
    PyTensor,
    Option<PyTensor>,
    Option<PyTensor>,
    Option<PyTensor>,
    Option<PyTensor>,
);

/// Group Loss of a batch; returns (loss, nll, ce, probs, classes).
#[pyfunction]
#[pyo3(signature = (
    embeddings, labels, logits, *, temperature = 24.0, num_anchors = 2, num_iters = 1,
    gtg_weight = 1.0, ce_weight = 1.0, similarity = "correlation", sigma = 1.0,
    similarity_power = 1.0, zero_diagonal = false, anchors = "first", seed = 0, batch_classes_only = false,
    num_classes = None
))]
#[allow(clippy::too_many_arguments)]
fn group_loss(
    py: Python<'_>,
    embeddings: PyTensor,
    labels: PyTensor,
    logits: PyTensor,
    temperature: f64,
    num_anchors: i64,
    num_iters: i64,
    gtg_weight: f64,
    ce_weight: f64,
    similarity: &str,
    sigma: f64,
    similarity_power: f64,
    zero_diagonal: bool,
    anchors: &str,
    seed: u64,
    batch_classes_only: bool,
    num_classes: Option<i64>,
) -> PyResult<LossParts> {
    let opts = GroupLossOptions {
        temperature,
        num_anchors,
        num_iters,
        gtg_weight,
        ce_weight,
        similarity: Similarity::parse(similarity, sigma)?,
        similarity_power,
        zero_diagonal,
        anchors: AnchorMode::parse(anchors, seed)?,
        batch_classes_only,
    };
    let out = without_gil(py, move || {
        if let Some(m) = num_classes {
            loss::check_logits_width(&logits, m)?;
        }
        loss::group_loss(&embeddings, &logits, &labels, &opts)
    })?;
    Ok((
        PyTensor(out.loss),
        out.nll.map(PyTensor),
        out.ce.map(PyTensor),
        out.probs.map(PyTensor),
        out.classes.map(PyTensor),
    ))
}

type LossAndGrads = (
    PyTensor,
    Option<PyTensor>,
    Option<PyTensor>,
    Option<PyTensor>,
    Option<PyTensor>,
    Option<PyTensor>,
    Option<PyTensor>,
);

/// Group Loss of a batch with closed-form gradients; returns (loss, nll, ce,
/// probs, classes, grad_embeddings, grad_logits).
#[pyfunction]
#[pyo3(signature = (
    embeddings, labels, logits, *, temperature = 24.0, num_anchors = 2, num_iters = 1,
    gtg_weight = 1.0, ce_weight = 1.0, similarity = "correlation", sigma = 1.0,
    similarity_power = 1.0, zero_diagonal = false, anchors = "first", seed = 0, batch_classes_only = false,
    num_classes = None, want_grads = true, want_probs = false, implementation = "auto"
))]
#[allow(clippy::too_many_arguments)]
fn group_loss_with_grads(
    py: Python<'_>,
    embeddings: PyTensor,
    labels: PyTensor,
    logits: PyTensor,
    temperature: f64,
    num_anchors: i64,
    num_iters: i64,
    gtg_weight: f64,
    ce_weight: f64,
    similarity: &str,
    sigma: f64,
    similarity_power: f64,
    zero_diagonal: bool,
    anchors: &str,
    seed: u64,
    batch_classes_only: bool,
    num_classes: Option<i64>,
    want_grads: bool,
    want_probs: bool,
    implementation: &str,
) -> PyResult<LossAndGrads> {
    let opts = GroupLossOptions {
        temperature,
        num_anchors,
        num_iters,
        gtg_weight,
        ce_weight,
        similarity: Similarity::parse(similarity, sigma)?,
        similarity_power,
        zero_diagonal,
        anchors: AnchorMode::parse(anchors, seed)?,
        batch_classes_only,
    };
    let implementation = loss::Implementation::parse(implementation)?;
    let out = without_gil(py, move || {
        if let Some(m) = num_classes {
            loss::check_logits_width(&logits, m)?;
        }
        loss::group_loss_with_grads(
            &embeddings,
            &logits,
            &labels,
            &opts,
            want_grads,
            want_probs,
            implementation,
        )
    })?;
    Ok((
        PyTensor(out.loss),
        out.nll.map(PyTensor),
        out.ce.map(PyTensor),
        out.probs.map(PyTensor),
        out.classes.map(PyTensor),
        out.grad_embeddings.map(PyTensor),
        out.grad_logits.map(PyTensor),
    ))
}

/// Pairwise similarity W of the rows of `embeddings`, sharpened by `power`.
#[pyfunction]
#[pyo3(signature = (
    embeddings, kind = "correlation", zero_diagonal = false, sigma = 1.0, power = 1.0
))]
fn similarity(
    py: Python<'_>,
    embeddings: PyTensor,
    kind: &str,
    zero_diagonal: bool,
    sigma: f64,
    power: f64,
) -> PyResult<PyTensor> {
    let kind = Similarity::parse(kind, sigma)?;
    let w = without_gil(py, move || {
        loss::similarity_checked(&embeddings, kind, zero_diagonal, power)
    })?;
    Ok(PyTensor(w))
}

/// Boolean anchor mask over `labels`.
#[pyfunction]
#[pyo3(signature = (labels, num_anchors, mode = "first", seed = 0))]
fn anchor_mask(
    py: Python<'_>,
    labels: PyTensor,
    num_anchors: i64,
    mode: &str,
    seed: u64,
) -> PyResult<PyTensor> {
    let mode = AnchorMode::parse(mode, seed)?;
    let mask = without_gil(py, move || {
        loss::anchor_mask_checked(&labels, num_anchors, mode)
    })?;
    Ok(PyTensor(mask))
}

/// Anchors and replicator steps on prior probabilities.
#[pyfunction]
#[pyo3(signature = (probs, w, labels, anchor_mask, num_iters = 1))]
fn refine(
    py: Python<'_>,
    probs: PyTensor,
    w: PyTensor,
    labels: PyTensor,
    anchor_mask: PyTensor,
    num_iters: i64,
) -> PyResult<PyTensor> {
    let x = without_gil(py, move || {
        loss::refine_checked(&probs, &w, &labels, &anchor_mask, num_iters)
    })?;
    Ok(PyTensor(x))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(group_loss, m)?)?;
    m.add_function(wrap_pyfunction!(group_loss_with_grads, m)?)?;
    m.add_function(wrap_pyfunction!(similarity, m)?)?;
    m.add_function(wrap_pyfunction!(anchor_mask, m)?)?;
    m.add_function(wrap_pyfunction!(refine, m)?)?;
    Ok(())
}
