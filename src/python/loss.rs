//! Bindings of the loss module.

use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;
use pyo3_tch::PyTensor;
use tch::Tensor;

use pyo3::types::{PyDict, PyTuple};

use super::convert::serialize_to_py;
use super::errors::without_gil;
use crate::loss::{
    self, AnchorMode, GroupLossOptions, GroupLossSettings, Implementation, MemoryRows, Similarity,
    Want,
};

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

impl PyGroupLossResult {
    fn new(py: Python<'_>, out: loss::GroupLossOutput) -> PyResult<Self> {
        let one = |t: Option<Tensor>| -> PyResult<PyObject> {
            match t {
                Some(t) => PyTensor(t).into_py_any(py),
                None => Ok(py.None()),
            }
        };
        Ok(PyGroupLossResult {
            loss: one(Some(out.loss))?,
            nll: one(out.nll)?,
            ce: one(out.ce)?,
            probs: one(out.probs)?,
            classes: one(out.classes)?,
            grad_embeddings: one(out.grad_embeddings)?,
            grad_logits: one(out.grad_logits)?,
        })
    }
}

const D: GroupLossOptions = GroupLossOptions::DEFAULT;

#[pymethods]
impl GroupLossSettings {
    /// The option names, in the constructor's order.
    #[classattr]
    const NAMES: [&'static str; 12] = GroupLossOptions::NAMES;

    #[new]
    #[pyo3(signature = (
        *, temperature = D.temperature, num_anchors = D.num_anchors, num_iters = D.num_iters,
        gtg_weight = D.gtg_weight, ce_weight = D.ce_weight,
        similarity = D.similarity.name().to_string(), sigma = Similarity::DEFAULT_SIGMA,
        similarity_power = D.similarity_power, zero_diagonal = D.zero_diagonal,
        anchors = D.anchors.name().to_string(), seed = None,
        batch_classes_only = D.batch_classes_only
    ))]
    // The defaults for `help()` and the stub's check (a test compares them
    // with `GroupLossOptions()`).
    #[pyo3(
        text_signature = "(*, temperature=24.0, num_anchors=2, num_iters=1, gtg_weight=1.0, \
        ce_weight=1.0, similarity='correlation', sigma=1.0, similarity_power=1.0, \
        zero_diagonal=False, anchors='first', seed=None, batch_classes_only=False)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        temperature: f64,
        num_anchors: i64,
        num_iters: i64,
        gtg_weight: f64,
        ce_weight: f64,
        similarity: String,
        sigma: f64,
        similarity_power: f64,
        zero_diagonal: bool,
        anchors: String,
        #[pyo3(from_py_with = crate::python::convert::optional_seed_arg)] seed: Option<u64>,
        batch_classes_only: bool,
    ) -> PyResult<Self> {
        let options = GroupLossSettings {
            temperature,
            num_anchors,
            num_iters,
            gtg_weight,
            ce_weight,
            similarity,
            sigma,
            similarity_power,
            zero_diagonal,
            anchors,
            seed,
            batch_classes_only,
        };
        options.resolve(Some(seed.unwrap_or(0)))?;
        Ok(options)
    }

    /// The options as a dict of keyword arguments.
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        let d = serialize_to_py(py, self)?;
        d.bind(py).set_item("seed", self.seed)?;
        Ok(d)
    }

    /// A copy with `changes` (option names) applied, validated again.
    #[pyo3(signature = (**changes))]
    fn replace<'py>(
        slf: &Bound<'py, Self>,
        changes: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let all = slf.get().to_dict(slf.py())?.into_bound(slf.py());
        let all = all.downcast::<PyDict>()?;
        if let Some(changes) = changes {
            all.update(changes.as_mapping())?;
        }
        slf.get_type().call((), Some(all))
    }

    fn __getnewargs_ex__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyTuple>, PyObject)> {
        Ok((PyTuple::empty(py), self.to_dict(py)?))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let d = self.to_dict(py)?.into_bound(py);
        let mut parts = Vec::new();
        for (k, v) in d.downcast::<PyDict>()?.iter() {
            parts.push(format!("{}={}", k.str()?, v.repr()?));
        }
        Ok(format!("GroupLossOptions({})", parts.join(", ")))
    }
}

