//! Bindings of the data module: datasets, transforms and the loader.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use numpy::{PyArray1, PyArray3, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::Tensor;

use super::convert::count;
use super::errors::without_gil;
use crate::data::{
    self, Dataset, DatasetOptions, Epoch, Image, Loader, LoaderOptions, Normalization, OnError,
    ReaderOptions, Split, Transform, Workspace,
};
use crate::error::Error;
use crate::rng::Rng;

/// One split of a dataset read by the Rust readers.
#[pyclass(name = "Dataset", module = "grouploss._native", frozen)]
pub(crate) struct PyDataset {
    pub(crate) inner: Arc<Dataset>,
}

/// Opens a dataset (see `grouploss.datasets`).
#[pyfunction]
#[pyo3(signature = (
    kind, root = None, split = "train", *, val_fraction = 0.0, split_seed = 0, zero_shot = true,
    train_fraction = 0.5, csv_file = None
))]
#[allow(clippy::too_many_arguments)]
fn open_dataset(
    py: Python<'_>,
    kind: &str,
    root: Option<PathBuf>,
    split: &str,
    val_fraction: f64,
    #[pyo3(from_py_with = crate::python::convert::split_seed_arg)] split_seed: u64,
    zero_shot: bool,
    train_fraction: f64,
    csv_file: Option<PathBuf>,
) -> PyResult<PyDataset> {
    let options = DatasetOptions {
        split: Split::parse(split)?,
        val_fraction,
        split_seed,
    };
    let extra = ReaderOptions {
        zero_shot,
        train_fraction,
        csv_file,
    };
    let kind = kind.to_string();
    let ds = without_gil(py, move || {
        data::open(&kind, root.as_deref(), &options, &extra)
    })?;
    Ok(PyDataset {
        inner: Arc::new(ds),
    })
}

/// Opens a list of image files (see `grouploss.datasets.ImageFiles`).
#[pyfunction]
fn open_image_files(py: Python<'_>, paths: Vec<PathBuf>) -> PyResult<PyDataset> {
    let ds = without_gil(py, move || data::image_files(&paths))?;
    Ok(PyDataset {
        inner: Arc::new(ds),
    })
}

impl PyDataset {
    fn index(&self, index: i64) -> Result<usize, Error> {
        usize::try_from(index)
            .ok()
            .filter(|&i| i < self.inner.len())
            .ok_or_else(|| {
                Error::invalid(
                    "index",
                    index,
                    format!("an index in [0, {})", self.inner.len()),
                )
            })
    }
}

fn image_array<'py>(py: Python<'py>, image: Image) -> PyResult<Bound<'py, PyArray3<u8>>> {
    let shape = [image.height, image.width, image.channels];
    PyArray1::from_vec(py, image.data).reshape(shape)
}

fn chw_tensor(values: Vec<f32>, shape: [usize; 3]) -> PyTensor {
    let shape = shape.map(|d| d as i64);
    PyTensor(Tensor::from_slice(&values).view(shape))
}

#[pymethods]
impl PyDataset {
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    #[getter]
    fn root(&self) -> String {
        self.inner.root().display().to_string()
    }

    #[getter]
    fn split(&self) -> &'static str {
        self.inner.split().name()
    }

    #[getter]
    fn labels<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_slice(py, self.inner.labels())
    }

    #[getter]
    fn classes(&self) -> Vec<String> {
        self.inner.classes().to_vec()
    }

    #[getter]
    fn is_query<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyArray1<bool>>> {
        self.inner.is_query().map(|f| PyArray1::from_slice(py, f))
    }

    #[getter]
    fn is_gallery<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyArray1<bool>>> {
        self.inner.is_gallery().map(|f| PyArray1::from_slice(py, f))
    }

    fn describe(&self, index: i64) -> PyResult<String> {
        Ok(self.inner.describe(self.index(index)?))
    }

    /// The file of sample `index` as the OS names it: a name that is not
    /// UTF-8 comes back with Python's surrogate escapes, so that `open`
    /// finds it (a lossy conversion would name no file).
    fn path(&self, index: i64) -> PyResult<Option<OsString>> {
        Ok(self
            .inner
            .path(self.index(index)?)
            .map(|p| p.as_os_str().to_os_string()))
    }

    /// Sample `index` decoded, uint8 `(H, W, C)` with C = 1 or 3.
    fn load<'py>(&self, py: Python<'py>, index: i64) -> PyResult<Bound<'py, PyArray3<u8>>> {
        let i = self.index(index)?;
        let ds = &self.inner;
        let image = without_gil(py, || ds.load(i))?;
        image_array(py, image)
    }

    /// Sample `index` through `transform`, float32 `(C, H, W)`.
    fn load_transformed(
        &self,
        py: Python<'_>,
        index: i64,
        transform: &PyTransform,
        #[pyo3(from_py_with = crate::python::convert::seed_arg)] seed: u64,
    ) -> PyResult<PyTensor> {
        let i = self.index(index)?;
        let (ds, t) = (&self.inner, &transform.inner);
        let values = without_gil(py, || {
            let mut out = vec![0f32; t.output_len()];
            ds.load_into(i, t, &mut Rng::new(seed), &mut out, &mut Workspace::new())?;
            Ok(out)
        })?;
        Ok(chw_tensor(values, t.output_shape()))
    }
}

