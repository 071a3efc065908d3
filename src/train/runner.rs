//! A whole run: data, network, Group Loss, optimizer, evaluation on the
//! validation classes every epoch, checkpoints, the best epoch's test
//! metrics, and the naive ensemble.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Map, Value};
use tch::{nn, Device, Kind, Tensor};

use super::checkpoint::Checkpoint;
use super::config::TrainConfig;
use super::distributed::{self as dist, Collective, SingleProcess};
use super::objective::{forward_backward, Objective};
use super::optim::{Optimizer, OptimizerKind, Schedule};
use super::progress::{Progress, Step};
use super::replica::{average_gradients, restore_on_rank_0, share_rank_0_state};
use super::run_dir::{write_atomic, RunDir, StepLog};
use crate::data::{self, Dataset, DatasetOptions, Loader, LoaderOptions, Normalization, OnError};
use crate::data::{ReaderOptions, Split, Transform};
use crate::error::{Error, Result};
use crate::eval::{self, EvalOptions, Metric};
use crate::model::{self, BackboneSpec, ClassifierKind, EmbeddingNet, ModelConfig};
use crate::names::device_name;
use crate::rng::derive_seed;
use crate::sampler::{ClassBalancedSampler, SamplerOptions};

/// Stream id of a rank's loader seed, `derive_seed(seed, [rank, RANK_STREAM])`.
const RANK_STREAM: u64 = 0x5241_4E4B;

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    /// Per-epoch records of the first model (as in `metrics.jsonl`).
    pub history: Vec<Value>,
    /// 1-based epoch whose weights were kept.
    pub best_epoch: usize,
    /// Test metrics of the best epoch (first model).
    pub test: Map<String, Value>,
    /// Test metrics of the ensemble, with `ensemble > 1`.
    pub ensemble_test: Option<Map<String, Value>>,
    /// The whole `summary.json`.
    pub summary: Value,
}

/// The evaluation data of a split: all against all, or queries against a
/// gallery (In-Shop).
pub enum EvalSet {
    All(Arc<Dataset>),
    QueryGallery {
        query: Arc<Dataset>,
        gallery: Arc<Dataset>,
    },
}

/// The datasets of a run.
pub struct RunData {
    pub train: Arc<Dataset>,
    /// Where the best epoch is chosen (validation classes, or the test
    /// classes under the release's protocol).
    pub select: EvalSet,
    pub test: EvalSet,
    pub train_transform: Transform,
    pub eval_transform: Transform,
    pub channels: i64,
}

fn dataset_kind(name: &str) -> String {
    name.replace('-', "_")
}

fn open(cfg: &TrainConfig, split: Split) -> Result<Arc<Dataset>> {
    let options = DatasetOptions {
        split,
        val_fraction: cfg.val_fraction,
        split_seed: cfg.split_seed(),
    };
    let extra = ReaderOptions::default();
    Ok(Arc::new(data::open(
        &dataset_kind(&cfg.dataset),
        cfg.data_root.as_deref(),
        &options,
        &extra,
    )?))
}

fn eval_set(cfg: &TrainConfig, split: Split) -> Result<EvalSet> {
    if cfg.dataset == "inshop" && split == Split::Test {
        return Ok(EvalSet::QueryGallery {
            query: open(cfg, Split::Query)?,
            gallery: open(cfg, Split::Gallery)?,
        });
    }
    Ok(EvalSet::All(open(cfg, split)?))
}

/// Per-channel mean and std of pixel / 255 over up to 2000 training images.
fn grey_statistics(ds: &Dataset, channels: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = ds.len();
    let take = n.min(2000);
    let mut sum = vec![0f64; channels];
    let mut sq = vec![0f64; channels];
    let mut count = 0f64;
    for j in 0..take {
        let img = ds.load(j * n / take)?.into_channels(channels);
        for px in img.data.chunks_exact(channels) {
            for c in 0..channels {
                let v = px[c] as f64 / 255.0;
                sum[c] += v;
                sq[c] += v * v;
            }
        }
        count += (img.width * img.height) as f64;
    }
    let mean: Vec<f32> = sum.iter().map(|s| (s / count) as f32).collect();
    let std: Vec<f32> = sq
        .iter()
        .zip(&mean)
        .map(|(q, &m)| ((q / count - (m as f64).powi(2)).max(1e-12)).sqrt() as f32)
        .collect();
    Ok((mean, std))
}

