//! The configuration of a training run: one vocabulary for the CLI
//! (`--data-root`), TOML files (`data_root`) and Python keywords
//! (`data_root`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{at_least, at_most, non_negative, one_of, positive, Error, Result};
use crate::eval::Metric;
use crate::loss::{GroupLossOptions, GroupLossSettings};

/// The widest embedding a run may have.
pub const MAX_EMBEDDING_SIZE: i64 = 1 << 16;

/// The losses the trainer runs (`loss`).
pub const LOSSES: [&str; 3] = ["group", "softmax", "triplet"];

/// The learning-rate schedules (`schedule`).
pub const SCHEDULES: [&str; 4] = ["step", "multistep", "cosine", "constant"];

/// The trainer's own options of the Group Loss (its schedule and the size
/// of its group).
const GROUP_TRAINER_OPTIONS: [&str; 5] = [
    "gtg_warmup_epochs",
    "gtg_ramp_epochs",
    "gather_ranks",
    "memory_size",
    "memory_warmup_steps",
];

/// A new value of `key` of the same kind as the preset's `old` (an integer
/// for an integer, a number for a number, ...), as an error naming the key
/// rather than serde's message about Rust types.
fn check_same_kind(key: &str, old: &toml::Value, new: &toml::Value) -> Result<()> {
    use toml::Value::{Array, Boolean, Float, Integer, String};
    let expected = match (old, new) {
        (Integer(_), Integer(_))
        | (Float(_), Float(_) | Integer(_))
        | (Boolean(_), Boolean(_))
        | (String(_), String(_))
        | (Array(_), Array(_)) => return Ok(()),
        (Integer(_), _) => "an integer",
        (Float(_), _) => "a number",
        (Boolean(_), _) => "true or false",
        (String(_), _) => "a string",
        (Array(_), _) => "a list",
        _ => return Ok(()),
    };
    Err(Error::invalid(key, new, expected))
}

/// The counts whose least value is above 0 (`recall_ks`: each of its
/// values): `validate` checks them, and a negative one, refused when the
/// configuration is read, is told the same bound.
const LEAST_COUNTS: [(&str, usize); 6] = [
    ("epochs", 1),
    ("classes_per_batch", 2),
    ("samples_per_class", 1),
    ("ensemble", 1),
    ("eval_batch_size", 1),
    ("recall_ks", 1),
];

/// The least value of the count `key` (0 for those not in [`LEAST_COUNTS`]).
fn least_count(key: &str) -> usize {
    LEAST_COUNTS
        .iter()
        .find(|(k, _)| *k == key)
        .map_or(0, |&(_, least)| least)
}

/// A configuration that does not deserialise, as an error naming the
/// option where serde names one (`... in `epochs``): what it saw, and what
/// the option takes in the configuration's words (an integer >= 0, a
/// number, ...) rather than Rust's types; otherwise serde's message, naming
/// `source`.
fn field_error(e: &toml::de::Error, source: &str) -> Error {
    let message = e.to_string();
    let key = message
        .split("\nin `")
        .nth(1)
        .and_then(|r| r.split('`').next());
    let first = message.lines().next().unwrap_or("");
    let parts = first
        .strip_prefix("invalid type: ")
        .or_else(|| first.strip_prefix("invalid value: "))
        .and_then(|r| r.split_once(", expected "));
    let (Some(key), Some((seen, expected))) = (key, parts) else {
        return Error::format(source, None, message);
    };
    // `integer `-1``, `floating point `1.5``, `string "x"`: the value alone.
    let seen = seen
        .rsplit_once(' ')
        .map_or(seen, |(_, v)| v)
        .trim_matches('`');
    let expected = match expected {
        "usize" | "u64" | "u32" | "u16" | "u8" => format!("an integer >= {}", least_count(key)),
        "i64" | "i32" => "an integer".into(),
        "f64" | "f32" => "a number".into(),
        "a boolean" => "true or false".into(),
        "path string" => "a path (a string)".into(),
        other => other.into(),
    };
    Error::invalid(key, seen, expected)
}

/// The losses that read `option`.
fn losses_reading(option: &str) -> &'static [&'static str] {
    // `seed` is the run's (the anchors' seed derives from it).
    let loss_option = GroupLossOptions::NAMES.contains(&option) && option != "seed";
    if loss_option || GROUP_TRAINER_OPTIONS.contains(&option) {
        &["group"]
    } else if option == "triplet_margin" {
        &["triplet"]
    } else if option == "classifier" || option == "classifier_scale" {
        &["group", "softmax"]
    } else {
        &LOSSES
    }
}

