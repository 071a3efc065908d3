//! A trained model loaded back from its run folder: embeds images or
//! dataset splits with the run's evaluation transform, and evaluates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};
use tch::{nn, Device, Kind, Tensor};

use super::checkpoint::Checkpoint;
use super::config::TrainConfig;
use super::run_dir::RunDir;
use super::run_input::RunInput;
use super::runner::{
    build_network, device, embed_dataset, evaluate_embeddings, load_model, RunData,
};
use crate::data::{
    self, Dataset, DatasetOptions, Geometry, Image, ReaderOptions, Split, Transform, Workspace,
};
use crate::error::{Error, Result};
use crate::model::EmbeddingNet;
use crate::names::dtype_name;
use crate::rng::Rng;

/// What a run's network reads: images of `channels` x `size` x `size`
/// after the evaluation geometry, each channel mapped from 8-bit values as
/// `(v[source_channels[c]] / scale - mean[c]) / std[c]` in float32.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InputSpec {
    pub channels: usize,
    pub size: usize,
    /// `"pad_crop"` (small images pass through at `size`) or
    /// `"resize_center_crop"` (short side resized to `resize`, then the
    /// central `size` x `size`).
    pub geometry: &'static str,
    pub resize: Option<usize>,
    pub scale: f32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub source_channels: Vec<usize>,
}

/// A network with the weights of a run's checkpoint.
pub struct RunModel {
    pub config: TrainConfig,
    pub run_dir: PathBuf,
    pub device: Device,
    net: EmbeddingNet,
    vs: nn::VarStore,
    eval_transform: Transform,
}

