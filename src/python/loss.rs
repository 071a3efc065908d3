//! Bindings of the loss module.

use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;
use pyo3_tch::PyTensor;
use tch::Tensor;

use super::errors::without_gil;
use crate::loss::{self, AnchorMode, GroupLossOptions, Similarity};

/// What one Group Loss call returns: the loss and, where asked for or
/// computed, its parts and closed-form gradients (tensors, or None).
#[pyclass(name = "GroupLossResult", module = "grouploss._native", frozen)]
pub(crate) struct PyGroupLossResult {
    /// The loss (0-d).
    #[pyo3(get)]
    loss: PyObject,
    /// The Group Loss term (NLL of the refined probabilities), if computed.
    #[pyo3(get)]
    nll: PyObject,
    /// The cross-entropy term, if computed.
    #[pyo3(get)]
    ce: PyObject,
    /// The refined probabilities X, if asked for (or computed by the graph).
    #[pyo3(get)]
    probs: PyObject,
    /// With `batch_classes_only`: the classes of X's columns.
    #[pyo3(get)]
    classes: PyObject,
    /// d loss / d embeddings (closed form), if asked for.
    #[pyo3(get)]
    grad_embeddings: PyObject,
    /// d loss / d logits (closed form), if asked for.
    #[pyo3(get)]
    grad_logits: PyObject,
}

/// The loss's tensors, computed without the GIL.
struct LossTensors {
    loss: Tensor,
    nll: Option<Tensor>,
    ce: Option<Tensor>,
    probs: Option<Tensor>,
    classes: Option<Tensor>,
    grad_embeddings: Option<Tensor>,
    grad_logits: Option<Tensor>,
}

impl LossTensors {
    fn into_py(self, py: Python<'_>) -> PyResult<PyGroupLossResult> {
        let one = |t: Option<Tensor>| -> PyResult<PyObject> {
            match t {
                Some(t) => PyTensor(t).into_py_any(py),
                None => Ok(py.None()),
            }
        };
        Ok(PyGroupLossResult {
            loss: one(Some(self.loss))?,
            nll: one(self.nll)?,
            ce: one(self.ce)?,
            probs: one(self.probs)?,
            classes: one(self.classes)?,
            grad_embeddings: one(self.grad_embeddings)?,
            grad_logits: one(self.grad_logits)?,
        })
    }
}

/// The Group Loss of a batch. `implementation`: `"autograd"` records
/// libtorch ops (the loss carries a graph; no gradients returned);
/// `"auto"`, `"fused_cpu"`, `"libtorch"` compute the loss without a graph
/// and, with `want_grads`, its closed-form gradients.
#[pyfunction]
#[pyo3(signature = (
    embeddings, labels, logits, *, temperature = 24.0, num_anchors = 2, num_iters = 1,
    gtg_weight = 1.0, ce_weight = 1.0, similarity = "correlation", sigma = 1.0,
    similarity_power = 1.0, zero_diagonal = false, anchors = "first", seed = 0, batch_classes_only = false,
    num_classes = None, want_grads = true, want_probs = false, implementation = "auto"
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
    want_grads: bool,
    want_probs: bool,
    implementation: &str,
) -> PyResult<PyGroupLossResult> {
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
    let graph = implementation == "autograd";
    let implementation = if graph {
        None
    } else {
        Some(loss::Implementation::parse(implementation).map_err(|_| {
            crate::Error::invalid(
                "implementation",
                format!("{implementation:?}"),
                "one of \"auto\", \"fused_cpu\", \"libtorch\", \"autograd\"",
            )
        })?)
    };
    let out = without_gil(py, move || {
        if let Some(m) = num_classes {
            loss::check_logits_width(&logits, m)?;
        }
        let Some(implementation) = implementation else {
            let out = loss::group_loss(&embeddings, &logits, &labels, &opts)?;
            return Ok(LossTensors {
                loss: out.loss,
                nll: out.nll,
                ce: out.ce,
                probs: out.probs,
                classes: out.classes,
                grad_embeddings: None,
                grad_logits: None,
            });
        };
        let out = loss::group_loss_with_grads(
            &embeddings,
            &logits,
            &labels,
            &opts,
            want_grads,
            want_probs,
            implementation,
        )?;
        Ok(LossTensors {
            loss: out.loss,
            nll: out.nll,
            ce: out.ce,
            probs: out.probs,
            classes: out.classes,
            grad_embeddings: out.grad_embeddings,
            grad_logits: out.grad_logits,
        })
    })?;
    out.into_py(py)
}

/// Pairwise similarity W of the rows of `embeddings`, sharpened by
/// `similarity_power`.
#[pyfunction]
#[pyo3(signature = (
    embeddings, similarity = "correlation", zero_diagonal = false, sigma = 1.0,
    similarity_power = 1.0
))]
fn similarity(
    py: Python<'_>,
    embeddings: PyTensor,
    similarity: &str,
    zero_diagonal: bool,
    sigma: f64,
    similarity_power: f64,
) -> PyResult<PyTensor> {
    let kind = Similarity::parse(similarity, sigma)?;
    let w = without_gil(py, move || {
        loss::similarity_checked(&embeddings, kind, zero_diagonal, similarity_power)
    })?;
    Ok(PyTensor(w))
}

/// Boolean anchor mask over `labels`.
#[pyfunction]
#[pyo3(signature = (labels, num_anchors, anchors = "first", seed = 0))]
fn anchor_mask(
    py: Python<'_>,
    labels: PyTensor,
    num_anchors: i64,
    anchors: &str,
    seed: u64,
) -> PyResult<PyTensor> {
    let mode = AnchorMode::parse(anchors, seed)?;
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
    m.add_class::<PyGroupLossResult>()?;
    m.add_function(wrap_pyfunction!(similarity, m)?)?;
    m.add_function(wrap_pyfunction!(anchor_mask, m)?)?;
    m.add_function(wrap_pyfunction!(refine, m)?)?;
    Ok(())
}