// `OPTION_DOCS`: each option's description, the doc comment of its field
// here or in `GroupLossSettings`, extracted by `build.rs` (for `--help`).
include!(concat!(env!("OUT_DIR"), "/option_docs.rs"));

/// For each loss of [`LOSSES`], the options that it reads and some other
/// loss does not (its own options: the Group Loss's, the classifier's,
/// `triplet_margin`), sorted by name.
pub fn loss_options() -> Result<Vec<(&'static str, Vec<String>)>> {
    let mut keys: Vec<String> = TrainConfig::default().table()?.keys().cloned().collect();
    keys.sort();
    Ok(LOSSES
        .iter()
        .map(|&loss| {
            let own = keys.iter().filter(|k| {
                let readers = losses_reading(k);
                readers.len() < LOSSES.len() && readers.contains(&loss)
            });
            (loss, own.cloned().collect())
        })
        .collect())
}

/// The names of every option (those unset by default included).
fn known_keys() -> Vec<String> {
    match serde_json::to_value(TrainConfig::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => unreachable!("a configuration serialises as an object"),
    }
}

/// Every option of a run. `Default` is the `fashion-mnist` preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
// Unknown keys are refused by `merge_table` (serde's deny_unknown_fields
// does not work with the flattened loss options).
#[serde(default)]
pub struct TrainConfig {
    /// The preset this configuration started from (informational).
    pub preset: String,
    /// Dataset: fashion-mnist, glyphs, cub200, cars196, sop, inshop,
    /// image-folder, csv.
    pub dataset: String,
    /// Where the dataset's files are; empty: the dataset's default place.
    pub data_root: Option<PathBuf>,
    /// The run folder; empty: `runs/<preset>-<date>-<time>`.
    pub out_dir: Option<PathBuf>,
    /// Passes over the training classes' images.
    pub epochs: usize,
    /// Caps the steps of an epoch (0: no cap); for smoke tests.
    pub max_steps_per_epoch: usize,
    /// Seed of everything drawn: initialisation, batches, augmentation,
    /// anchors (a run is reproduced by its configuration).
    pub seed: u64,
    /// Seed of the validation classes carved out of the training classes;
    /// unset: `seed`. Fixing it keeps the same validation classes across
    /// runs with other seeds (hyperparameter searches).
    pub split_seed: Option<u64>,
    /// `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when present).
    pub device: String,
    /// bfloat16 autocast of the network on CUDA, as
    /// `torch.autocast("cuda", dtype=torch.bfloat16)` (ignored on the CPU).
    pub bf16: bool,

    // Network.
    /// convnet, resnet18, resnet50, bn_inception or torchscript:PATH.
    pub backbone: String,
    /// Backbone weights: a `.safetensors` state dict (torchvision names).
    pub pretrained: Option<PathBuf>,
    /// Embedding width; 0: the backbone's feature width (the release).
    pub embedding_size: i64,
    /// `linear` (the release) or `cosine`.
    pub classifier: String,
    /// Scale of the cosine classifier's logits.
    pub classifier_scale: f64,
    /// L2-normalise embeddings before the loss.
    pub normalize_embeddings: bool,
    /// BatchNorm momentum of every backbone's BatchNorm layers, PyTorch
    /// convention (the weight of the new batch statistic; PyTorch: 0.1).
    pub bn_momentum: f64,

    // Batches.
    /// P: distinct classes per batch.
    pub classes_per_batch: usize,
    /// K: samples per class in a batch.
    pub samples_per_class: usize,