/// A decode + geometry + normalisation pipeline (see `grouploss.data`).
#[pyclass(name = "Transform", module = "grouploss._native", frozen)]
pub(crate) struct PyTransform {
    inner: Transform,
}

fn parse_normalization(
    name: &str,
    mean: Option<Vec<f32>>,
    std: Option<Vec<f32>>,
) -> Result<Normalization, Error> {
    match (name, mean, std) {
        ("mean_std", Some(mean), Some(std)) => Ok(Normalization::MeanStd { mean, std }),
        ("mean_std", _, _) => Err(Error::invalid(
            "normalization",
            "(mean, std) without both",
            "a mean and a std",
        )),
        (name, None, None) => Normalization::parse(name),
        (name, _, _) => Err(Error::invalid(
            "normalization",
            format!("{name:?} with a mean or std"),
            "mean and std only with normalization='mean_std'",
        )),
    }
}

/// Declares the Python function `$name` that builds a transform with
/// `Transform::$name`: its own arguments (`$arg`), then `normalization`, `mean`,
/// `std` and `channels`, which every transform takes. `$value`s are the
/// constructor's leading arguments, made from the `$arg`s; they are checked
/// first, then the normalisation and the channels, in signature order.
macro_rules! transform_function {
    (
        $(#[doc = $doc:expr])*
        #[pyo3($($options:tt)*)]
        fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => ($($value:expr),* $(,)?);
    ) => {
        $(#[doc = $doc])*
        #[pyfunction]
        #[pyo3($($options)*)]
        #[allow(clippy::too_many_arguments)]
        fn $name(
            $($arg: $ty,)*
            normalization: &str,
            mean: Option<Vec<f32>>,
            std: Option<Vec<f32>>,
            channels: i64,
        ) -> PyResult<PyTransform> {
            let inner = Transform::$name(
                $($value,)*
                parse_normalization(normalization, mean, std)?,
                count("channels", channels, "1 or 3")?,
            )?;
            Ok(PyTransform { inner })
        }
    };
}

transform_function! {
    /// RandomResizedCrop + horizontal flip.
    #[pyo3(signature = (
        size, scale = (0.08, 1.0), ratio = (0.75, 4.0 / 3.0), flip = true, normalization = "imagenet",
        mean = None, std = None, channels = 3
    ), text_signature = "(size, scale=(0.08, 1.0), ratio=(0.75, 1.3333333333333333), flip=True, \
        normalization='imagenet', mean=None, std=None, channels=3)")]
    fn random_resized_crop(size: i64, scale: (f64, f64), ratio: (f64, f64), flip: bool) => (
        count("size", size, "an integer >= 1")?,
        scale,
        ratio,
        flip,
    );
}

transform_function! {
    /// Resize of the short side + centre crop.
    #[pyo3(signature = (size, resize, normalization = "imagenet", mean = None, std = None, channels = 3))]
    fn resize_center_crop(size: i64, resize: i64) => (
        count("size", size, "an integer >= 1")?,
        count("resize", resize, "an integer >= size")?,
    );
}

