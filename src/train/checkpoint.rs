//! Checkpoints: one safetensors file holding the network's variables
//! (`model.*`), the optimizer's state (`optim.*`) and, in the file's
//! metadata, the trainer's state as JSON. Written to a temporary file,
//! flushed to disk and renamed, so a crash or a full disk never leaves a
//! broken checkpoint in place of a good one. safetensors holds tensors and
//! strings only: loading one can never run code.

use std::collections::HashMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tch::Tensor;

use crate::error::{Error, Result};
use crate::files::read_safetensors_with_metadata;
pub use crate::files::NamedTensors;

/// The metadata key of the trainer state.
const STATE_KEY: &str = "grouploss.trainer_state";
/// The metadata key of the format tag.
const FORMAT_KEY: &str = "grouploss.format";
const FORMAT: &str = "grouploss-checkpoint-1";

/// A checkpoint in memory; `S` is the typed state kept in its metadata
/// ([`super::state::TrainerState`] for `last`, [`super::state::BestState`]
/// for `best`).
pub struct Checkpoint<S> {
    /// Network variables by their VarStore names.
    pub model: Vec<(String, Tensor)>,
    /// Optimizer state by `{param}.m` / `{param}.v`.
    pub optimizer: Vec<(String, Tensor)>,
    /// The Group Loss's memory of earlier batches (`memory_size`), by name.
    pub memory: Vec<(String, Tensor)>,
    /// The trainer state.
    pub state: S,
}

impl<S: Serialize> Checkpoint<S> {
    /// Writes the checkpoint atomically to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::with_capacity(self.model.len() + self.optimizer.len());
        for (k, t) in &self.model {
            tensors.push((format!("model.{k}"), t.shallow_clone()));
        }
        for (k, t) in &self.optimizer {
            tensors.push((format!("optim.{k}"), t.shallow_clone()));
        }
        for (k, t) in &self.memory {
            tensors.push((format!("memory.{k}"), t.shallow_clone()));
        }
        let state = serde_json::to_string(&self.state)
            .map_err(|e| Error::invalid("checkpoint", e.to_string(), "a serialisable state"))?;
        let metadata = HashMap::from([
            (FORMAT_KEY.to_string(), FORMAT.to_string()),
            (STATE_KEY.to_string(), state),
        ]);
        crate::files::write_safetensors_atomic(path, &tensors, metadata)
    }
}

impl<S: DeserializeOwned> Checkpoint<S> {
    /// Reads a checkpoint written by [`Checkpoint::save`]; a state with a
    /// missing or unknown field is an error naming the field, a tensor with
    /// NaN or infinite values one naming the tensor.
    pub fn load(path: &Path) -> Result<Self> {
        let (tensors, metadata) = read_safetensors_with_metadata(path)?;
        if metadata.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
            return Err(Error::format(
                path,
                None,
                format!("not a grouploss checkpoint (no {FORMAT_KEY}: {FORMAT} metadata)"),
            ));
        }
        let text = metadata.get(STATE_KEY).ok_or_else(|| {
            Error::format(
                path,
                None,
                format!("no trainer state ({STATE_KEY} metadata)"),
            )
        })?;
        let state = serde_json::from_str(text)
            .map_err(|e| Error::format(path, None, format!("trainer state: {e}")))?;
        let mut model = Vec::new();
        let mut optimizer = Vec::new();
        let mut memory = Vec::new();
        for (name, t) in tensors {
            // Training refuses a non-finite loss, so a checkpoint it wrote
            // holds finite values: others are a damaged or edited file.
            if t.is_floating_point() && !bool::try_from(t.isfinite().all())? {
                return Err(Error::format(
                    path,
                    None,
                    format!("tensor {name:?} has values that are not finite"),
                ));
            }
            if let Some(k) = name.strip_prefix("model.") {
                model.push((k.to_string(), t));
            } else if let Some(k) = name.strip_prefix("optim.") {
                optimizer.push((k.to_string(), t));
            } else if let Some(k) = name.strip_prefix("memory.") {
                memory.push((k.to_string(), t));
            }
        }
        Ok(Checkpoint {
            model,
            optimizer,
            memory,
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use tch::{Device, Kind};

    #[test]
    fn checkpoints_round_trip_and_replace_atomically() {
        let dir = std::env::temp_dir().join(format!("gl-ckpt-{}", std::process::id()));
        let path = dir.join("last.safetensors");
        let a = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::from_slice(&[1i64, 2, 3]);
        let ck = Checkpoint {
            model: vec![("w".into(), a.shallow_clone())],
            optimizer: vec![("w.m".into(), b.shallow_clone())],
            memory: vec![("labels".into(), b.shallow_clone())],
            state: serde_json::json!({"epoch": 3}),
        };
        ck.save(&path).unwrap();
        let back = Checkpoint::<serde_json::Value>::load(&path).unwrap();
        assert!(back.model[0].1.equal(&a));
        assert!(back.optimizer[0].1.equal(&b));
        assert!(back.memory[0].0 == "labels" && back.memory[0].1.equal(&b));
        assert_eq!(back.state["epoch"], 3);
        // A second save replaces the first whole.
        let a2 = &a + 1.0;
        let ck2 = Checkpoint {
            model: vec![("w".into(), a2.shallow_clone())],
            optimizer: Vec::new(),
            memory: Vec::new(),
            state: serde_json::json!({"epoch": 4}),
        };
        ck2.save(&path).unwrap();
        let back = Checkpoint::<serde_json::Value>::load(&path).unwrap();
        assert!(back.model.len() == 1 && back.model[0].1.equal(&a2));
        assert!(back.optimizer.is_empty() && back.memory.is_empty());
        assert_eq!(back.state["epoch"], 4);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // A file that is not a checkpoint is named in the error.
        fs::write(dir.join("junk.safetensors"), b"not at all").unwrap();
        let e = Checkpoint::<serde_json::Value>::load(&dir.join("junk.safetensors"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("junk.safetensors") && e.contains("not a safetensors file"),
            "{e}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_tensor_with_nan_values_is_named() {
        let dir = std::env::temp_dir().join(format!("gl-ckpt-nan-{}", std::process::id()));
        let path = dir.join("last.safetensors");
        let v = Tensor::from_slice(&[1.0f32, f32::NAN]);
        let ck = Checkpoint {
            model: Vec::new(),
            optimizer: vec![("w.v".into(), v)],
            memory: Vec::new(),
            state: serde_json::json!({"epoch": 1}),
        };
        ck.save(&path).unwrap();
        let e = Checkpoint::<serde_json::Value>::load(&path)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("last.safetensors")
                && e.contains("\"optim.w.v\" has values that are not finite"),
            "{e}"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
