//! Bindings of the sampler module.

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1};
use pyo3::prelude::*;

use super::errors::without_gil;
use crate::error::Error;
use crate::sampler::{ClassBalancedSampler, SamplerOptions};

/// A count from Python: negative values are argument errors, not overflows.
pub(crate) fn count(arg: &str, v: i64, expected: &str) -> Result<usize, Error> {
    usize::try_from(v).map_err(|_| Error::invalid(arg, v, expected))
}

/// P x K epoch plans (see `grouploss.ClassBalancedBatchSampler`).
#[pyclass(name = "ClassBalancedSampler", module = "grouploss._native")]
pub(crate) struct PySampler {
    inner: ClassBalancedSampler,
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
        seed: u64,
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
        Ok(PySampler { inner })
    }

    fn set_epoch(&mut self, epoch: u64) {
        self.inner.set_epoch(epoch);
    }

    #[getter]
    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[getter]
    fn classes_per_batch(&self) -> usize {
        self.inner.classes_per_batch()
    }

    #[getter]
    fn samples_per_class(&self) -> usize {
        self.inner.samples_per_class()
    }

    #[getter]
    fn batch_size(&self) -> usize {
        self.inner.batch_size()
    }

    #[getter]
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }

    #[getter]
    fn seed(&self) -> u64 {
        self.inner.options().seed
    }

    #[getter]
    fn num_replicas(&self) -> usize {
        self.inner.options().num_replicas
    }

    #[getter]
    fn rank(&self) -> usize {
        self.inner.options().rank
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
