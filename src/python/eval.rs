//! Bindings of the eval module (`grouploss.metrics` wraps them).

use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use super::convert::count;
use super::errors::without_gil;
use crate::error::Error;
use crate::eval::input::{host_vec, labels_vec};
use crate::eval::{self, Average, EvalOptions, KnnOptions, Metric};

/// Retrieval and clustering metrics; returns ([(key, value)], left_out).
/// `query_own`: with a query set, query i's own entry in the gallery (an
/// index, or -1 for none), left out of its ranking.
#[pyfunction]
#[pyo3(signature = (
    embeddings, labels, query_embeddings = None, query_labels = None, *,
    ks = vec![1, 2, 4, 8], include = None, normalize = true, batch_size = None, seed = 0,
    kmeans_n_init = 1, kmeans_max_iter = 300, query_own = None, average = "query"
), text_signature = "(embeddings, labels, query_embeddings=None, query_labels=None, *, \
    ks=(1, 2, 4, 8), include=None, normalize=True, batch_size=None, seed=0, kmeans_n_init=1, \
    kmeans_max_iter=300, query_own=None, average='query')")]
#[allow(clippy::too_many_arguments)]
fn evaluate(
    py: Python<'_>,
    embeddings: PyTensor,
    labels: PyTensor,
    query_embeddings: Option<PyTensor>,
    query_labels: Option<PyTensor>,
    ks: Vec<i64>,
    include: Option<Vec<String>>,
    normalize: bool,
    batch_size: Option<i64>,
    #[pyo3(from_py_with = crate::python::convert::seed_arg)] seed: u64,
    kmeans_n_init: i64,
    kmeans_max_iter: i64,
    query_own: Option<PyTensor>,
    average: &str,
) -> PyResult<(Vec<(String, f64)>, usize)> {
    let include = match include {
        Some(names) => names
            .iter()
            .map(|n| Metric::parse(n))
            .collect::<Result<Vec<_>, _>>()?,
        None => Metric::DEFAULT.to_vec(),
    };
    let opts = EvalOptions {
        ks,
        include,
        normalize,
        batch_size,
        seed,
        kmeans_n_init: count("kmeans_n_init", kmeans_n_init, "an integer >= 1")?,
        kmeans_max_iter: count("kmeans_max_iter", kmeans_max_iter, "an integer >= 1")?,
        average: Average::parse(average)?,
    };
    let query = match (query_embeddings, query_labels) {
        (Some(e), Some(l)) => Some((e, l)),
        (None, None) => None,
        (e, _) => {
            let (arg, other) = if e.is_some() {
                ("query_labels", "query_embeddings")
            } else {
                ("query_embeddings", "query_labels")
            };
            return Err(
                Error::invalid(arg, "None", format!("a value, since {other} is given")).into(),
            );
        }
    };
    let m = without_gil(py, move || {
        let q = query.as_ref().map(|(e, l)| (&e.0, &l.0));
        match (q, &query_own) {
            (Some(q), Some(own)) => {
                let own = host_vec::<i64>(&own.to_kind(tch::Kind::Int64))?;
                eval::evaluate_in_gallery(&embeddings, &labels, q, &own, &opts)
            }
            _ => eval::evaluate(&embeddings, &labels, q, &opts),
        }
    })?;
    Ok((m.to_pairs(), m.left_out))
}

/// k-means; returns (assignments, centroids, inertia).
#[pyfunction]
#[pyo3(signature = (x, k, *, n_init = 1, max_iter = 300, seed = 0))]
fn kmeans(
    py: Python<'_>,
    x: PyTensor,
    k: i64,
    n_init: i64,
    max_iter: i64,
    #[pyo3(from_py_with = crate::python::convert::seed_arg)] seed: u64,
) -> PyResult<(PyTensor, PyTensor, f64)> {
    let n_init = count("n_init", n_init, "an integer >= 1")?;
    let max_iter = count("max_iter", max_iter, "an integer >= 1")?;
    let out = without_gil(py, move || eval::kmeans(&x, k, n_init, max_iter, seed))?;
    Ok((
        PyTensor(out.assignments),
        PyTensor(out.centroids),
        out.inertia,
    ))
}

/// Whether `kmeans` seeds `k` centres of `n` samples in rounds (else
/// greedily, as scikit-learn).
#[pyfunction]
fn kmeans_seeds_in_rounds(n: i64, k: i64) -> bool {
    eval::kmeans::seeds_in_rounds(n, k)
}

/// Normalised mutual information of two integer labellings.
#[pyfunction]
fn nmi(py: Python<'_>, labels: PyTensor, assignments: PyTensor) -> PyResult<f64> {
    without_gil(py, move || {
        let a = labels_vec(&labels, "labels", None)?;
        let b = labels_vec(&assignments, "assignments", None)?;
        eval::nmi(&a, &b)
    })
}

/// k nearest neighbours; returns (similarities, indices).
#[pyfunction]
#[pyo3(signature = (embeddings, k, query_embeddings = None, *, normalize = true, batch_size = None))]
fn knn(
    py: Python<'_>,
    embeddings: PyTensor,
    k: i64,
    query_embeddings: Option<PyTensor>,
    normalize: bool,
    batch_size: Option<i64>,
) -> PyResult<(PyTensor, PyTensor)> {
    let opts = KnnOptions {
        normalize,
        batch_size,
    };
    let (v, i) = without_gil(py, move || {
        eval::knn(
            &embeddings,
            query_embeddings.as_ref().map(|q| &q.0),
            k,
            &opts,
        )
    })?;
    Ok((PyTensor(v), PyTensor(i)))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(kmeans, m)?)?;
    m.add_function(wrap_pyfunction!(kmeans_seeds_in_rounds, m)?)?;
    m.add_function(wrap_pyfunction!(nmi, m)?)?;
    m.add_function(wrap_pyfunction!(knn, m)?)?;
    Ok(())
}