transform_function! {
    /// Small images: optional pad-and-crop jitter and flip.
    #[pyo3(signature = (size, pad = 0, flip = false, normalization = "none", mean = None, std = None, channels = 1))]
    fn pad_crop(size: i64, pad: i64, flip: bool) => (
        count("size", size, "an integer >= 1")?,
        count("pad", pad, "an integer >= 0")?,
        flip,
    );
}

#[pymethods]
impl PyTransform {
    /// Applies the transform to a uint8 image `(H, W)` or `(H, W, C)`.
    #[pyo3(signature = (image, seed = 0))]
    fn __call__(
        &self,
        py: Python<'_>,
        image: &Bound<'_, PyAny>,
        #[pyo3(from_py_with = crate::python::convert::seed_arg)] seed: u64,
    ) -> PyResult<PyTensor> {
        let arr = image.downcast::<numpy::PyArrayDyn<u8>>().map_err(|_| {
            Error::invalid(
                "image",
                image.get_type().to_string(),
                "a numpy uint8 array (H, W) or (H, W, C)",
            )
        })?;
        let shape = arr.shape().to_vec();
        let (h, w, c) = match shape[..] {
            [h, w] => (h, w, 1),
            [h, w, c] if c == 1 || c == 3 => (h, w, c),
            _ => {
                return Err(Error::invalid(
                    "image",
                    format!("shape {shape:?}"),
                    "(H, W), (H, W, 1) or (H, W, 3)",
                )
                .into())
            }
        };
        if h == 0 || w == 0 {
            return Err(
                Error::invalid("image", format!("shape {shape:?}"), "a non-empty image").into(),
            );
        }
        let data: Vec<u8> = arr.readonly().as_array().iter().copied().collect();
        let t = &self.inner;
        let values = without_gil(py, move || {
            let mut out = vec![0f32; t.output_len()];
            t.apply(
                &Image::new(w, h, c, data),
                &mut Rng::new(seed),
                &mut out,
                &mut Workspace::new(),
            )
            .map_err(|m| Error::invalid("image", m, "a decodable image"))?;
            Ok(out)
        })?;
        Ok(chw_tensor(values, t.output_shape()))
    }

    #[getter]
    fn size(&self) -> usize {
        self.inner.size()
    }

    #[getter]
    fn channels(&self) -> usize {
        self.inner.channels()
    }

    #[getter]
    fn output_shape(&self) -> (usize, usize, usize) {
        let [c, h, w] = self.inner.output_shape();
        (c, h, w)
    }

    fn __repr__(&self) -> String {
        format!(
            "Transform(size={}, geometry={:?}, flip={}, normalization={:?}, channels={})",
            self.inner.size(),
            self.inner.geometry(),
            self.inner.flip(),
            self.inner.normalization(),
            self.inner.channels()
        )
    }
}

/// The threaded batch loader (see `grouploss.data.Loader`).
#[pyclass(name = "Loader", module = "grouploss._native", frozen)]
pub(crate) struct PyLoader {
    inner: Arc<Loader>,
}