impl RunData {
    /// Opens the splits of `cfg.dataset` and builds the transforms.
    pub fn open(cfg: &TrainConfig) -> Result<Self> {
        let train = open(cfg, Split::Train)?;
        if train.is_empty() {
            return Err(Error::invalid(
                "dataset",
                "an empty training split",
                "images",
            ));
        }
        let select = if cfg.select_on == "test" {
            eval_set(cfg, Split::Test)?
        } else {
            eval_set(cfg, Split::Val)?
        };
        let test = eval_set(cfg, Split::Test)?;
        let (train_transform, eval_transform, channels) = if cfg.image_size == 0 {
            let first = train.load(0)?;
            let (size, channels) = (first.width.max(first.height), first.channels);
            let norm = normalization(cfg, &train, channels)?;
            (
                Transform::pad_crop(
                    size,
                    cfg.pad_jitter as usize,
                    cfg.flip,
                    norm.clone(),
                    channels,
                )?,
                Transform::pad_crop(size, 0, false, norm, channels)?,
                channels as i64,
            )
        } else {
            let norm = normalization(cfg, &train, 3)?;
            let size = cfg.image_size as usize;
            let resize = (cfg.resize_size as usize).max(size);
            (
                Transform::random_resized_crop(
                    size,
                    (0.08, 1.0),
                    (3.0 / 4.0, 4.0 / 3.0),
                    cfg.flip,
                    norm.clone(),
                    3,
                )?,
                Transform::resize_center_crop(size, resize, norm, 3)?,
                3,
            )
        };
        Ok(RunData {
            train,
            select,
            test,
            train_transform,
            eval_transform,
            channels,
        })
    }
}

fn normalization(cfg: &TrainConfig, train: &Dataset, channels: usize) -> Result<Normalization> {
    match cfg.normalization.as_str() {
        "mean_std" => {
            let (mean, std) = grey_statistics(train, channels)?;
            Ok(Normalization::MeanStd { mean, std })
        }
        other => Normalization::parse(other),
    }
}

/// The device a configuration asks for.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(Error::invalid(
                    "device",
                    "\"cuda\"",
                    "a CUDA device (none is available)",
                ))
            }
        }
        other => match other
            .strip_prefix("cuda:")
            .and_then(|i| i.parse::<usize>().ok())
        {
            Some(i) if (i as i64) < tch::Cuda::device_count() => Ok(Device::Cuda(i)),
            _ => Err(Error::invalid(
                "device",
                format!("{other:?}"),
                "cpu, cuda, cuda:N (an existing device) or auto",
            )),
        },
    }
}

/// The network of a configuration (variables in `vs`).
pub fn build_network(
    cfg: &TrainConfig,
    vs: &nn::VarStore,
    channels: i64,
    num_classes: i64,
) -> Result<EmbeddingNet> {
    let config = ModelConfig {
        backbone: BackboneSpec::parse(&cfg.backbone)?,
        in_channels: channels,
        embedding_size: (cfg.embedding_size > 0).then_some(cfg.embedding_size),
        num_classes,
        classifier: ClassifierKind::parse(&cfg.classifier, cfg.classifier_scale)?,
        normalize_embeddings: cfg.normalize_embeddings,
        bn_momentum: cfg.bn_momentum,
    };
    EmbeddingNet::new(vs, &config)
}

/// The network ensemble member `member` starts from: torch seeded with
/// `seed + member`, then [`build_network`] (the trainer's first weights).
pub fn initial_network(
    cfg: &TrainConfig,
    vs: &nn::VarStore,
    channels: i64,
    num_classes: i64,
    member: usize,
) -> Result<EmbeddingNet> {
    tch::manual_seed((cfg.seed + member as u64) as i64);
    build_network(cfg, vs, channels, num_classes)
}

/// Embeddings of every image of `ds` (evaluation transform, no gradients),
/// on `device`, with their labels.
pub fn embed_dataset(
    net: &EmbeddingNet,
    ds: &Arc<Dataset>,
    transform: &Transform,
    cfg: &TrainConfig,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    embed_indices(net, ds, (0..ds.len()).collect(), transform, cfg, device)
}

