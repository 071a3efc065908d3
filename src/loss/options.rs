//! The Group Loss's options: [`GroupLossOptions`] as the computation
//! reads them, and [`GroupLossSettings`], the same options by the names and
//! values users write (Python's `GroupLossOptions`, the trainer's TOML keys).

use serde::{Deserialize, Serialize};

use super::{AnchorMode, Similarity};
use crate::error::{Error, Result};

/// The hyperparameters of the Group Loss. `Default` is the release's CUB
/// setting (T = 24, 2 anchors, 1 iteration, both terms weighted 1).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupLossOptions {
    /// Softmax temperature T of the prior `softmax(logits / T)`.
    pub temperature: f64,
    /// Anchors (labelled points) per class in each batch.
    pub num_anchors: i64,
    /// Replicator steps.
    pub num_iters: i64,
    /// Weight of the refined NLL term.
    pub gtg_weight: f64,
    /// Weight of the cross-entropy on the raw logits.
    pub ce_weight: f64,
    /// The similarity W.
    pub similarity: Similarity,
    /// Sharpness of W: its entries raised to this power (>= 1; 1, the
    /// release, leaves W as is).
    pub similarity_power: f64,
    /// Zero the diagonal of W (the paper's text) instead of keeping it at 1.
    pub zero_diagonal: bool,
    /// How anchors are chosen.
    pub anchors: AnchorMode,
    /// Refine over the classes present in the batch only: the prior's columns
    /// are restricted to them and renormalised (for thousands of classes).
    pub batch_classes_only: bool,
}

impl GroupLossOptions {
    /// The options' names as Python and the trainer's configuration spell
    /// them (`sigma` belongs to the gaussian similarity, `seed` to random
    /// anchors).
    pub const NAMES: [&'static str; 12] = [
        "temperature",
        "num_anchors",
        "num_iters",
        "gtg_weight",
        "ce_weight",
        "similarity",
        "sigma",
        "similarity_power",
        "zero_diagonal",
        "anchors",
        "seed",
        "batch_classes_only",
    ];

    /// The release's CUB setting.
    pub const DEFAULT: GroupLossOptions = GroupLossOptions {
        temperature: 24.0,
        num_anchors: 2,
        num_iters: 1,
        gtg_weight: 1.0,
        ce_weight: 1.0,
        similarity: Similarity::Correlation,
        similarity_power: 1.0,
        zero_diagonal: false,
        anchors: AnchorMode::First,
        batch_classes_only: false,
    };

    /// Checks every value, naming the option at fault (the only place the
    /// options are validated: the Python classes and the trainer's
    /// configuration come here).
    pub fn validate(&self) -> Result<()> {
        super::checks::check_options(self)
    }
}

impl Default for GroupLossOptions {
    fn default() -> Self {
        GroupLossOptions::DEFAULT
    }
}

/// The Group Loss's options as users write them, validated when built:
/// `GroupLossOptions(temperature=24.0, num_anchors=2, ...)`, keywords only,
/// each described in `GroupLoss`'s documentation; the similarity and the
/// anchors by name, with `sigma` and `seed` beside them. The trainer's TOML
/// keys are the same names. (In Rust, `GroupLossSettings::resolve` gives the
/// `GroupLossOptions` a call computes with.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "python",
    pyo3::pyclass(
        name = "GroupLossOptions",
        module = "grouploss._native",
        frozen,
        eq,
        get_all
    )
)]
pub struct GroupLossSettings {
    /// T of the prior `softmax(logits / T)`.
    pub temperature: f64,
    /// Anchors (labelled points) per class and batch.
    pub num_anchors: i64,
    /// Replicator-dynamics steps.
    pub num_iters: i64,
    /// Weight of the NLL of the refined probabilities.
    pub gtg_weight: f64,
    /// Weight of the cross-entropy of the raw logits.
    pub ce_weight: f64,
    /// `correlation`, `cosine` or `gaussian`.
    pub similarity: String,
    /// The gaussian similarity's bandwidth.
    pub sigma: f64,
    /// W's entries raised to this power (>= 1; 1 is the release's W).
    pub similarity_power: f64,
    /// W's diagonal 0 (the paper's text) instead of 1 (the release).
    pub zero_diagonal: bool,
    /// `first` or `random`.
    pub anchors: String,
    /// The random anchors' seed; None: one is given per call. Not
    /// serialised: the trainer's configuration has its own `seed`.
    #[serde(skip)]
    pub seed: Option<u64>,
    /// Refine over the classes present in the batch (the prior's columns
    /// restricted and renormalised).
    pub batch_classes_only: bool,
}

impl Default for GroupLossSettings {
    fn default() -> Self {
        let d = GroupLossOptions::DEFAULT;
        GroupLossSettings {
            temperature: d.temperature,
            num_anchors: d.num_anchors,
            num_iters: d.num_iters,
            gtg_weight: d.gtg_weight,
            ce_weight: d.ce_weight,
            similarity: d.similarity.name().to_string(),
            sigma: Similarity::DEFAULT_SIGMA,
            similarity_power: d.similarity_power,
            zero_diagonal: d.zero_diagonal,
            anchors: d.anchors.name().to_string(),
            seed: None,
            batch_classes_only: d.batch_classes_only,
        }
    }
}

impl GroupLossSettings {
    /// The options of a call, validated: random anchors seeded with `seed`
    /// if given, else with the settings' own.
    pub fn resolve(&self, seed: Option<u64>) -> Result<GroupLossOptions> {
        let random = self.anchors == AnchorMode::Random { seed: 0 }.name();
        let seed = match seed.or(self.seed) {
            Some(s) => s,
            None if random => {
                return Err(Error::invalid(
                    "seed",
                    "None",
                    "an integer with anchors=\"random\" (grouploss.functional draws one)",
                ))
            }
            None => 0,
        };
        let opts = GroupLossOptions {
            temperature: self.temperature,
            num_anchors: self.num_anchors,
            num_iters: self.num_iters,
            gtg_weight: self.gtg_weight,
            ce_weight: self.ce_weight,
            similarity: Similarity::parse(&self.similarity, self.sigma)?,
            similarity_power: self.similarity_power,
            zero_diagonal: self.zero_diagonal,
            anchors: AnchorMode::parse(&self.anchors, seed)?,
            batch_classes_only: self.batch_classes_only,
        };
        opts.validate()?;
        Ok(opts)
    }
}
