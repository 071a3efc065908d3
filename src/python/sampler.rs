//! Bindings of the sampler module.

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1};
use pyo3::prelude::*;

use super::convert::count;
use super::errors::without_gil;
use crate::sampler::{ClassBalancedSampler, SamplerOptions};

/// P x K epoch plans (see `grouploss.ClassBalancedBatchSampler`).
#[pyclass(name = "ClassBalancedSampler", module = "grouploss._native")]
pub(crate) struct PySampler {
    inner: ClassBalancedSampler,
    /// P: classes per batch.
    #[pyo3(get)]
    classes_per_batch: usize,
    /// K: samples per class.
    #[pyo3(get)]
    samples_per_class: usize,
    /// P x K.
    #[pyo3(get)]
    batch_size: usize,
    /// Classes in the labels.
    #[pyo3(get)]
    num_classes: usize,
    #[pyo3(get)]
    seed: u64,
    #[pyo3(get)]
    num_replicas: usize,
    #[pyo3(get)]
    rank: usize,
}

#[pymethods]
impl PySampler {
    #[new]
    #[pyo3(signature = (labels, classes_per_batch, samples_per_class, *, seed = 0, num_replicas = 1, rank = 0))]
    fn new(
        py: Python<'_>,
        labels: PyReadonlyArray1<'_, i64>,
        classes_per_batch: i64,
        samples_per_class: i64,
        #[pyo3(from_py_with = crate::python::convert::seed_arg)] seed: u64,
        num_replicas: i64,
        rank: i64,
    ) -> PyResult<Self> {
        let labels = labels.as_array().to_vec();
        let p = count("classes_per_batch", classes_per_batch, "an integer >= 1")?;
        let k = count("samples_per_class", samples_per_class, "an integer >= 1")?;
        let options = SamplerOptions {
            seed,
            num_replicas: count("num_replicas", num_replicas, "an integer >= 1")?,
            rank: count("rank", rank, "an integer >= 0")?,
        };
        let inner = without_gil(py, move || {
            ClassBalancedSampler::new(&labels, p, k, options)
        })?;
        Ok(PySampler {
            classes_per_batch: inner.classes_per_batch(),
            samples_per_class: inner.samples_per_class(),
            batch_size: inner.batch_size(),
            num_classes: inner.num_classes(),
            seed: inner.options().seed,
            num_replicas: inner.options().num_replicas,
            rank: inner.options().rank,
            inner,
        })
    }

    fn set_epoch(&mut self, #[pyo3(from_py_with = crate::python::convert::epoch_arg)] epoch: u64) {
        self.inner.set_epoch(epoch);
    }

    #[getter]
    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// This rank's batches of the current epoch, int64 `(len, batch_size)`.
    fn plan<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<i64>>> {
        let sampler = &self.inner;
        let flat = without_gil(py, || {
            Ok(sampler
                .plan_flat()
                .into_iter()
                .map(|i| i as i64)
                .collect::<Vec<i64>>())
        })?;
        PyArray1::from_vec(py, flat).reshape([self.inner.len(), self.inner.batch_size()])
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySampler>()?;
    Ok(())
}