/// Embeddings of the images `indices` of `ds`.
fn embed_indices(
    net: &EmbeddingNet,
    ds: &Arc<Dataset>,
    indices: Vec<usize>,
    transform: &Transform,
    cfg: &TrainConfig,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    let loader = Loader::new(
        Arc::clone(ds),
        transform.clone(),
        LoaderOptions {
            num_threads: cfg.num_workers.max(1),
            prefetch: cfg.prefetch.max(cfg.num_workers.max(1)),
            seed: cfg.seed,
            on_error: OnError::Raise,
        },
    )?;
    let batches: Vec<Vec<usize>> = indices
        .chunks(cfg.eval_batch_size)
        .map(|c| c.to_vec())
        .collect();
    let mut embs = Vec::with_capacity(batches.len());
    let mut labels = Vec::with_capacity(batches.len());
    for b in loader.epoch(batches, 0)? {
        let b = b?;
        embs.push(net.embed(&b.images.to_device(device)).to_kind(Kind::Float));
        labels.push(b.labels);
    }
    Ok((
        Tensor::cat(&embs, 0),
        Tensor::cat(&labels, 0).to_device(device),
    ))
}

/// Embeddings of an evaluation set: (gallery or all, labels, optional query
/// embeddings and labels).
pub type SetEmbeddings = (Tensor, Tensor, Option<(Tensor, Tensor)>);

/// Embeddings of the images `indices` of `ds`, each rank embedding its
/// shard; the whole on rank 0, `None` on the others.
#[allow(clippy::too_many_arguments)]
fn embed_sharded(
    net: &EmbeddingNet,
    ds: &Arc<Dataset>,
    indices: Vec<usize>,
    transform: &Transform,
    cfg: &TrainConfig,
    device: Device,
    coll: &dyn Collective,
) -> Result<Option<(Tensor, Tensor)>> {
    let n = indices.len();
    let part = dist::shard(n, coll.rank(), coll.world_size());
    let (e, l) = if part.is_empty() && n > 0 {
        // An empty shard still needs the embedding width: one image, cut.
        let (e, l) = embed_indices(net, ds, vec![indices[0]], transform, cfg, device)?;
        (e.narrow(0, 0, 0), l.narrow(0, 0, 0))
    } else {
        embed_indices(net, ds, indices[part].to_vec(), transform, cfg, device)?
    };
    let e = dist::gather_rows(coll, &e, n)?;
    let l = dist::gather_rows(coll, &l, n)?;
    Ok(e.zip(l))
}

fn embed_set(
    net: &EmbeddingNet,
    set: &EvalSet,
    transform: &Transform,
    cfg: &TrainConfig,
    device: Device,
    max_images: usize,
    coll: &dyn Collective,
) -> Result<Option<SetEmbeddings>> {
    let all = |ds: &Arc<Dataset>| (0..ds.len()).collect::<Vec<usize>>();
    match set {
        EvalSet::All(ds) => {
            let mut idx = all(ds);
            if max_images > 0 && max_images < idx.len() {
                crate::rng::Rng::new(derive_seed(cfg.seed, &[11])).shuffle(&mut idx);
                idx.truncate(max_images);
                idx.sort_unstable();
            }
            let el = embed_sharded(net, ds, idx, transform, cfg, device, coll)?;
            Ok(el.map(|(e, l)| (e, l, None)))
        }
        EvalSet::QueryGallery { query, gallery } => {
            let g = embed_sharded(net, gallery, all(gallery), transform, cfg, device, coll)?;
            let q = embed_sharded(net, query, all(query), transform, cfg, device, coll)?;
            Ok(g.zip(q).map(|((ge, gl), q)| (ge, gl, Some(q))))
        }
    }
}

/// Recall@K, MAP@R, R-Precision and NMI of embeddings, as a JSON map.
pub fn evaluate_embeddings(emb: &SetEmbeddings, cfg: &TrainConfig) -> Result<Map<String, Value>> {
    evaluate_with(emb, cfg, Metric::ALL.to_vec())
}

/// The metrics of the per-epoch selection: NMI's k-means is left out (it
/// takes minutes at SOP's scale on a CPU) unless it is the selection metric.
fn evaluate_for_selection(emb: &SetEmbeddings, cfg: &TrainConfig) -> Result<Map<String, Value>> {
    let mut include = vec![Metric::Recall, Metric::MapAtR, Metric::RPrecision];
    if cfg.select_metric == "nmi" {
        include.push(Metric::Nmi);
    }
    evaluate_with(emb, cfg, include)
}

