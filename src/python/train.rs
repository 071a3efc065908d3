//! Bindings of the training loop and of trained runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::types::PyDict;

use super::convert::{serialize_to_py, table_from_py, to_py};
use super::errors::{catch_panic, without_gil};
use crate::error::Error;
use crate::loss::GroupLossSettings;
use crate::train::run_model::RunModel;
use crate::train::{self, Collective, SingleProcess, TrainConfig};

/// A full configuration (a dict as [`resolve_config`] returns) as the
/// typed configuration, validated.
fn config_from(config: &Bound<'_, PyDict>) -> PyResult<TrainConfig> {
    Ok(TrainConfig::resolve(None, None, table_from_py(config)?)?)
}

/// The resolved configuration (a dict) of a preset, a config file (TOML)
/// and overrides (a dict; None values are left unset).
#[pyfunction]
#[pyo3(signature = (preset = None, config_file = None, overrides = None))]
fn resolve_config(
    py: Python<'_>,
    preset: Option<&str>,
    config_file: Option<PathBuf>,
    overrides: Option<&Bound<'_, PyDict>>,
) -> PyResult<PyObject> {
    let overrides = overrides
        .map(table_from_py)
        .transpose()?
        .unwrap_or_default();
    let text = match &config_file {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?),
        None => None,
    };
    let source = config_file.as_ref().map(|p| p.display().to_string());
    let file = text.as_deref().zip(source.as_deref());
    let cfg = TrainConfig::resolve(preset, file, overrides)?;
    serialize_to_py(py, &cfg)
}

/// The Group Loss's options of a configuration (a dict), as the trainer
/// builds them (before its warm-up; the trainer seeds random anchors per
/// epoch).
#[pyfunction]
fn group_loss_options(config: &Bound<'_, PyDict>) -> PyResult<GroupLossSettings> {
    Ok(config_from(config)?.group_loss_settings())
}

/// The preset names.
#[pyfunction]
fn presets() -> Vec<&'static str> {
    train::PRESETS.to_vec()
}

/// For each loss, the options that it reads and some other loss does not.
#[pyfunction]
fn loss_options() -> PyResult<Vec<(&'static str, Vec<String>)>> {
    Ok(train::config::loss_options()?)
}

/// Each option and its description (the doc comment of its field).
#[pyfunction]
fn option_docs() -> Vec<(&'static str, &'static str)> {
    train::config::OPTION_DOCS.to_vec()
}

/// The run folder a configuration gets when `out_dir` is not set.
#[pyfunction]
fn default_run_dir(config: &Bound<'_, PyDict>) -> PyResult<String> {
    let cfg = config_from(config)?;
    Ok(train::runner::default_run_dir(&cfg).display().to_string())
}

/// Every variable (parameters and BatchNorm running statistics) of the
/// network that member `member` of a configuration (a dict) starts from,
/// before any pretrained weights: torch seeded with `seed + member`, then
/// the network built on the CPU. Copies, keyed `backbone.*`, `embed.*` and
/// `classifier.*`.
#[pyfunction]
#[pyo3(signature = (config, in_channels, num_classes, member = 0))]
fn initial_state_dict(
    py: Python<'_>,
    config: &Bound<'_, PyDict>,
    in_channels: i64,
    num_classes: i64,
    #[pyo3(from_py_with = crate::python::convert::member_arg)] member: usize,
) -> PyResult<BTreeMap<String, PyTensor>> {
    let cfg = config_from(config)?;
    let vars = without_gil(py, move || {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        train::runner::initial_network(&cfg, &vs, in_channels, num_classes, member)?;
        let vars = vs.variables();
        Ok(tch::no_grad(|| {
            vars.into_iter()
                .map(|(k, t)| (k, t.detach().copy()))
                .collect::<BTreeMap<_, _>>()
        }))
    })?;
    Ok(vars.into_iter().map(|(k, t)| (k, PyTensor(t))).collect())
}

/// A process group seen through a Python object (`grouploss.distributed
/// .ProcessGroup`): attributes `rank` and `world_size`, methods
/// `all_reduce_mean(tensors)`, `all_gather(tensor) -> list`,
/// `broadcast(tensors, src)` and `barrier()`. The training loop runs with the
/// GIL released; every collective takes it back for the call.
struct PyCollective {
    obj: Py<PyAny>,
    rank: usize,
    world_size: usize,
}