    // Loss.
    /// What the network learns from: `group` (the Group Loss, its options
    /// below), `softmax` (cross-entropy of the classifier alone; with
    /// `classifier = "cosine"`, normalised softmax) or `triplet` (a margin
    /// loss over batch-hard triplets, pytorch-metric-learning's
    /// `TripletMarginLoss` with `BatchHardMiner`).
    pub loss: String,
    /// The triplet loss's margin between the hardest positive's and the
    /// hardest negative's distance (L2 of normalised embeddings).
    pub triplet_margin: f64,
    /// The Group Loss's options (see `GroupLoss`), under their own names
    /// (`temperature`, `num_anchors`, ...; the anchors' seed derives from
    /// `seed`).
    #[serde(flatten)]
    pub group_loss: GroupLossSettings,
    /// Epochs of CE only before the Group Loss term is switched on (the
    /// release starts from a CE-finetuned network instead).
    pub gtg_warmup_epochs: usize,
    /// After the warm-up, `gtg_weight` grows linearly from 0 over this many
    /// epochs (fractions allowed; 0: switched on at once).
    pub gtg_ramp_epochs: f64,
    /// In a data-parallel run, refine over the global batch: every rank's
    /// embeddings, logits and labels are gathered, the loss is that of the
    /// `world_size x P x K` samples, and each rank's gradients reach its
    /// own samples (scaled so that the averaged gradient is the global
    /// loss's). Does nothing in a single process.
    pub gather_ranks: bool,
    /// Samples of earlier steps (embeddings, detached, and labels) that
    /// join each group as labelled points: anchors that are not scored and
    /// receive no gradient (`GroupLoss(memory_size=...)`). 0: none. The
    /// memory is in the `last` checkpoint. With several processes it needs
    /// `gather_ranks` (one memory of global batches, the same on every rank).
    pub memory_size: usize,
    /// Optimizer steps before the memory joins the groups (it fills
    /// meanwhile).
    pub memory_warmup_steps: usize,

    // Optimisation.
    /// adam, adamw, radam (the release) or sgd.
    pub optimizer: String,
    /// Learning rate of the head (embedding layer and classifier).
    pub lr: f64,
    /// Learning rate of the backbone; 0: `lr`.
    pub backbone_lr: f64,
    /// Weight decay of every trainable tensor (biases and BatchNorm's too,
    /// as `torch.optim` over `model.parameters()`): added to the gradient
    /// by adam and sgd, decoupled in adamw and radam.
    pub weight_decay: f64,
    /// SGD's momentum (dampening 0, no Nesterov), as `torch.optim.SGD`.
    pub momentum: f64,
    /// `step` (the release's: at each of `lr_decay_epochs`, the weights of
    /// the best epoch so far are reloaded and the learning rate set to
    /// `lr * lr_decay`, the optimizer's state kept), `multistep` (PyTorch's
    /// `MultiStepLR`: multiplied by `lr_decay` at each, cumulatively),
    /// `cosine` or `constant`.
    pub schedule: String,
    /// Epochs (1-based) at whose start `step` or `multistep` acts:
    /// PyTorch's `MultiStepLR(milestones=[30])`, stepped once an epoch, is
    /// `[31]` here. `cosine` is `CosineAnnealingLR` stepped every optimizer
    /// step over the whole run.
    pub lr_decay_epochs: Vec<usize>,
    /// The factor of `step` and `multistep`.
    pub lr_decay: f64,
    /// Linear warm-up of the learning rate over this many epochs.
    pub warmup_epochs: f64,

    // Data pipeline.
    /// Side of the training crop and evaluation centre crop (0: the
    /// image's own size, for 28-32 px datasets).
    pub image_size: i64,
    /// Short side before the evaluation centre crop.
    pub resize_size: i64,
    /// `imagenet`, `caffe_bgr` or `none` (x / 255), or `mean_std` with the
    /// dataset's grey statistics.
    pub normalization: String,
    /// Pixels of random translation for small grey images.
    pub pad_jitter: i64,
    /// Horizontal flips in training.
    pub flip: bool,
    /// Threads decoding and augmenting images (0 counts as 1).
    pub num_workers: usize,
    /// Batches the loader prepares ahead of the training step (at least
    /// `num_workers`).
    pub prefetch: usize,
    /// A missing or corrupt image: `raise` an error naming the file, or
    /// `skip` it (reported once, replaced by another image of its class).
    pub on_error: String,
    /// Fraction of the training classes held out for model selection.
    pub val_fraction: f64,

