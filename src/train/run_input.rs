//! What a run's network takes (`input.json` in the run folder): its input
//! channels, its classes and its evaluation transform, written when the run
//! starts, so that a run folder loads, embeds and exports without its
//! dataset (copied to another machine, say). Only the dataset's splits,
//! evaluation and the report need the images themselves.

use serde::{Deserialize, Serialize};

use super::run_dir::{write_atomic, RunDir};
use super::runner::RunData;
use crate::data::transform::{Geometry, Normalization, Transform};
use crate::error::{Error, Result};

/// The evaluation transform's geometry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "geometry", rename_all = "snake_case", deny_unknown_fields)]
enum EvalGeometry {
    /// Small images pass at `size` (resized first if they differ).
    PadCrop,
    /// Short side resized to `resize`, then the central crop.
    ResizeCenterCrop { resize: usize },
}

/// The pixel normalisation (`mean_std`: statistics of the training images,
/// which only the dataset could give again).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum EvalNormalization {
    Imagenet,
    CaffeBgr,
    None,
    MeanStd { mean: Vec<f32>, std: Vec<f32> },
}

/// A run's input, as saved. Every field is required.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunInput {
    /// Channels the backbone reads.
    pub channels: i64,
    /// Training classes: the classifier's outputs.
    pub classes: i64,
    /// The evaluation transform's output side and channels.
    size: usize,
    transform_channels: usize,
    transform: EvalGeometry,
    normalization: EvalNormalization,
}

impl RunInput {
    /// The input of a run about to train on `data`.
    pub fn of(data: &RunData) -> Result<Self> {
        let t = &data.eval_transform;
        let transform = match t.geometry() {
            Geometry::PadCrop { pad: 0 } => EvalGeometry::PadCrop,
            Geometry::ResizeCenterCrop { resize } => {
                EvalGeometry::ResizeCenterCrop { resize: *resize }
            }
            other => {
                return Err(Error::invalid(
                    "eval_transform",
                    format!("{other:?}"),
                    "an evaluation geometry (pad_crop without padding or resize_center_crop)",
                ))
            }
        };
        let normalization = match t.normalization() {
            Normalization::Imagenet => EvalNormalization::Imagenet,
            Normalization::CaffeBgr => EvalNormalization::CaffeBgr,
            Normalization::Unit => EvalNormalization::None,
            Normalization::MeanStd { mean, std } => EvalNormalization::MeanStd {
                mean: mean.clone(),
                std: std.clone(),
            },
        };
        Ok(RunInput {
            channels: data.channels,
            classes: data.train.classes().len() as i64,
            size: t.size(),
            transform_channels: t.channels(),
            transform,
            normalization,
        })
    }

    /// The evaluation transform it describes.
    pub fn eval_transform(&self) -> Result<Transform> {
        let norm = match &self.normalization {
            EvalNormalization::Imagenet => Normalization::Imagenet,
            EvalNormalization::CaffeBgr => Normalization::CaffeBgr,
            EvalNormalization::None => Normalization::Unit,
            EvalNormalization::MeanStd { mean, std } => Normalization::MeanStd {
                mean: mean.clone(),
                std: std.clone(),
            },
        };
        let (size, channels) = (self.size, self.transform_channels);
        match self.transform {
            EvalGeometry::PadCrop => Transform::pad_crop(size, 0, false, norm, channels),
            EvalGeometry::ResizeCenterCrop { resize } => {
                Transform::resize_center_crop(size, resize, norm, channels)
            }
        }
    }

    /// Writes `input.json` into the run folder.
    pub fn save(&self, dir: &RunDir) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::invalid("input", e.to_string(), "a serialisable input"))?;
        write_atomic(&dir.input(), text.as_bytes())
    }

    /// The run folder's `input.json`; None for a run from before it was
    /// written (its dataset gives the same again).
    pub fn load(dir: &RunDir) -> Result<Option<Self>> {
        let path = dir.input();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::format(path.display().to_string(), None, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_round_trips_and_a_missing_field_is_an_error() {
        let dir = std::env::temp_dir().join(format!("run-input-{}", std::process::id()));
        let dir = RunDir::new(dir);
        let input = RunInput {
            channels: 1,
            classes: 5,
            size: 28,
            transform_channels: 1,
            transform: EvalGeometry::PadCrop,
            normalization: EvalNormalization::MeanStd {
                mean: vec![0.286_041_7],
                std: vec![0.353_023_1],
            },
        };
        assert_eq!(RunInput::load(&dir).unwrap(), None);
        input.save(&dir).unwrap();
        assert_eq!(RunInput::load(&dir).unwrap(), Some(input.clone()));
        let t = input.eval_transform().unwrap();
        assert_eq!((t.size(), t.channels()), (28, 1));
        let text = std::fs::read_to_string(dir.input()).unwrap();
        std::fs::write(dir.input(), text.replace("\"classes\": 5,", "")).unwrap();
        let err = RunInput::load(&dir).unwrap_err().to_string();
        assert!(err.contains("missing field `classes`"), "{err}");
        std::fs::remove_dir_all(&dir.root).unwrap();
    }
}