impl PyCollective {
    fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        let rank: usize = obj.getattr("rank")?.extract()?;
        let world_size: usize = obj.getattr("world_size")?.extract()?;
        if world_size < 1 || rank >= world_size {
            return Err(Error::invalid(
                "collective",
                format!("rank {rank} of world_size {world_size}"),
                "0 <= rank < world_size",
            )
            .into());
        }
        Ok(PyCollective {
            obj: obj.clone().unbind(),
            rank,
            world_size,
        })
    }

    fn call<T>(
        &self,
        method: &str,
        f: impl FnOnce(Python<'_>, &Bound<'_, PyAny>) -> PyResult<T>,
    ) -> crate::Result<T> {
        Python::with_gil(|py| f(py, self.obj.bind(py))).map_err(|e| Error::Collective {
            op: method.to_string(),
            rank: self.rank,
            message: e.to_string(),
        })
    }
}

fn wrap(tensors: &[tch::Tensor]) -> Vec<PyTensor> {
    tensors
        .iter()
        .map(|t| PyTensor(t.shallow_clone()))
        .collect()
}

impl Collective for PyCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_mean(&self, tensors: &[tch::Tensor]) -> crate::Result<()> {
        self.call("all_reduce_mean", |_, obj| {
            obj.call_method1("all_reduce_mean", (wrap(tensors),))
                .map(drop)
        })
    }

    fn all_gather(&self, tensor: &tch::Tensor) -> crate::Result<Vec<tch::Tensor>> {
        let parts: Vec<PyTensor> = self.call("all_gather", |_, obj| {
            obj.call_method1("all_gather", (PyTensor(tensor.shallow_clone()),))?
                .extract()
        })?;
        if parts.len() != self.world_size {
            return Err(Error::invalid(
                "all_gather",
                format!("{} tensors", parts.len()),
                format!("one per rank ({})", self.world_size),
            ));
        }
        Ok(parts.into_iter().map(|p| p.0).collect())
    }

    fn broadcast(&self, tensors: &[tch::Tensor], src: usize) -> crate::Result<()> {
        self.call("broadcast", |_, obj| {
            obj.call_method1("broadcast", (wrap(tensors), src))
                .map(drop)
        })
    }

    fn barrier(&self) -> crate::Result<()> {
        self.call("barrier", |_, obj| obj.call_method0("barrier").map(drop))
    }
}

/// Runs a training configuration (a dict) in `run_dir` with the GIL released;
/// returns the outcome as a dict (`run_dir`, `history`, `best_epoch`,
/// `test`, `ensemble_test`, `summary`). Ctrl-C saves `last` and raises
/// KeyboardInterrupt. With `collective` (see [`PyCollective`]) this process
/// is one rank of a data-parallel run; `device` overrides the
/// configuration's device for this process (e.g. `cuda:LOCAL_RANK`).
#[pyfunction]
#[pyo3(signature = (config, run_dir, collective = None, device = None))]
fn train_run(
    py: Python<'_>,
    config: &Bound<'_, PyDict>,
    run_dir: PathBuf,
    collective: Option<&Bound<'_, PyAny>>,
    device: Option<&str>,
) -> PyResult<PyObject> {
    let cfg = config_from(config)?;
    let device = train::runner::device(device.unwrap_or(&cfg.device))?;
    let coll = collective.map(PyCollective::new).transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    let sig = signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop)).ok();
    let flag = Arc::clone(&stop);
    let outcome = py.allow_threads(move || {
        catch_panic(|| {
            let coll: &dyn Collective = match &coll {
                Some(c) => c,
                None => &SingleProcess,
            };
            train::train_on(&cfg, &run_dir, &flag, device, coll)
        })
    });
    if let Some(id) = sig {
        signal_hook::low_level::unregister(id);
    }
    if matches!(outcome, Err(Error::Interrupted)) {
        // Python's own handler saw the signal too: raise its pending
        // KeyboardInterrupt now, so that it is not raised a second time later.
        py.check_signals()?;
    }
    let outcome = outcome?;
    if stop.load(Ordering::SeqCst) {
        // Ctrl-C after the last step (in the test evaluation, which runs to
        // its end): the run has finished and written its summary, so its
        // result is returned rather than lost to the KeyboardInterrupt that
        // Python's handler holds pending.
        if let Err(e) = py.check_signals() {
            if !e.is_instance_of::<PyKeyboardInterrupt>(py) {
                return Err(e);
            }
        }
    }
    serialize_to_py(py, &outcome)
}

/// A trained model loaded from its run folder.
#[pyclass(name = "RunModel", module = "grouploss._native", frozen)]
struct PyRunModel {
    inner: Arc<Mutex<RunModel>>,
}

impl PyRunModel {
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&RunModel) -> crate::Result<T> + Send,
    ) -> PyResult<T> {
        let inner = Arc::clone(&self.inner);
        without_gil(py, move || {
            let guard = inner.lock().unwrap_or_else(|e| e.into_inner());
            f(&guard)
        })
    }
}

