//! What a run's network takes (`input.json` in the run folder): its input
//! channels, its classes and its evaluation transform, written when the run
//! starts, so that a run folder loads, embeds and exports without its
//! dataset (copied to another machine, say). Only the dataset's splits,
//! evaluation and the report need the images themselves.

use serde::{Deserialize, Serialize};

use super::run_dir::RunDir;
use super::runner::RunData;
use crate::data::transform::{Geometry, Normalization, Transform};
use crate::error::{ensure, Error, Result};
use crate::files::write_atomic;

/// The most training classes a run's classifier may have (SOP, the
/// largest benchmark, has 11,318).
pub const MAX_CLASSES: i64 = 1 << 24;

/// A run's input, as saved. Every field is required.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunInput {
    /// Channels the backbone reads.
    pub channels: i64,
    /// Training classes: the classifier's outputs.
    pub classes: i64,
    /// The evaluation transform: output side and channels, geometry, flip
    /// and the pixel normalisation (`mean_std` holds statistics of the
    /// training images, which only the dataset could give again).
    size: usize,
    transform_channels: usize,
    transform: Geometry,
    flip: bool,
    normalization: Normalization,
}

impl RunInput {
    /// The input of a run about to train on `data`.
    pub fn of(data: &RunData) -> Self {
        let t = &data.eval_transform;
        RunInput {
            channels: data.channels,
            classes: data.train.classes().len() as i64,
            size: t.size(),
            transform_channels: t.channels(),
            transform: t.geometry().clone(),
            flip: t.flip(),
            normalization: t.normalization().clone(),
        }
    }

    /// The evaluation transform it describes.
    pub fn eval_transform(&self) -> Result<Transform> {
        Transform::new(
            self.size,
            self.transform.clone(),
            self.flip,
            self.normalization.clone(),
            self.transform_channels,
        )
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
        let bad = |e: &dyn std::fmt::Display| Error::format(&path, None, e.to_string());
        let input: Self = serde_json::from_str(&text).map_err(|e| bad(&e))?;
        input.check().map_err(|e| bad(&e))?;
        Ok(Some(input))
    }

    /// What a run could have written: 1 or 3 channels, at most
    /// [`MAX_CLASSES`] classes, a transform that builds (its sizes bounded):
    /// nothing is allocated from an edited file's figures before this.
    fn check(&self) -> Result<()> {
        ensure(
            self.channels == 1 || self.channels == 3,
            "channels",
            || self.channels.to_string(),
            "1 or 3",
        )?;
        ensure(
            (1..=MAX_CLASSES).contains(&self.classes),
            "classes",
            || self.classes.to_string(),
            format!("1 to {MAX_CLASSES}"),
        )?;
        self.eval_transform().map(|_| ())
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
            transform: Geometry::PadCrop { pad: 0 },
            flip: false,
            normalization: Normalization::MeanStd {
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
        // Edited figures are refused before anything is allocated from them.
        for (from, to, message) in [
            (
                "\"size\": 28",
                "\"size\": 1000000",
                "size: expected at most 16384",
            ),
            (
                "\"classes\": 5",
                "\"classes\": 1000000000000",
                "classes: expected 1 to",
            ),
            (
                "\"channels\": 1",
                "\"channels\": 3000000",
                "channels: expected 1 or 3",
            ),
        ] {
            input.save(&dir).unwrap();
            let text = std::fs::read_to_string(dir.input()).unwrap();
            assert!(text.contains(from), "{text}");
            std::fs::write(dir.input(), text.replace(from, to)).unwrap();
            let err = RunInput::load(&dir).unwrap_err().to_string();
            assert!(err.contains("input.json") && err.contains(message), "{err}");
        }
        std::fs::remove_dir_all(&dir.root).unwrap();
    }
}
