//! Loading pretrained weights (a state dict with torchvision's names) into
//! a part of a `VarStore`, with a clear report of what did not match.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tch::{nn, Tensor};

use crate::error::{Error, Result};

/// What a state dict load did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    /// Variables that received a value.
    pub loaded: Vec<String>,
    /// Keys of the file that were left out on purpose: ImageNet classifier
    /// heads (`fc.*`, `last_linear.*`, `classifier.*`) and BatchNorm's
    /// `num_batches_tracked` counters.
    pub ignored: Vec<String>,
}

/// Reads the tensors of a `.safetensors` file. (`.pt` state dicts are read
/// in Python with `torch.load(weights_only=True)` and handed over as tensors,
/// so that no file can run code when loaded.)
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(Error::invalid(
            "pretrained",
            path.display(),
            "a .safetensors file (load .pt state dicts with torch.load(weights_only=True) \
             and pass the tensors)",
        ));
    }
    Tensor::read_safetensors(path).map_err(|e| Error::format(path, None, e.to_string()))
}

fn is_ignorable(key: &str) -> bool {
    key.ends_with("num_batches_tracked")
        || ["fc.", "last_linear.", "classifier."]
            .iter()
            .any(|p| key.starts_with(p))
}

/// Copies `tensors` into the variables of `vs` whose names start with
/// `prefix` (`prefix` + key). Every such variable must receive a value and
/// every key must be used, except the ignorable ones; otherwise the error
/// lists the missing and unexpected keys. Shapes must agree.
pub fn load_into(
    vs: &nn::VarStore,
    prefix: &str,
    tensors: Vec<(String, Tensor)>,
    source: &str,
) -> Result<LoadReport> {
    let mut targets: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .filter_map(|(name, t)| name.strip_prefix(prefix).map(|k| (k.to_string(), t)))
        .collect();
    let mut report = LoadReport::default();
    let mut unexpected = Vec::new();
    let mut values: HashMap<String, Tensor> = HashMap::new();
    for (key, value) in tensors {
        if targets.contains_key(&key) {
            values.insert(key, value);
        } else if is_ignorable(&key) {
            report.ignored.push(key);
        } else {
            unexpected.push(key);
        }
    }
    // A TorchScript backbone's batch counters keep their values when the
    // file has none (a counter is unused with a momentum).
    targets.retain(|k, _| values.contains_key(k) || !k.ends_with("num_batches_tracked"));
    let missing: Vec<String> = targets
        .keys()
        .filter(|k| !values.contains_key(*k))
        .cloned()
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        unexpected.sort();
        return Err(Error::invalid(
            "pretrained",
            format!(
                "{source}: missing keys [{}], unexpected keys [{}]",
                missing.join(", "),
                unexpected.join(", ")
            ),
            "a state dict with exactly the backbone's parameter and buffer names \
             (torchvision's naming)",
        ));
    }
    tch::no_grad(|| -> Result<()> {
        for (key, target) in targets.iter_mut() {
            let value = &values[key];
            if value.size() != target.size() {
                return Err(Error::invalid(
                    "pretrained",
                    format!("{source}: {key} of shape {:?}", value.size()),
                    format!("shape {:?}", target.size()),
                ));
            }
            target.copy_(&value.to_kind(target.kind()).to_device(target.device()));
            report.loaded.push(key.clone());
        }
        Ok(())
    })?;
    report.ignored.sort();
    Ok(report)
}