fn evaluate_with(
    emb: &SetEmbeddings,
    cfg: &TrainConfig,
    include: Vec<Metric>,
) -> Result<Map<String, Value>> {
    let (e, l, q) = emb;
    let opts = EvalOptions {
        ks: cfg.recall_ks.iter().map(|&k| k as i64).collect(),
        include,
        normalize: true,
        batch_size: None,
        seed: cfg.seed,
        ..Default::default()
    };
    let query = q.as_ref().map(|(a, b)| (a, b));
    let m = eval::evaluate(e, l, query, &opts)?;
    let mut out = Map::new();
    for (k, v) in m.to_pairs() {
        out.insert(k, json!(v));
    }
    out.insert("left_out".into(), json!(m.left_out));
    Ok(out)
}

pub(super) fn model_tensors(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Copies checkpointed variables into `vs` (every variable must be there).
pub fn load_model(vs: &nn::VarStore, tensors: &[(String, Tensor)], source: &Path) -> Result<()> {
    let mut vars = vs.variables();
    let mut found = 0;
    tch::no_grad(|| -> Result<()> {
        for (name, t) in tensors {
            if let Some(v) = vars.get_mut(name) {
                if v.size() != t.size() {
                    return Err(Error::format(
                        source,
                        None,
                        format!(
                            "{name} has shape {:?}, the network {:?}",
                            t.size(),
                            v.size()
                        ),
                    ));
                }
                v.copy_(&t.to_device(v.device()).to_kind(v.kind()));
                found += 1;
            }
        }
        Ok(())
    })?;
    if found != vars.len() {
        return Err(Error::format(
            source,
            None,
            format!("holds {found} of the network's {} variables", vars.len()),
        ));
    }
    Ok(())
}

/// The variables of `vs` in learning-rate groups: backbone (0) and head (1).
pub(super) fn parameter_groups(vs: &nn::VarStore) -> Vec<(String, Tensor, usize)> {
    model_tensors(vs)
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(name, t)| {
            let group = usize::from(!name.starts_with("backbone."));
            (name, t, group)
        })
        .collect()
}

fn selection_key(cfg: &TrainConfig) -> &'static str {
    if cfg.select_on == "test" {
        "test"
    } else {
        "val"
    }
}