fn batches_from(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<usize>>> {
    let to_index = |v: i64| count("batch_sampler", v, "non-negative indices");
    if let Ok(arr) = obj.extract::<PyReadonlyArray2<'_, i64>>() {
        let a = arr.as_array();
        return Ok(a
            .rows()
            .into_iter()
            .map(|r| {
                r.iter()
                    .map(|&v| to_index(v))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?);
    }
    let lists: Vec<Vec<i64>> = obj.extract().map_err(|_| {
        Error::invalid(
            "batch_sampler",
            obj.get_type().to_string(),
            "batches: lists of integer indices",
        )
    })?;
    Ok(lists
        .into_iter()
        .map(|b| b.into_iter().map(to_index).collect::<Result<Vec<_>, _>>())
        .collect::<Result<Vec<_>, _>>()?)
}

#[pymethods]
impl PyLoader {
    #[new]
    #[pyo3(signature = (dataset, transform, *, num_threads, prefetch, seed = 0, on_error = "raise"))]
    fn new(
        dataset: &PyDataset,
        transform: &PyTransform,
        num_threads: i64,
        prefetch: i64,
        #[pyo3(from_py_with = crate::python::convert::seed_arg)] seed: u64,
        on_error: &str,
    ) -> PyResult<Self> {
        let options = LoaderOptions {
            num_threads: count("num_threads", num_threads, "an integer >= 1")?,
            prefetch: count("prefetch", prefetch, "an integer >= 1")?,
            seed,
            on_error: OnError::parse(on_error)?,
        };
        let inner = Loader::new(Arc::clone(&dataset.inner), transform.inner.clone(), options)?;
        Ok(PyLoader {
            inner: Arc::new(inner),
        })
    }

    /// Starts loading `batches` (int64 array `(n, b)` or lists of indices).
    fn epoch(
        &self,
        py: Python<'_>,
        batches: &Bound<'_, PyAny>,
        #[pyo3(from_py_with = crate::python::convert::epoch_arg)] epoch: u64,
    ) -> PyResult<PyEpoch> {
        let batches = batches_from(batches)?;
        let loader = &self.inner;
        let it = without_gil(py, move || loader.epoch(batches, epoch))?;
        Ok(PyEpoch {
            inner: Mutex::new(Some(it)),
        })
    }

    /// One batch, loaded in the calling thread: `(images, labels, indices)`.
    fn load_batch(
        &self,
        py: Python<'_>,
        batch: Vec<i64>,
        #[pyo3(from_py_with = crate::python::convert::epoch_arg)] epoch: u64,
        batch_index: i64,
    ) -> PyResult<(PyTensor, PyTensor, Vec<usize>)> {
        let batch_index = count("batch_index", batch_index, "an integer >= 0")?;
        let batch = batch
            .into_iter()
            .map(|v| count("batch", v, "non-negative indices"))
            .collect::<Result<Vec<_>, _>>()?;
        let loader = &self.inner;
        let b = without_gil(py, move || loader.load_batch(&batch, epoch, batch_index))?;
        Ok((PyTensor(b.images), PyTensor(b.labels), b.indices))
    }

    /// `(index, message)` of the samples skipped since the last call.
    fn take_skipped(&self) -> Vec<(usize, String)> {
        self.inner
            .take_skipped()
            .into_iter()
            .map(|s| (s.index, s.message))
            .collect()
    }
}

/// The batches of one epoch; `__next__` waits with the GIL released.
#[pyclass(name = "LoaderEpoch", module = "grouploss._native", frozen)]
pub(crate) struct PyEpoch {
    inner: Mutex<Option<Epoch>>,
}

#[pymethods]
impl PyEpoch {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// `(images, labels, indices)` of the next batch.
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(PyTensor, PyTensor, Vec<usize>)>> {
        let inner = &self.inner;
        let next = without_gil(py, || {
            let mut guard = inner.lock().unwrap_or_else(|e| e.into_inner());
            guard.as_mut().and_then(|e| e.next()).transpose()
        })?;
        Ok(next.map(|b| (PyTensor(b.images), PyTensor(b.labels), b.indices)))
    }

    fn __len__(&self) -> usize {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map_or(0, Epoch::remaining)
    }

    /// Stops the threads of the epoch now (also done when it is collected).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        without_gil(py, || {
            let epoch = inner.lock().unwrap_or_else(|e| e.into_inner()).take();
            drop(epoch);
            Ok(())
        })
    }
}

/// Where a dataset of `kind` that the library builds (glyphs) is written
/// by default, and so found again without a root: `$GROUPLOSS_DATA/<name>`,
/// else the user data folder's `<name>`.
#[pyfunction]
fn default_build_dir(kind: &str) -> PyResult<PathBuf> {
    let home = data::home(kind).ok_or_else(|| {
        let kinds: Vec<&str> = data::readers::HOMES.iter().map(|(k, _)| *k).collect();
        crate::error::not_one_of("kind", kind, &kinds)
    })?;
    Ok(data::paths::build_dir(home)?)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDataset>()?;
    m.add("SPLITS", Split::NAMES)?;
    m.add_class::<PyTransform>()?;
    m.add_class::<PyLoader>()?;
    m.add_class::<PyEpoch>()?;
    m.add_function(wrap_pyfunction!(open_dataset, m)?)?;
    m.add_function(wrap_pyfunction!(open_image_files, m)?)?;
    m.add_function(wrap_pyfunction!(default_build_dir, m)?)?;
    m.add_function(wrap_pyfunction!(random_resized_crop, m)?)?;
    m.add_function(wrap_pyfunction!(resize_center_crop, m)?)?;
    m.add_function(wrap_pyfunction!(pad_crop, m)?)?;
    Ok(())
}