    // Evaluation.
    /// `val` (honest) or `test` (the release's protocol).
    pub select_on: String,
    /// Metric that picks the best epoch: any key the evaluation reports
    /// (`map@r`, `recall@1`, `precision@4`, `map@4`, `r_precision`, `nmi`).
    pub select_metric: String,
    /// Recall@K values to report.
    pub recall_ks: Vec<usize>,
    /// Images a forward pass embeds at evaluation.
    pub eval_batch_size: usize,
    /// Evaluate the selection split (every epoch) on at most this many
    /// images, a seeded random subset (0: all). The final test evaluation
    /// always uses every image.
    pub select_max_images: usize,
    /// Train this many models with seeds seed, seed+1, ... and evaluate
    /// their concatenated embeddings too (the paper's naive ensemble).
    pub ensemble: usize,

    /// Progress on stderr: a bar on a terminal, else (a file, a pipe) a
    /// line at most every 30 s within an epoch; false: one line per epoch.
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        super::presets::preset("fashion-mnist").expect("the default preset exists")
    }
}

impl TrainConfig {
    /// A complete configuration written as TOML (a run's `config.toml`),
    /// `source` naming it in errors.
    pub fn from_toml(text: &str, source: &str) -> Result<Self> {
        TrainConfig::resolve(None, Some((text, source)), Default::default())
    }

    /// The configuration of a run: the preset (`preset`, else the config
    /// file's `preset` key, else `fashion-mnist`), then the config file's
    /// keys, then `overrides` (CLI options or Python keywords).
    pub fn resolve(
        preset: Option<&str>,
        file: Option<(&str, &str)>,
        overrides: toml::Table,
    ) -> Result<Self> {
        let file_table: toml::Table = match file {
            Some((text, source)) => text
                .parse()
                .map_err(|e: toml::de::Error| Error::format(source, None, e.to_string()))?,
            None => toml::Table::new(),
        };
        let name = match (preset, file_table.get("preset"), overrides.get("preset")) {
            (Some(p), _, _) => p.to_string(),
            (None, _, Some(toml::Value::String(p))) => p.clone(),
            (None, Some(toml::Value::String(p)), _) => p.clone(),
            (None, Some(other), _) => {
                return Err(Error::invalid(
                    "preset",
                    other.to_string(),
                    "a preset name (a string)",
                ))
            }
            _ => "fashion-mnist".to_string(),
        };
        let base = super::presets::preset(&name)?;
        let source = file.map_or("config", |f| f.1);
        let given: Vec<String> = file_table.keys().chain(overrides.keys()).cloned().collect();
        let merged = base
            .merge_table(file_table, source)?
            .merge_table(overrides, "options")?;
        merged.check_loss_reads(&base, &given)?;
        Ok(merged)
    }

    /// Refuses an option set (in `given`) to a value other than the
    /// preset's when the run's loss does not read it (`temperature` with
    /// `loss = "triplet"`, ...): a setting that would silently do nothing.
    pub fn check_loss_reads(&self, preset: &TrainConfig, given: &[String]) -> Result<()> {
        let (ours, theirs) = (self.table()?, preset.table()?);
        for key in given {
            let readers = losses_reading(key);
            if readers.contains(&self.loss.as_str()) || ours.get(key) == theirs.get(key) {
                continue;
            }
            let shown = |t: &toml::Table| t.get(key).map_or("?".into(), |v| v.to_string());
            let readers: Vec<String> = readers.iter().map(|l| format!("{l:?}")).collect();
            return Err(Error::invalid(
                key.clone(),
                format!("{} with loss = {:?}", shown(&ours), self.loss),
                format!(
                    "the preset's {} (only loss = {} reads it)",
                    shown(&theirs),
                    readers.join(" or ")
                ),
            ));
        }
        Ok(())
    }

    fn table(&self) -> Result<toml::Table> {
        toml::Table::try_from(self)
            .map_err(|e| Error::invalid("config", e.to_string(), "a serialisable configuration"))
    }