/// Trains one model (ensemble member `member`) in `dir`, resuming from its
/// `last` checkpoint if there is one. Returns the network with its best
/// weights and the history (on rank 0; empty on the other ranks, which
/// write nothing).
#[allow(clippy::too_many_arguments)]
fn train_member(
    cfg: &TrainConfig,
    data: &RunData,
    dir: &RunDir,
    member: usize,
    members: usize,
    device: Device,
    stop: &AtomicBool,
    progress: &mut Progress,
    coll: &dyn Collective,
) -> Result<(nn::VarStore, EmbeddingNet, Vec<Value>, usize)> {
    let (rank, world) = (coll.rank(), coll.world_size());
    let seed = cfg.seed + member as u64;
    let num_classes = data.train.classes().len() as i64;
    let mut vs = nn::VarStore::new(device);
    let net = initial_network(cfg, &vs, data.channels, num_classes, member)?;
    let groups = parameter_groups(&vs);
    let trainable: Vec<Tensor> = groups.iter().map(|(_, t, _)| t.shallow_clone()).collect();
    let mut opt = Optimizer::new(
        OptimizerKind::parse(&cfg.optimizer)?,
        groups,
        vec![cfg.backbone_lr(), cfg.lr],
        cfg.weight_decay,
        cfg.momentum,
    );
    let schedule = Schedule {
        kind: cfg.schedule.clone(),
        epochs: cfg.epochs,
        decay_epochs: cfg.lr_decay_epochs.clone(),
        decay: cfg.lr_decay,
        warmup_epochs: cfg.warmup_epochs,
    };

    // Rank 0 alone reads files; the others receive what it read, so the run
    // folder (and pretrained weights) need not be visible to other nodes.
    let restored = if rank == 0 {
        restore_on_rank_0(cfg, dir, &vs, &mut opt, world)
    } else {
        Ok(Value::Null)
    };
    let restored = dist::agree(coll, restored, device)?;
    share_rank_0_state(coll, &vs, &mut opt, &restored, device)?;
    let st = &restored["state"];
    let start_epoch = st["epoch"].as_u64().unwrap_or(0) as usize;
    let start_step = st["step"].as_u64().unwrap_or(0) as usize;
    let mut history: Vec<Value> = st["history"].as_array().cloned().unwrap_or_default();
    let mut best: Option<(usize, f64)> =
        match (st["best_epoch"].as_u64(), st["best_value"].as_f64()) {
            (Some(e), Some(v)) => Some((e as usize, v)),
            _ => None,
        };
    if rank == 0 && !st.is_null() {
        dir.write_metrics(&history)?;
    }

    let mut sampler = ClassBalancedSampler::new(
        data.train.labels(),
        cfg.classes_per_batch,
        cfg.samples_per_class,
        SamplerOptions {
            seed,
            num_replicas: world,
            rank,
        },
    )?;
    let loader = Loader::new(
        Arc::clone(&data.train),
        data.train_transform.clone(),
        LoaderOptions {
            num_threads: cfg.num_workers.max(1),
            prefetch: cfg.prefetch.max(cfg.num_workers.max(1)),
            // Ranks draw their own augmentations; one process keeps `seed`.
            seed: if world > 1 {
                derive_seed(seed, &[rank as u64, RANK_STREAM])
            } else {
                seed
            },
            on_error: OnError::parse(&cfg.on_error)?,
        },
    )?;
    let label = if members > 1 {
        format!("[model {}/{members}] ", member + 1)
    } else {
        String::new()
    };
    let autocast = cfg.bf16 && device.is_cuda();
    // Variables outside the optimizer: BatchNorm's running statistics.
    let buffers: Vec<Tensor> = model_tensors(&vs)
        .into_iter()
        .filter(|(_, t)| !t.requires_grad())
        .map(|(_, t)| t)
        .collect();
    let save_last = |vs: &nn::VarStore,
                     opt: &Optimizer,
                     epoch: usize,
                     step: usize,
                     history: &[Value],
                     best: Option<(usize, f64)>|
     -> Result<()> {
        if rank != 0 {
            return Ok(());
        }
        Checkpoint {
            model: model_tensors(vs),
            optimizer: opt.state_tensors(),
            state: json!({
                "epoch": epoch,
                "step": step,
                "optimizer_steps": opt.steps(),
                "history": history,
                "best_epoch": best.map(|b| b.0),
                "best_value": best.map(|b| b.1),
                "seed": seed,
                "member": member,
                "world_size": world,
            }),
        }
        .save(&dir.last())
    };
    let mut step_log = (rank == 0)
        .then(|| StepLog::open(dir.steps(), start_epoch, start_step))
        .transpose()?;

    for epoch in start_epoch..cfg.epochs {
        sampler.set_epoch(epoch as u64);
        let mut plan = sampler.batches();
        if cfg.max_steps_per_epoch > 0 {
            plan.truncate(cfg.max_steps_per_epoch);
        }
        let steps = plan.len();
        let first = if epoch == start_epoch {
            start_step.min(steps)
        } else {
            0
        };
        let reloaded = if first == 0 && schedule.reloads_best_at(epoch) {
            reload_best(coll, &vs, dir, best, device)?
        } else {
            None
        };
        if let Some(e) = reloaded {
            progress.line(&format!(
                "{label}epoch {}: reloaded the weights of epoch {e} (the best so far), lr {}",
                epoch + 1,
                cfg.lr * schedule.factor(epoch, 0.0)
            ));
        }
        let mut objective = Objective::of(cfg, epoch)?;
        let started = Instant::now();
        let (mut loss_sum, mut nll_sum, mut ce_sum, mut seen, mut done) =
            (0.0, 0.0, 0.0, 0usize, 0usize);
        let batches = plan[first..].to_vec();
        for (j, batch) in loader.epoch_from(batches, epoch as u64, first)?.enumerate() {
            let step = first + j;
            let batch = batch?;
            let frac = step as f64 / steps.max(1) as f64;
            opt.set_lr_factor(schedule.factor(epoch, frac));
            objective.at(cfg, epoch as f64 + frac);
            let step_seed = if world > 1 {
                derive_seed(seed, &[epoch as u64, step as u64, 1, rank as u64])
            } else {
                derive_seed(seed, &[epoch as u64, step as u64, 1])
            };
            tch::manual_seed(step_seed as i64 & i64::MAX);
            let images = batch.images.to_device(device);
            let labels = batch.labels.to_device(device);
            opt.zero_grad();
            let out = forward_backward(&net, &images, &labels, &objective, autocast)?;
            let mut control = vec![
                f64::from(u8::from(stop.load(Ordering::SeqCst))),
                f64::try_from(&out.loss)?,
                out.nll.as_ref().map_or(Ok(0.0), f64::try_from)?,
                out.ce.as_ref().map_or(Ok(0.0), f64::try_from)?,
            ];
            if world > 1 {
                // One call averages the gradients, agrees on stopping (a
                // signal reaches the ranks at different steps) and averages
                // the loss terms for the log.
                let t = Tensor::from_slice(&control).to_device(device);
                average_gradients(coll, &trainable, &t)?;
                control = Vec::<f64>::try_from(&t.to_device(Device::Cpu))?;
            }
            let loss_value = control[1];
            if !loss_value.is_finite() {
                return Err(Error::invalid(
                    "loss",
                    format!("{loss_value} at epoch {}, step {step}", epoch + 1),
                    "a finite loss (lower lr or temperature?)",
                ));
            }
            opt.step();
            if let Some(log) = &mut step_log {
                log.write(epoch + 1, step + 1, loss_value, opt.lrs())?;
            }
            // Stops after the step: its forward pass already moved the
            // BatchNorm statistics, so a resumed run must not redo it.
            if control[0] > 0.0 {
                flush(&mut step_log)?;
                save_last(&vs, &opt, epoch, step + 1, &history, best)?;
                return Err(Error::Interrupted);
            }
            loss_sum += loss_value;
            nll_sum += control[2];
            ce_sum += control[3];
            seen += batch.indices.len() * world;
            done += 1;
            let elapsed = started.elapsed().as_secs_f64();
            progress.step(&Step {
                label: &label,
                epoch: epoch + 1,
                epochs: cfg.epochs,
                step: step + 1,
                steps,
                loss: loss_sum / done as f64,
                images_per_s: seen as f64 / elapsed.max(1e-9),
                elapsed_epoch: elapsed,
            });
        }
        for s in loader.take_skipped() {
            progress.line(&format!(
                "skipped {}: {}",
                data.train.describe(s.index),
                s.message
            ));
        }
        let train_time = started.elapsed().as_secs_f64();
        flush(&mut step_log)?;
        if dist::any(coll, stop.load(Ordering::SeqCst), device)? {
            save_last(&vs, &opt, epoch, steps, &history, best)?;
            return Err(Error::Interrupted);
        }
        // Ranks evaluate (and rank 0 saves) the same network: rank 0's
        // running statistics, which a resumed run restores as well.
        dist::broadcast_bucketed(coll, &buffers)?;
        let Some(embeddings) = embed_set(
            &net,
            &data.select,
            &data.eval_transform,
            cfg,
            device,
            cfg.select_max_images,
            coll,
        )?
        else {
            continue;
        };
        let metrics = evaluate_for_selection(&embeddings, cfg)?;
        let value = metrics
            .get(&cfg.select_metric)
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN);
        let done_f = done.max(1) as f64;
        let mut record = json!({
            "epoch": epoch + 1,
            "train_loss": loss_sum / done_f,
            "train_nll": nll_sum / done_f,
            "train_ce": ce_sum / done_f,
            "images_per_s": seen as f64 / train_time.max(1e-9),
            "lr": opt.lrs()[1],
            "gtg_weight": objective.gtg_weight(),
            "backbone_lr": opt.lrs()[0],
            "reloaded_best_epoch": reloaded,
            "time_s": started.elapsed().as_secs_f64(),
        });
        record[selection_key(cfg)] = Value::Object(metrics);
        history.push(record);
        let improved = best.is_none_or(|(_, b)| value > b || b.is_nan());
        if improved {
            best = Some((epoch + 1, value));
            Checkpoint {
                model: model_tensors(&vs),
                optimizer: Vec::new(),
                state: json!({"epoch": epoch + 1, "value": value, "metric": cfg.select_metric}),
            }
            .save(&dir.best())?;
        }
        save_last(&vs, &opt, epoch + 1, 0, &history, best)?;
        dir.write_metrics(&history)?;
        progress.line(&format!(
            "{label}epoch {}/{}: loss {:.4}, {:.0} img/s, {} {} {:.4}{}",
            epoch + 1,
            cfg.epochs,
            loss_sum / done_f,
            seen as f64 / train_time.max(1e-9),
            selection_key(cfg),
            cfg.select_metric,
            value,
            if improved { " (best)" } else { "" }
        ));
    }

    // Rank 0 kept the best epoch; every rank continues with its weights.
    let best_epoch = reload_best(coll, &vs, dir, best, device)?
        .ok_or_else(|| Error::invalid("epochs", 0, "at least one trained epoch"))?;
    vs.freeze();
    Ok((vs, net, history, best_epoch))
}