#[pymethods]
impl PyRunModel {
    #[new]
    #[pyo3(signature = (run_dir, checkpoint = "best", device = "auto", trust_torchscript = false))]
    fn new(
        py: Python<'_>,
        run_dir: PathBuf,
        checkpoint: &str,
        device: &str,
        trust_torchscript: bool,
    ) -> PyResult<Self> {
        let (checkpoint, device) = (checkpoint.to_string(), device.to_string());
        let inner = without_gil(py, move || {
            RunModel::open(&run_dir, &checkpoint, &device, trust_torchscript)
        })?;
        Ok(PyRunModel {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    /// The run's resolved configuration (a dict).
    #[getter]
    fn config(&self, py: Python<'_>) -> PyResult<PyObject> {
        let cfg = self.run(py, |m| Ok(m.config.clone()))?;
        serialize_to_py(py, &cfg)
    }

    /// The Group Loss's options the run trained with (before its warm-up).
    #[getter]
    fn loss_options(&self, py: Python<'_>) -> PyResult<GroupLossSettings> {
        self.run(py, |m| Ok(m.config.group_loss_settings()))
    }

    /// The network's variables as CPU copies (`backbone.*`, `embed.*`,
    /// `classifier.*`).
    fn state_dict(&self, py: Python<'_>) -> PyResult<BTreeMap<String, PyTensor>> {
        let vars = self.run(py, |m| Ok(m.state_dict()))?;
        Ok(vars.into_iter().map(|(k, t)| (k, PyTensor(t))).collect())
    }

    /// What the network reads (a dict: channels, size, geometry, resize,
    /// scale, mean, std, source_channels).
    #[getter]
    fn input_spec(&self, py: Python<'_>) -> PyResult<PyObject> {
        let spec = self.run(py, |m| Ok(m.input_spec()))?;
        serialize_to_py(py, &spec)
    }

    /// Embeddings of images (float: already transformed; uint8: the run's
    /// evaluation transform is applied).
    fn embed(&self, py: Python<'_>, images: PyTensor) -> PyResult<PyTensor> {
        Ok(PyTensor(self.run(py, move |m| m.embed(&images))?))
    }

    /// Classifier logits of embeddings (N x embedding size).
    fn logits(&self, py: Python<'_>, embeddings: PyTensor) -> PyResult<PyTensor> {
        Ok(PyTensor(self.run(py, move |m| m.logits(&embeddings))?))
    }

    /// Embeddings and labels of a split of the run's dataset (or of the
    /// same dataset under another root).
    #[pyo3(signature = (split = "test", root = None))]
    fn embed_split(
        &self,
        py: Python<'_>,
        split: &str,
        root: Option<PathBuf>,
    ) -> PyResult<(PyTensor, PyTensor)> {
        let split = split.to_string();
        let (e, l) = self.run(py, move |m| {
            let ds = m.dataset(&split, root.as_deref())?;
            m.embed_dataset(&ds)
        })?;
        Ok((PyTensor(e), PyTensor(l)))
    }

    /// Embeddings and labels of a dataset opened by `grouploss.datasets`.
    fn embed_dataset(
        &self,
        py: Python<'_>,
        dataset: PyRef<'_, super::data::PyDataset>,
    ) -> PyResult<(PyTensor, PyTensor)> {
        let ds = Arc::clone(&dataset.inner);
        let (e, l) = self.run(py, move |m| m.embed_dataset(&ds))?;
        Ok((PyTensor(e), PyTensor(l)))
    }

    /// Metrics of a split: metric name to value.
    #[pyo3(signature = (split = "test"))]
    fn evaluate(&self, py: Python<'_>, split: &str) -> PyResult<PyObject> {
        let split = split.to_string();
        let m = self.run(py, move |m| m.evaluate(&split))?;
        to_py(py, &serde_json::Value::Object(m))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(resolve_config, m)?)?;
    m.add_function(wrap_pyfunction!(presets, m)?)?;
    m.add_function(wrap_pyfunction!(loss_options, m)?)?;
    m.add_function(wrap_pyfunction!(option_docs, m)?)?;
    m.add_function(wrap_pyfunction!(default_run_dir, m)?)?;
    m.add_function(wrap_pyfunction!(group_loss_options, m)?)?;
    m.add_function(wrap_pyfunction!(train_run, m)?)?;
    m.add_function(wrap_pyfunction!(initial_state_dict, m)?)?;
    m.add_class::<PyRunModel>()?;
    Ok(())
}