/// The Group Loss of a batch with `options`. `seed`: the seed of this
/// call's random anchors (default: the options' seed). `implementation`:
/// `"autograd"` records libtorch ops (the loss carries a graph; no
/// gradients returned); `"auto"`, `"fused_cpu"`, `"libtorch"` compute the
/// loss without a graph and, with `want_grads`, its closed-form gradients.
/// `memory_embeddings` and `memory_labels`: labelled points of earlier
/// batches that join the group (`loss::memory`).
#[pyfunction]
#[pyo3(signature = (
    embeddings, labels, logits, options, *, seed = None, num_classes = None,
    want_grads = true, want_probs = false, implementation = "auto",
    memory_embeddings = None, memory_labels = None
))]
#[allow(clippy::too_many_arguments)]
fn group_loss(
    py: Python<'_>,
    embeddings: PyTensor,
    labels: PyTensor,
    logits: PyTensor,
    options: PyRef<'_, GroupLossSettings>,
    #[pyo3(from_py_with = crate::python::convert::optional_seed_arg)] seed: Option<u64>,
    num_classes: Option<i64>,
    want_grads: bool,
    want_probs: bool,
    implementation: &str,
    memory_embeddings: Option<PyTensor>,
    memory_labels: Option<PyTensor>,
) -> PyResult<PyGroupLossResult> {
    let opts = options.resolve(seed)?;
    let memory = match (memory_embeddings, memory_labels) {
        (Some(e), Some(l)) => Some((e.0, l.0)),
        (None, None) => None,
        (e, _) => {
            let (given, missing) = if e.is_some() {
                ("memory_embeddings", "memory_labels")
            } else {
                ("memory_labels", "memory_embeddings")
            };
            return Err(crate::Error::invalid(
                missing,
                "None",
                format!("a tensor with {given} (the two go together)"),
            )
            .into());
        }
    };
    let implementation = Implementation::parse(implementation)?;
    let want = Want {
        grads: want_grads,
        probs: want_probs,
    };
    let out = without_gil(py, move || {
        if let Some(m) = num_classes {
            loss::check_logits_width(&logits, m)?;
        }
        let memory = memory.as_ref().map(|(e, l)| MemoryRows {
            embeddings: e,
            labels: l,
        });
        loss::evaluate_with_memory(
            &embeddings,
            &logits,
            &labels,
            memory,
            &opts,
            want,
            implementation,
        )
    })?;
    PyGroupLossResult::new(py, out)
}

/// The memory once a batch has joined it (`loss::push_rows`): the last
/// `size` rows of `memory_embeddings` then `embeddings` (detached), with
/// their labels, in the batch's dtype and on its device.
#[pyfunction]
#[pyo3(signature = (memory_embeddings, memory_labels, embeddings, labels, size))]
fn memory_push(
    py: Python<'_>,
    memory_embeddings: PyTensor,
    memory_labels: PyTensor,
    embeddings: PyTensor,
    labels: PyTensor,
    size: usize,
) -> PyResult<(PyTensor, PyTensor)> {
    let (e, l) = without_gil(py, move || {
        let memory = MemoryRows {
            embeddings: &memory_embeddings,
            labels: &memory_labels,
        };
        loss::push_rows(memory, &embeddings, &labels, size)
    })?;
    Ok((PyTensor(e), PyTensor(l)))
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
    #[pyo3(from_py_with = crate::python::convert::seed_arg)] seed: u64,
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
    m.add_class::<GroupLossSettings>()?;
    m.add("IMPLEMENTATIONS", Implementation::NAMES)?;
    m.add_function(wrap_pyfunction!(memory_push, m)?)?;
    m.add_function(wrap_pyfunction!(similarity, m)?)?;
    m.add_function(wrap_pyfunction!(anchor_mask, m)?)?;
    m.add_function(wrap_pyfunction!(refine, m)?)?;
    Ok(())
}