/// Rank 0 loads the best checkpoint so far (`best`: its epoch and value on
/// rank 0) and every rank takes its weights and BatchNorm statistics.
/// Returns the epoch loaded, or None when there is no best epoch yet.
fn reload_best(
    coll: &dyn Collective,
    vs: &nn::VarStore,
    dir: &RunDir,
    best: Option<(usize, f64)>,
    device: Device,
) -> Result<Option<usize>> {
    let loaded = match best {
        Some((e, _)) if coll.rank() == 0 => Checkpoint::load(&dir.best())
            .and_then(|ck| load_model(vs, &ck.model, &dir.best()))
            .map(|()| json!(e)),
        _ => Ok(Value::Null),
    };
    let Some(epoch) = dist::agree(coll, loaded, device)?.as_u64() else {
        return Ok(None);
    };
    let vars: Vec<Tensor> = model_tensors(vs).into_iter().map(|(_, t)| t).collect();
    dist::broadcast_bucketed(coll, &vars)?;
    Ok(Some(epoch as usize))
}

/// Writes the step log's buffer (rank 0 keeps one).
fn flush(log: &mut Option<StepLog>) -> Result<()> {
    log.as_mut().map_or(Ok(()), StepLog::flush)
}

fn round_map(m: &Map<String, Value>) -> String {
    m.iter()
        .filter(|(k, _)| *k != "left_out")
        .map(|(k, v)| format!("{k} {:.4}", v.as_f64().unwrap_or(f64::NAN)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The default run folder of a configuration.
pub fn default_run_dir(cfg: &TrainConfig) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (d, s) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970 (Howard Hinnant's algorithm).
    let z = d as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    PathBuf::from("runs").join(format!(
        "{}-{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        cfg.preset,
        s / 3600,
        (s / 60) % 60,
        s % 60
    ))
}

/// Runs `cfg` to the end in `run_dir` (a new folder, or the folder of an
/// interrupted run with the same configuration: it resumes). `stop` is
/// polled every step: when set, `last` is saved and `Error::Interrupted`
/// returned.
pub fn train(cfg: &TrainConfig, run_dir: &Path, stop: &AtomicBool) -> Result<TrainOutcome> {
    cfg.validate()?;
    train_on(cfg, run_dir, stop, device(&cfg.device)?, &SingleProcess)
}

/// Refuses a run folder that holds another configuration, then writes
/// `config.toml`.
fn claim_run_dir(cfg: &TrainConfig, dir: &RunDir) -> Result<()> {
    if dir.config().exists() {
        let existing =
            std::fs::read_to_string(dir.config()).map_err(|e| Error::io(dir.config(), e))?;
        let previous = TrainConfig::resolve(
            None,
            Some((&existing, &dir.config().display().to_string())),
            Default::default(),
        )?;
        if previous.fingerprint() != cfg.fingerprint() {
            return Err(Error::invalid(
                "out_dir",
                format!(
                    "{} holds a run with another configuration",
                    dir.root.display()
                ),
                "an empty folder, or --resume with that run",
            ));
        }
    }
    dir.remove_stale_temporaries();
    write_atomic(&dir.config(), cfg.to_toml()?.as_bytes())
}

/// [`train`] as rank `coll.rank()` of `coll.world_size()` data-parallel
/// processes, on `device`: every rank trains on its own P x K batches of the
/// epoch, gradients are averaged across ranks every step, evaluation sets
/// are embedded in shards and gathered on rank 0, which alone evaluates and
/// writes the run folder. Every rank returns rank 0's outcome. A resumed
/// run needs the world size it was interrupted with.
pub fn train_on(
    cfg: &TrainConfig,
    run_dir: &Path,
    stop: &AtomicBool,
    device: Device,
    coll: &dyn Collective,
) -> Result<TrainOutcome> {
    cfg.validate()?;
    let (rank, world) = (coll.rank(), coll.world_size());
    let dir = RunDir::new(run_dir);
    let claimed = if rank == 0 {
        claim_run_dir(cfg, &dir).map(|()| Value::Null)
    } else {
        Ok(Value::Null)
    };
    dist::agree(coll, claimed, device)?;
    let mut progress = if rank == 0 {
        Progress::new(cfg.progress)
    } else {
        Progress::silent()
    };
    progress.line(&format!(
        "run {} on {}{}: {} ({}), {} epoch{}",
        run_dir.display(),
        device_name(device),
        if world > 1 {
            format!(" x {world} processes")
        } else {
            String::new()
        },
        cfg.dataset,
        cfg.backbone,
        cfg.epochs,
        if cfg.epochs == 1 { "" } else { "s" }
    ));
    let data = RunData::open(cfg)?;
    let mut test_embeddings = Vec::new();
    let mut first_history = Vec::new();
    let mut first_best = 0;
    let mut member_summaries = Vec::new();
    for i in 0..cfg.ensemble {
        let mdir = dir.member(i, cfg.ensemble);
        let (_vs, net, history, best_epoch) = train_member(
            cfg,
            &data,
            &mdir,
            i,
            cfg.ensemble,
            device,
            stop,
            &mut progress,
            coll,
        )?;
        let test_emb = embed_set(&net, &data.test, &data.eval_transform, cfg, device, 0, coll)?;
        if let Some(emb) = test_emb {
            let test = evaluate_embeddings(&emb, cfg)?;
            progress.line(&format!(
                "model {}: test (best epoch {best_epoch}): {}",
                i + 1,
                round_map(&test)
            ));
            member_summaries
                .push(json!({"seed": cfg.seed + i as u64, "best_epoch": best_epoch, "test": test}));
            test_embeddings.push(emb);
        }
        if i == 0 {
            first_history = history;
            first_best = best_epoch;
        }
    }
    let outcome = if rank == 0 {
        summarize(
            cfg,
            &data,
            &dir,
            &test_embeddings,
            member_summaries,
            first_history,
            first_best,
            device,
            world,
            &mut progress,
        )
    } else {
        Ok(Value::Null)
    };
    let o = dist::agree(coll, outcome, device)?;
    Ok(TrainOutcome {
        run_dir: run_dir.to_path_buf(),
        history: o["history"].as_array().cloned().unwrap_or_default(),
        best_epoch: o["best_epoch"].as_u64().unwrap_or(0) as usize,
        test: o["test"].as_object().cloned().unwrap_or_default(),
        ensemble_test: o["ensemble_test"].as_object().cloned(),
        summary: o["summary"].clone(),
    })
}

/// Rank 0's end of a run: the ensemble's test metrics and `summary.json`.
/// Returns the outcome as JSON (history, best_epoch, test, ensemble_test,
/// summary).
#[allow(clippy::too_many_arguments)]
fn summarize(
    cfg: &TrainConfig,
    data: &RunData,
    dir: &RunDir,
    test_embeddings: &[SetEmbeddings],
    member_summaries: Vec<Value>,
    history: Vec<Value>,
    best_epoch: usize,
    device: Device,
    world: usize,
    progress: &mut Progress,
) -> Result<Value> {
    let test = member_summaries[0]["test"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let ensemble_test = if test_embeddings.len() > 1 {
        let norm = |t: &Tensor| model::l2_normalize(t);
        let cat = |f: &dyn Fn(&SetEmbeddings) -> Tensor| {
            Tensor::cat(
                &test_embeddings
                    .iter()
                    .map(|m| norm(&f(m)))
                    .collect::<Vec<_>>(),
                1,
            )
        };
        let first = &test_embeddings[0];
        let gallery = cat(&|e| e.0.shallow_clone());
        let labels = first.1.shallow_clone();
        let query = first.2.as_ref().map(|(_, ql)| {
            let q = cat(&|e| {
                e.2.as_ref()
                    .map_or_else(|| e.0.shallow_clone(), |q| q.0.shallow_clone())
            });
            (q, ql.shallow_clone())
        });
        let m = evaluate_embeddings(&(gallery, labels, query), cfg)?;
        progress.line(&format!(
            "ensemble of {}: test: {}",
            test_embeddings.len(),
            round_map(&m)
        ));
        Some(m)
    } else {
        None
    };
    let selected_on = if cfg.select_on == "test" {
        "test (the release's protocol: the best epoch was picked on the test classes)"
    } else {
        "val (classes held out of the training classes)"
    };
    let summary = json!({
        "best_epoch": best_epoch,
        "selected_on": selected_on,
        "select_metric": cfg.select_metric,
        "test": test,
        "ensemble_test": ensemble_test,
        "members": member_summaries,
        "train_classes": data.train.classes().len(),
        "train_images": data.train.len(),
        "device": device_name(device),
        "world_size": world,
    });
    dir.write_summary(&summary)?;
    Ok(json!({
        "history": history,
        "best_epoch": best_epoch,
        "test": test,
        "ensemble_test": ensemble_test,
        "summary": summary,
    }))
}