    /// Parses a TOML document: a full or partial configuration whose keys
    /// override `self`.
    pub fn merge_toml(&self, text: &str, source: &str) -> Result<Self> {
        let overrides: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| Error::format(source, None, e.to_string()))?;
        self.merge_table(overrides, source)
    }

    /// Overrides keys of `self` with those of `table`; an unknown key is an
    /// error naming it.
    pub fn merge_table(&self, table: toml::Table, source: &str) -> Result<Self> {
        let mut base = self.table()?;
        let known = known_keys();
        for (k, v) in table {
            if k == "preset" {
                continue;
            }
            if !known.contains(&k) {
                let message = format!("unknown field `{k}`, expected one of {known:?}");
                return Err(Error::format(source, None, message));
            }
            if let Some(old) = base.get(&k) {
                check_same_kind(&k, old, &v)?;
            }
            base.insert(k, v);
        }
        let merged: TrainConfig = toml::Value::Table(base)
            .try_into()
            .map_err(|e: toml::de::Error| field_error(&e, source))?;
        merged.validate()?;
        Ok(merged)
    }

    /// The configuration as TOML (what `config.toml` of a run holds).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::invalid("config", e.to_string(), "serialisable"))
    }

    /// The Group Loss's options of this configuration by name (`seed`
    /// unset: the trainer derives one per epoch from the run's).
    pub fn group_loss_settings(&self) -> GroupLossSettings {
        self.group_loss.clone()
    }

    /// The Group Loss's options of this configuration, validated: the
    /// weights before any warm-up, random anchors seeded with `seed`.
    pub fn group_loss_options(&self) -> Result<GroupLossOptions> {
        self.group_loss_settings().resolve(Some(self.seed))
    }

    /// Checks every value, naming the option at fault.
    pub fn validate(&self) -> Result<()> {
        self.validate_numbers()?;
        self.validate_names()?;
        self.validate_combinations()?;
        crate::model::BackboneSpec::parse(&self.backbone)?;
        Ok(())
    }

    /// Each number in its range (the loss's options included).
    fn validate_numbers(&self) -> Result<()> {
        for (key, value) in [
            ("epochs", self.epochs),
            ("classes_per_batch", self.classes_per_batch),
            ("samples_per_class", self.samples_per_class),
            ("ensemble", self.ensemble),
            ("eval_batch_size", self.eval_batch_size),
        ] {
            at_least(key, value, least_count(key))?;
        }
        self.group_loss_options()?;
        positive("lr", self.lr)?;
        non_negative("backbone_lr", self.backbone_lr)?;
        non_negative("weight_decay", self.weight_decay)?;
        non_negative("momentum", self.momentum)?;
        if !(0.0..=1.0).contains(&self.bn_momentum) {
            return Err(Error::invalid(
                "bn_momentum",
                self.bn_momentum,
                "a number in [0, 1] (the weight of a batch's statistics)",
            ));
        }
        non_negative("warmup_epochs", self.warmup_epochs)?;
        non_negative("gtg_ramp_epochs", self.gtg_ramp_epochs)?;
        positive("lr_decay", self.lr_decay)?;
        positive("classifier_scale", self.classifier_scale)?;
        crate::data::dataset::check_val_fraction(self.val_fraction)?;
        at_least("embedding_size", self.embedding_size, 0)?;
        at_most("embedding_size", self.embedding_size, MAX_EMBEDDING_SIZE)?;
        let least_k = least_count("recall_ks");
        if self.recall_ks.is_empty() || self.recall_ks.iter().any(|&k| k < least_k) {
            return Err(Error::invalid(
                "recall_ks",
                format!("{:?}", self.recall_ks),
                format!("a non-empty list of integers >= {least_k}"),
            ));
        }
        let side = crate::data::transform::MAX_SIDE as i64;
        for (arg, value) in [
            ("image_size", self.image_size),
            ("resize_size", self.resize_size),
            ("pad_jitter", self.pad_jitter),
        ] {
            at_least(arg, value, 0)?;
            at_most(arg, value, side)?;
        }
        non_negative("triplet_margin", self.triplet_margin)
    }

    /// Each named choice among its names.
    fn validate_names(&self) -> Result<()> {
        let kinds = crate::data::readers::KINDS;
        if !kinds.contains(&self.dataset.replace('-', "_").as_str()) {
            let names: Vec<String> = kinds.iter().map(|k| k.replace('_', "-")).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            return Err(crate::error::not_one_of("dataset", &self.dataset, &names));
        }
        super::optim::OptimizerKind::parse(&self.optimizer)?;
        one_of("schedule", &self.schedule, &SCHEDULES)?;
        one_of("loss", &self.loss, &LOSSES)?;
        one_of("select_on", &self.select_on, &["val", "test"])?;
        crate::data::loader::OnError::parse(&self.on_error)?;
        super::runner::DeviceName::parse(&self.device)?;
        crate::model::ClassifierKind::parse(&self.classifier, self.classifier_scale)?;
        one_of(
            "normalization",
            &self.normalization,
            &["imagenet", "caffe_bgr", "none", "mean_std"],
        )?;
        if Metric::reporting(&self.select_metric, &self.eval_ks()).is_none() {
            return Err(Error::invalid(
                "select_metric",
                format!("{:?}", self.select_metric),
                "a metric the evaluation reports: recall@K, precision@K or map@K with K in \
                 recall_ks, map@r, r_precision or nmi",
            ));
        }
        Ok(())
    }

    /// Options that exclude each other.
    fn validate_combinations(&self) -> Result<()> {
        let no_ce = self.group_loss.ce_weight == 0.0;
        if self.gtg_warmup_epochs > 0 && no_ce {
            return Err(Error::invalid(
                "gtg_warmup_epochs",
                self.gtg_warmup_epochs,
                "0 when ce_weight = 0 (the warm-up trains with CE alone)",
            ));
        }
        if self.gtg_ramp_epochs > 0.0 && no_ce {
            return Err(Error::invalid(
                "gtg_ramp_epochs",
                self.gtg_ramp_epochs,
                "0 when ce_weight = 0 (the ramp starts from CE alone)",
            ));
        }
        if self.select_on == "val" && self.val_fraction == 0.0 {
            return Err(Error::invalid(
                "val_fraction",
                0.0,
                "a fraction > 0 when select_on = \"val\" (or select_on = \"test\")",
            ));
        }
        Ok(())
    }

    /// The options that shape the results, without those that only change
    /// how the run is carried out (progress display, loader threads, run
    /// folder) or where its data is (`data_root`: a resumed run checks its
    /// data against `input.json` instead): two runs with equal fingerprints
    /// on the same data compute the same thing.
    pub fn fingerprint(&self) -> TrainConfig {
        TrainConfig {
            progress: true,
            num_workers: 0,
            prefetch: 0,
            out_dir: None,
            data_root: None,
            ..self.clone()
        }
    }

    /// The options whose values differ between `self` and `other`, among
    /// those of the [`fingerprint`](Self::fingerprint), sorted by name:
    /// `(name, self's value, other's value)`, the values as TOML shows them.
    pub fn differences(&self, other: &TrainConfig) -> Result<Vec<(String, String, String)>> {
        let (a, b) = (self.fingerprint().table()?, other.fingerprint().table()?);
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        let shown =
            |v: Option<&toml::Value>| v.map_or_else(|| "unset".to_string(), |v| v.to_string());
        Ok(keys
            .into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| (k.clone(), shown(a.get(k)), shown(b.get(k))))
            .collect())
    }

    /// The cut-offs K of the evaluation's Recall@K, Precision@K and mAP@K.
    pub fn eval_ks(&self) -> Vec<i64> {
        self.recall_ks.iter().map(|&k| k as i64).collect()
    }

    /// The seed of the validation carve.
    pub fn split_seed(&self) -> u64 {
        self.split_seed.unwrap_or(self.seed)
    }

    /// The weight of the Group Loss term at `progress` epochs into the run
    /// (epoch index plus the fraction of it done): 0 during the CE warm-up,
    /// then a linear ramp to `gtg_weight` over `gtg_ramp_epochs`.
    pub fn gtg_weight_at(&self, progress: f64) -> f64 {
        let t = progress - self.gtg_warmup_epochs as f64;
        if t < 0.0 {
            0.0
        } else if self.gtg_ramp_epochs > 0.0 {
            self.group_loss.gtg_weight * (t / self.gtg_ramp_epochs).min(1.0)
        } else {
            self.group_loss.gtg_weight
        }
    }

    /// The learning rate of the backbone.
    pub fn backbone_lr(&self) -> f64 {
        if self.backbone_lr > 0.0 {
            self.backbone_lr
        } else {
            self.lr
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every option a configuration writes has a description, and every
    /// description is of an option (`--help` shows them).
    #[test]
    fn every_option_has_its_description() {
        let toml: toml::Table = toml::from_str(&TrainConfig::default().to_toml().unwrap()).unwrap();
        let described: std::collections::BTreeSet<&str> =
            OPTION_DOCS.iter().map(|(k, _)| *k).collect();
        for key in toml.keys() {
            assert!(
                described.contains(key.as_str()),
                "{key} has no doc comment entry"
            );
        }
        for (key, doc) in OPTION_DOCS {
            assert!(
                toml.contains_key(*key) || OPTIONAL.contains(key),
                "{key} is no option"
            );
            assert!(doc.len() > 10, "{key}: no description ({doc:?})");
        }
    }

    /// Options unset by default, which TOML leaves out.
    const OPTIONAL: [&str; 4] = ["data_root", "out_dir", "split_seed", "pretrained"];

    use super::*;

    #[test]
    fn each_loss_owns_the_options_only_it_reads() {
        let all: std::collections::HashMap<_, _> = loss_options().unwrap().into_iter().collect();
        assert_eq!(all["triplet"], ["triplet_margin"]);
        assert_eq!(all["softmax"], ["classifier", "classifier_scale"]);
        let group = &all["group"];
        // The loss's options but the run's `seed`, its trainer options, the classifier.
        let mut want: Vec<&str> = GroupLossOptions::NAMES.to_vec();
        want.retain(|&o| o != "seed");
        want.extend(GROUP_TRAINER_OPTIONS);
        want.extend(["classifier", "classifier_scale"]);
        want.sort();
        assert_eq!(group, &want);
    }

    fn glyphs() -> TrainConfig {
        super::super::presets::preset("glyphs").unwrap()
    }

    #[test]
    fn gtg_weight_warmup_then_ramp() {
        let mut cfg = TrainConfig {
            gtg_warmup_epochs: 1,
            gtg_ramp_epochs: 2.0,
            ..glyphs()
        };
        cfg.group_loss.gtg_weight = 2.0;
        let got: Vec<f64> = [0.0, 0.5, 0.999, 1.0, 1.5, 2.0, 2.5, 3.0, 7.0]
            .iter()
            .map(|&t| cfg.gtg_weight_at(t))
            .collect();
        let expected = [0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0];
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-12, "{got:?}");
        }
        let mut plain = glyphs();
        plain.group_loss.gtg_weight = 0.7;
        assert_eq!(plain.gtg_weight_at(0.0), 0.7);
        let warm = TrainConfig {
            gtg_warmup_epochs: 2,
            ..glyphs()
        };
        assert_eq!(
            (warm.gtg_weight_at(1.9), warm.gtg_weight_at(2.0)),
            (0.0, 1.0)
        );
    }

    #[test]
    fn split_seed_defaults_to_the_run_seed() {
        let cfg = TrainConfig {
            seed: 5,
            ..glyphs()
        };
        assert_eq!(cfg.split_seed(), 5);
        let fixed = cfg.merge_toml("split_seed = 0\n", "x").unwrap();
        assert_eq!((fixed.split_seed(), fixed.seed), (0, 5));
        let round = TrainConfig::from_toml(&fixed.to_toml().unwrap(), "x").unwrap();
        assert_eq!(round.split_seed, Some(0));
    }

    fn with(pairs: &[(&str, toml::Value)]) -> toml::Table {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    /// Any key the evaluation reports selects, at a K of `recall_ks`; the
    /// evaluation's own names decide (a new metric needs no change here).
    #[test]
    fn the_selection_metric_is_any_key_the_evaluation_reports() {
        let select = |key: &str| {
            TrainConfig::resolve(Some("glyphs"), None, with(&[("select_metric", key.into())]))
        };
        for key in [
            "map@r",
            "r_precision",
            "nmi",
            "recall@2",
            "precision@1",
            "map@8",
        ] {
            assert_eq!(select(key).unwrap().select_metric, key);
        }
        for key in ["recall@3", "map@0", "precision", "accuracy"] {
            let e = select(key).unwrap_err();
            let want = "select_metric: expected a metric the evaluation reports: ";
            assert!(e.to_string().starts_with(want), "{key}: {e}");
        }
    }

    /// Values of the wrong kind, negative for an unsigned option or out of
    /// range, are errors naming the option (not serde's message about Rust
    /// types).
    #[test]
    fn wrong_kinds_and_negative_counts_are_named() {
        let cases = [
            (
                "epochs",
                toml::Value::Integer(-1),
                "epochs: expected an integer >= 1, got -1",
            ),
            (
                "seed",
                toml::Value::Integer(-2),
                "seed: expected an integer >= 0, got -2",
            ),
            (
                "classes_per_batch",
                toml::Value::Integer(-3),
                "classes_per_batch: expected an integer >= 2, got -3",
            ),
            (
                "classes_per_batch",
                toml::Value::Integer(1),
                "classes_per_batch: expected an integer >= 2, got 1",
            ),
            (
                "recall_ks",
                toml::Value::Array(vec![toml::Value::Integer(-1)]),
                "recall_ks: expected an integer >= 1, got -1",
            ),
            (
                "recall_ks",
                toml::Value::Array(vec![toml::Value::Integer(0)]),
                "recall_ks: expected a non-empty list of integers >= 1, got [0]",
            ),
            (
                "epochs",
                toml::Value::Float(1.5),
                "epochs: expected an integer, got 1.5",
            ),
            ("lr", "x".into(), "lr: expected a number, got \"x\""),
            (
                "device",
                "cuda:x".into(),
                "device: expected cpu, cuda, cuda:N (an existing device) or auto, got \"cuda:x\"",
            ),
            (
                "bf16",
                toml::Value::Integer(1),
                "bf16: expected true or false, got 1",
            ),
            (
                "split_seed",
                toml::Value::Float(1.5),
                "split_seed: expected an integer >= 0, got 1.5",
            ),
            (
                "split_seed",
                toml::Value::Integer(-4),
                "split_seed: expected an integer >= 0, got -4",
            ),
            (
                "out_dir",
                toml::Value::Integer(3),
                "out_dir: expected a path (a string), got 3",
            ),
            (
                "momentum",
                toml::Value::Float(-0.5),
                "momentum: expected a finite number >= 0, got -0.5",
            ),
            (
                "bn_momentum",
                toml::Value::Float(2.0),
                "bn_momentum: expected a number in [0, 1] (the weight of a batch's statistics), got 2",
            ),
            (
                "dataset",
                "fashion".into(),
                "dataset: expected one of \"fashion-mnist\", \"glyphs\", \"cub200\", \"cars196\", \
                 \"sop\", \"inshop\", \"image-folder\", \"csv\", got \"fashion\"",
            ),
        ];
        for (key, value, want) in cases {
            let e = TrainConfig::resolve(Some("glyphs"), None, with(&[(key, value)])).unwrap_err();
            assert_eq!(e.to_string(), want);
        }
        let lr = TrainConfig::resolve(None, None, with(&[("lr", toml::Value::Integer(1))]));
        assert_eq!(lr.unwrap().lr, 1.0);
    }

    #[test]
    fn options_the_loss_does_not_read_are_refused() {
        let triplet = ("loss", toml::Value::from("triplet"));
        let e = TrainConfig::resolve(
            Some("glyphs"),
            None,
            with(&[triplet.clone(), ("temperature", 5.0.into())]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "temperature: expected the preset's 10.0 (only loss = \"group\" reads it), \
             got 5.0 with loss = \"triplet\""
        );
        let e = TrainConfig::resolve(
            Some("glyphs"),
            Some(("triplet_margin = 0.3\n", "run.toml")),
            with(&[("loss", "softmax".into())]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("triplet_margin: expected the preset's 0.1"),
            "{e}"
        );
        // A triplet run's saved configuration (every key given, the Group
        // Loss's at the preset's values) reads back.
        let cfg = TrainConfig::resolve(Some("glyphs"), None, with(&[triplet])).unwrap();
        let round = TrainConfig::from_toml(&cfg.to_toml().unwrap(), "config.toml").unwrap();
        assert_eq!(round, cfg);
        let e = TrainConfig::resolve(None, None, with(&[("loss", "arcface".into())]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("loss: expected one of \"group\", \"softmax\""),
            "{e}"
        );
        let e = TrainConfig::resolve(None, None, with(&[("schedule", "exp".into())]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"multistep\""), "{e}");
    }

    #[test]
    fn new_options_are_checked() {
        let base = glyphs();
        let e = base
            .merge_toml("similarity_power = 0.5\n", "x")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("similarity_power: expected a finite number >= 1"),
            "{e}"
        );
        let e = base
            .merge_toml("gtg_ramp_epochs = -1.0\n", "x")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("gtg_ramp_epochs: expected"), "{e}");
        let e = base
            .merge_toml("gtg_ramp_epochs = 1.0\nce_weight = 0.0\n", "x")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("gtg_ramp_epochs: expected 0 when ce_weight = 0"),
            "{e}"
        );
    }
}