impl RunModel {
    /// Loads `run_dir`'s `checkpoint` (`best` or `last`) on `device_name`
    /// (`auto` by default). A run on a TorchScript backbone (a program,
    /// which runs as it loads) is refused unless `trust_torchscript`.
    pub fn open(
        run_dir: &Path,
        checkpoint: &str,
        device_name: &str,
        trust_torchscript: bool,
    ) -> Result<Self> {
        crate::error::one_of("checkpoint", checkpoint, &["best", "last"])?;
        let dir = RunDir::new(run_dir);
        let text = std::fs::read_to_string(dir.config()).map_err(|e| {
            let e = if e.kind() == std::io::ErrorKind::NotFound {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "no such file: {} is not a run folder (`grouploss train` writes one)",
                        run_dir.display()
                    ),
                )
            } else {
                e
            };
            Error::io(dir.config(), e)
        })?;
        let config = TrainConfig::from_toml(&text, &dir.config().display().to_string())?;
        if !trust_torchscript && config.backbone.starts_with("torchscript:") {
            return Err(Error::invalid(
                "trust_torchscript",
                "False",
                format!(
                    "True to load the run in {}, whose backbone ({}) is a TorchScript program \
                     that runs as it loads (--trust-torchscript on the command line)",
                    run_dir.display(),
                    config.backbone
                ),
            ));
        }
        let member = dir.member(0, config.ensemble);
        let path = if checkpoint == "best" {
            member.best()
        } else {
            member.last()
        };
        // The weights only: either checkpoint's state is checked when a run
        // resumes or reloads it.
        let ck = Checkpoint::<serde::de::IgnoredAny>::load(&path)?;
        let device = device(device_name)?;
        // The run's input as it saved it; a run from before `input.json`
        // gets it from its dataset.
        let input = match RunInput::load(&dir)? {
            Some(input) => input,
            None => RunInput::of(&RunData::open(&config)?),
        };
        classes_match(&input, &ck.model, &path)?;
        let vs = nn::VarStore::new(device);
        let net = build_network(&config, &vs, input.channels, input.classes)?;
        load_model(&vs, &ck.model, &path)?;
        Ok(RunModel {
            config,
            run_dir: run_dir.to_path_buf(),
            device,
            net,
            vs,
            eval_transform: input.eval_transform()?,
        })
    }

    /// Embeddings of a batch: float images are taken as already transformed
    /// (N x C x H x W); uint8 images (N x C x H x W, 0-255) go through the
    /// run's evaluation transform first.
    pub fn embed(&self, images: &Tensor) -> Result<Tensor> {
        if images.dim() != 4 {
            return Err(Error::invalid(
                "images",
                format!("shape {:?}", images.size()),
                "a 4-D tensor (N x C x H x W)",
            ));
        }
        let x = if images.kind() == Kind::Uint8 {
            self.transform_u8(images)?
        } else if images.is_floating_point() {
            let s = self.eval_transform.size() as i64;
            let (h, w) = (images.size()[2], images.size()[3]);
            if (h, w) != (s, s) {
                // A network that pools adaptively would embed them all the
                // same, as it never saw them.
                return Err(Error::invalid(
                    "images",
                    format!("{h} x {w} float images"),
                    format!(
                        "{s} x {s}, the run's input size (float images are taken as \
                         transformed; uint8 images of any size are transformed to it)"
                    ),
                ));
            }
            images.to_kind(Kind::Float)
        } else {
            // Other integers would pass 0-255 values as if transformed.
            return Err(Error::invalid(
                "images",
                dtype_name(images.kind()),
                "uint8 images (0-255, transformed as the run's evaluation) or floating \
                 images already transformed",
            ));
        };
        Ok(self.net.embed(&x.to_device(self.device)))
    }

    /// The network's variables (parameters and BatchNorm statistics) as
    /// CPU copies, keyed as the checkpoint's model: `backbone.*`, `embed.*`,
    /// `classifier.*`.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<_> = tch::no_grad(|| {
            self.vs
                .variables()
                .into_iter()
                .map(|(k, t)| (k, t.detach().to_device(Device::Cpu).copy()))
                .collect()
        });
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// What the network reads (the evaluation transform's output).
    pub fn input_spec(&self) -> InputSpec {
        let t = &self.eval_transform;
        let a = t.affine();
        let (geometry, resize) = match t.geometry() {
            Geometry::ResizeCenterCrop { resize } => ("resize_center_crop", Some(*resize)),
            _ => ("pad_crop", None),
        };
        InputSpec {
            channels: t.channels(),
            size: t.size(),
            geometry,
            resize,
            scale: a.scale,
            mean: a.mean.clone(),
            std: a.std.clone(),
            source_channels: a.source.clone(),
        }
    }

    /// Classifier logits of embeddings (N x embedding size), e.g. to see the
    /// Group Loss prior of a batch. The classifier covers the run's training
    /// classes, in the order of its training split's labels.
    pub fn logits(&self, embeddings: &Tensor) -> Result<Tensor> {
        let d = self.net.embedding_size();
        let size = embeddings.size();
        if size.len() != 2 || size[1] != d {
            return Err(Error::invalid(
                "embeddings",
                format!("shape {size:?}"),
                format!("a 2-D tensor (N x {d})"),
            ));
        }
        if !embeddings.is_floating_point() {
            return Err(Error::invalid(
                "embeddings",
                dtype_name(embeddings.kind()),
                "a floating tensor",
            ));
        }
        let x = embeddings.to_device(self.device).to_kind(Kind::Float);
        Ok(tch::no_grad(|| self.net.head.logits(&x)))
    }

    fn transform_u8(&self, images: &Tensor) -> Result<Tensor> {
        let s = images.size();
        let (n, c, h, w) = (s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize);
        if c != 1 && c != 3 {
            return Err(Error::invalid(
                "images",
                format!("{c} channels"),
                "1 or 3 channels",
            ));
        }
        let hwc = images
            .to_device(Device::Cpu)
            .permute([0, 2, 3, 1])
            .contiguous();
        let bytes = Vec::<u8>::try_from(hwc.flatten(0, -1))?;
        let per = self.eval_transform.output_len();
        let mut out = vec![0f32; n * per];
        let mut ws = Workspace::new();
        let mut rng = Rng::new(0);
        for i in 0..n {
            let img = Image::new(w, h, c, bytes[i * h * w * c..(i + 1) * h * w * c].to_vec());
            self.eval_transform
                .apply(&img, &mut rng, &mut out[i * per..(i + 1) * per], &mut ws)
                .map_err(|e| {
                    Error::invalid("images", format!("image {i}: {e}"), "a valid image")
                })?;
        }
        let [oc, oh, ow] = self.eval_transform.output_shape();
        Ok(Tensor::from_slice(&out).reshape([n as i64, oc as i64, oh as i64, ow as i64]))
    }

    /// Opens `split` of the run's dataset (or `root`'s).
    pub fn dataset(&self, split: &str, root: Option<&Path>) -> Result<Arc<Dataset>> {
        let options = DatasetOptions {
            split: Split::parse(split)?,
            val_fraction: self.config.val_fraction,
            split_seed: self.config.split_seed(),
        };
        let root = root.or(self.config.data_root.as_deref());
        let kind = self.config.dataset.replace('-', "_");
        Ok(Arc::new(data::open(
            &kind,
            root,
            &options,
            &ReaderOptions::default(),
        )?))
    }

    /// Embeddings and labels of a dataset.
    pub fn embed_dataset(&self, ds: &Arc<Dataset>) -> Result<(Tensor, Tensor)> {
        embed_dataset(
            &self.net,
            ds,
            &self.eval_transform,
            &self.config,
            self.device,
        )
    }

    /// The metrics of `split` (`test` evaluates In-Shop's queries against
    /// its gallery).
    pub fn evaluate(&self, split: &str) -> Result<Map<String, Value>> {
        if self.config.dataset == "inshop" && split == "test" {
            let (ge, gl) = self.embed_dataset(&self.dataset("gallery", None)?)?;
            let (qe, ql) = self.embed_dataset(&self.dataset("query", None)?)?;
            return evaluate_embeddings(&(ge, gl, Some((qe, ql))), &self.config);
        }
        let (e, l) = self.embed_dataset(&self.dataset(split, None)?)?;
        evaluate_embeddings(&(e, l, None), &self.config)
    }
}

/// The classes `input.json` names are the checkpoint's classifier's rows,
/// checked before a network of that many outputs is built (an edited
/// figure would otherwise allocate a classifier of any size first).
fn classes_match(input: &RunInput, model: &[(String, Tensor)], path: &Path) -> Result<()> {
    let rows = model
        .iter()
        .find(|(name, _)| name == "classifier.weight")
        .map(|(_, w)| w.size()[0]);
    match rows {
        Some(rows) if rows != input.classes => Err(Error::format(
            path,
            None,
            format!(
                "classifier.weight has {rows} rows, the run's input.json {} classes",
                input.classes
            ),
        )),
        _ => Ok(()),
    }
}
