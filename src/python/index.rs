//! Bindings of the retrieval index (`grouploss.Index` wraps them).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::Kind;

use super::errors::without_gil;
use crate::error::Error;
use crate::eval::input::labels_vec;
use crate::eval::Index;
use crate::names::{device_name, dtype_name};
use crate::train::runner::device;

/// An exact cosine-similarity index (see `grouploss.Index`).
#[pyclass(name = "Index", module = "grouploss._native", frozen)]
pub(crate) struct PyIndex {
    inner: Arc<Mutex<Index>>,
}

impl PyIndex {
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Index) -> crate::Result<T> + Send,
    ) -> PyResult<T> {
        let inner = Arc::clone(&self.inner);
        without_gil(py, move || {
            let mut guard = inner.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard)
        })
    }
}

fn storage(dtype: &str) -> Result<Kind, Error> {
    match dtype {
        "float32" => Ok(Kind::Float),
        "float16" => Ok(Kind::Half),
        other => Err(crate::error::not_one_of(
            "dtype",
            other,
            &["float32", "float16"],
        )),
    }
}

#[pymethods]
impl PyIndex {
    #[new]
    #[pyo3(signature = (dim, *, dtype = "float32", device = "cpu"))]
    fn new(dim: i64, dtype: &str, device: &str) -> PyResult<Self> {
        let index = Index::new(dim, storage(dtype)?, self::device(device)?)?;
        Ok(PyIndex {
            inner: Arc::new(Mutex::new(index)),
        })
    }

    /// Adds normalised `embeddings` under `ids` and `labels` (int64
    /// tensors, or None).
    #[pyo3(signature = (embeddings, ids = None, labels = None))]
    fn add(
        &self,
        py: Python<'_>,
        embeddings: PyTensor,
        ids: Option<PyTensor>,
        labels: Option<PyTensor>,
    ) -> PyResult<()> {
        self.run(py, move |index| {
            let m = Some((embeddings.size()[0], "embeddings"));
            let ids = ids.map(|t| labels_vec(&t, "ids", m)).transpose()?;
            let labels = labels.map(|t| labels_vec(&t, "labels", m)).transpose()?;
            index.add(&embeddings, ids, labels)
        })
    }

    /// (similarities, ids) of the `k` nearest stored vectors of each query.
    #[pyo3(signature = (queries, k, *, batch_size = None))]
    fn search(
        &self,
        py: Python<'_>,
        queries: PyTensor,
        k: i64,
        batch_size: Option<i64>,
    ) -> PyResult<(PyTensor, PyTensor)> {
        let (s, i) = self.run(py, move |index| index.search(&queries, k, batch_size))?;
        Ok((PyTensor(s), PyTensor(i)))
    }

    /// Writes the index (safetensors).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        self.run(py, move |index| index.save(&path))
    }

    /// Reads an index written by `save`.
    #[staticmethod]
    #[pyo3(signature = (path, *, device = "cpu"))]
    fn load(py: Python<'_>, path: PathBuf, device: &str) -> PyResult<Self> {
        let device = self::device(device)?;
        let index = without_gil(py, move || Index::load(&path, device))?;
        Ok(PyIndex {
            inner: Arc::new(Mutex::new(index)),
        })
    }

    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        self.run(py, |index| Ok(index.len()))
    }

    /// The vectors' width.
    #[getter]
    fn dim(&self, py: Python<'_>) -> PyResult<i64> {
        self.run(py, |index| Ok(index.dim()))
    }

    /// The storage dtype's name.
    #[getter]
    fn dtype(&self, py: Python<'_>) -> PyResult<String> {
        self.run(py, |index| Ok(dtype_name(index.kind())))
    }

    /// The device's name.
    #[getter]
    fn device(&self, py: Python<'_>) -> PyResult<String> {
        self.run(py, |index| Ok(device_name(index.device())))
    }

    /// The stored ids, in order.
    #[getter]
    fn ids(&self, py: Python<'_>) -> PyResult<Vec<i64>> {
        self.run(py, |index| Ok(index.ids()))
    }

    /// The stored labels, or None.
    #[getter]
    fn labels(&self, py: Python<'_>) -> PyResult<Option<Vec<i64>>> {
        self.run(py, |index| Ok(index.labels().map(<[i64]>::to_vec)))
    }

    /// Text saved with the index (a copy).
    #[getter]
    fn info(&self, py: Python<'_>) -> PyResult<BTreeMap<String, String>> {
        self.run(py, |index| Ok(index.info.clone()))
    }

    /// Replaces the text saved with the index.
    fn set_info(&self, py: Python<'_>, info: BTreeMap<String, String>) -> PyResult<()> {
        self.run(py, move |index| {
            index.info = info;
            Ok(())
        })
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        self.run(py, |index| Ok(index.describe()))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyIndex>()?;
    Ok(())
}
