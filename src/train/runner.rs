//! A whole run: data, network, Group Loss, optimizer, evaluation on the
//! validation classes every epoch, checkpoints, the best epoch's test
//! metrics, and the naive ensemble.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::{nn, Device, Kind, Tensor};

use super::config::TrainConfig;
use super::distributed::{self as dist, Collective, SingleProcess};
use super::member::train_member;
use super::progress::Progress;
use super::run_dir::RunDir;
use super::run_input::RunInput;
use crate::data::{self, Dataset, DatasetOptions, Loader, LoaderOptions, Normalization, OnError};
use crate::data::{ReaderOptions, Split, Transform};
use crate::error::{Error, Result};
use crate::eval::{self, EvalOptions, Metric};
use crate::files::write_atomic;
use crate::model::{self, BackboneSpec, ClassifierKind, EmbeddingNet, ModelConfig};
use crate::names::device_name;
use crate::rng::derive_seed;

/// What a finished run reports (rank 0 computes it; every rank receives it).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// The devices a configuration can name: `auto`, `cpu`, `cuda`, `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeviceName {
    Auto,
    Cpu,
    Cuda(Option<usize>),
}

impl DeviceName {
    /// The name's form, whatever devices this machine has.
    pub(crate) fn parse(name: &str) -> Result<Self> {
        match name {
            "auto" => Ok(DeviceName::Auto),
            "cpu" => Ok(DeviceName::Cpu),
            "cuda" => Ok(DeviceName::Cuda(None)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|i| i.parse::<usize>().ok())
                .map(|i| DeviceName::Cuda(Some(i)))
                .ok_or_else(|| not_a_device(other)),
        }
    }
}

fn not_a_device(name: &str) -> Error {
    Error::invalid(
        "device",
        format!("{name:?}"),
        "cpu, cuda, cuda:N (an existing device) or auto",
    )
}

/// The device a configuration asks for.
pub fn device(name: &str) -> Result<Device> {
    match DeviceName::parse(name)? {
        DeviceName::Auto => Ok(Device::cuda_if_available()),
        DeviceName::Cpu => Ok(Device::Cpu),
        DeviceName::Cuda(None) if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceName::Cuda(None) => Err(Error::invalid(
            "device",
            "\"cuda\"",
            "a CUDA device (none is available)",
        )),
        DeviceName::Cuda(Some(i)) if (i as i64) < tch::Cuda::device_count() => Ok(Device::Cuda(i)),
        DeviceName::Cuda(Some(_)) => Err(not_a_device(name)),
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
    let embedder = Embedder {
        net,
        transform,
        cfg,
        device,
    };
    embedder.embed(ds, (0..ds.len()).collect())
}

/// How images become embeddings: `net` on `device`, through `transform`,
/// batches and loader threads from `cfg`.
struct Embedder<'a> {
    net: &'a EmbeddingNet,
    transform: &'a Transform,
    cfg: &'a TrainConfig,
    device: Device,
}

impl Embedder<'_> {
    /// Embeddings of the images `indices` of `ds`.
    fn embed(&self, ds: &Arc<Dataset>, indices: Vec<usize>) -> Result<(Tensor, Tensor)> {
        let cfg = self.cfg;
        let loader = Loader::new(
            Arc::clone(ds),
            self.transform.clone(),
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
            embs.push(
                self.net
                    .embed(&b.images.to_device(self.device))
                    .to_kind(Kind::Float),
            );
            labels.push(b.labels);
        }
        Ok((
            Tensor::cat(&embs, 0),
            Tensor::cat(&labels, 0).to_device(self.device),
        ))
    }

    /// Embeddings of the images `indices` of `ds`, each rank embedding its
    /// shard; the whole on rank 0, `None` on the others.
    fn embed_sharded(
        &self,
        ds: &Arc<Dataset>,
        indices: Vec<usize>,
        coll: &dyn Collective,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let n = indices.len();
        let part = dist::shard(n, coll.rank(), coll.world_size());
        let (e, l) = if part.is_empty() && n > 0 {
            // An empty shard still needs the embedding width: one image, cut.
            let (e, l) = self.embed(ds, vec![indices[0]])?;
            (e.narrow(0, 0, 0), l.narrow(0, 0, 0))
        } else {
            self.embed(ds, indices[part].to_vec())?
        };
        let e = dist::gather_rows(coll, &e, n)?;
        let l = dist::gather_rows(coll, &l, n)?;
        Ok(e.zip(l))
    }
}

/// Embeddings of an evaluation set: (gallery or all, labels, optional query
/// embeddings and labels).
pub type SetEmbeddings = (Tensor, Tensor, Option<(Tensor, Tensor)>);

pub(super) fn embed_set(
    net: &EmbeddingNet,
    set: &EvalSet,
    transform: &Transform,
    cfg: &TrainConfig,
    device: Device,
    max_images: usize,
    coll: &dyn Collective,
) -> Result<Option<SetEmbeddings>> {
    let embedder = Embedder {
        net,
        transform,
        cfg,
        device,
    };
    let all = |ds: &Arc<Dataset>| (0..ds.len()).collect::<Vec<usize>>();
    match set {
        EvalSet::All(ds) => {
            let mut idx = all(ds);
            if max_images > 0 && max_images < idx.len() {
                crate::rng::Rng::new(derive_seed(cfg.seed, &[crate::rng::stream::EVAL_SUBSET]))
                    .shuffle(&mut idx);
                idx.truncate(max_images);
                idx.sort_unstable();
            }
            let el = embedder.embed_sharded(ds, idx, coll)?;
            Ok(el.map(|(e, l)| (e, l, None)))
        }
        EvalSet::QueryGallery { query, gallery } => {
            let g = embedder.embed_sharded(gallery, all(gallery), coll)?;
            let q = embedder.embed_sharded(query, all(query), coll)?;
            Ok(g.zip(q).map(|((ge, gl), q)| (ge, gl, Some(q))))
        }
    }
}

/// Every metric ([`Metric::ALL`]) of embeddings, as a JSON map.
pub fn evaluate_embeddings(emb: &SetEmbeddings, cfg: &TrainConfig) -> Result<Map<String, Value>> {
    run_metrics(emb, cfg, Metric::ALL.to_vec())
}

/// The metrics of the per-epoch selection: Recall@K, MAP@R, R-Precision,
/// and the selection metric (NMI's k-means, which takes minutes at SOP's
/// scale on a CPU, and the open-metric-learning metrics only then).
pub(super) fn evaluate_for_selection(
    emb: &SetEmbeddings,
    cfg: &TrainConfig,
) -> Result<Map<String, Value>> {
    let mut include = vec![Metric::Recall, Metric::MapAtR, Metric::RPrecision];
    let selected = Metric::reporting(&cfg.select_metric, &cfg.eval_ks());
    if let Some(m) = selected.filter(|m| !include.contains(m)) {
        include.push(m);
    }
    run_metrics(emb, cfg, include)
}

fn run_metrics(
    emb: &SetEmbeddings,
    cfg: &TrainConfig,
    include: Vec<Metric>,
) -> Result<Map<String, Value>> {
    let (e, l, q) = emb;
    let opts = EvalOptions {
        ks: cfg.eval_ks(),
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
    // A parameter under two names (a TorchScript module's tied weights) is
    // stepped once, under its first, as `torch.optim` over
    // `model.parameters()` does.
    let mut seen = std::collections::HashSet::new();
    model_tensors(vs)
        .into_iter()
        .filter(|(_, t)| {
            t.requires_grad() && (t.numel() == 0 || seen.insert(t.data_ptr() as usize))
        })
        .map(|(name, t)| {
            let group = usize::from(!name.starts_with("backbone."));
            (name, t, group)
        })
        .collect()
}

pub(super) fn selection_key(cfg: &TrainConfig) -> &'static str {
    if cfg.select_on == "test" {
        "test"
    } else {
        "val"
    }
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

/// Builds the network the run starts from, with its pretrained weights, in
/// a store that is then dropped: a TorchScript file or weights that do not
/// load fail here (the member builds its own, seeded, network later).
fn check_network(cfg: &TrainConfig, data: &RunData, device: Device) -> Result<()> {
    let vs = nn::VarStore::new(device);
    build_network(cfg, &vs, data.channels, data.train.classes().len() as i64)?;
    load_pretrained(cfg, &vs)
}

/// Loads the configuration's pretrained backbone weights, if any, into `vs`.
pub(super) fn load_pretrained(cfg: &TrainConfig, vs: &nn::VarStore) -> Result<()> {
    if let Some(path) = &cfg.pretrained {
        let tensors = crate::model::read_safetensors(path)?;
        crate::model::load_into(vs, "backbone.", tensors, &path.display().to_string())?;
    }
    Ok(())
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
        let changed = previous.differences(cfg)?;
        if let Some((key, old, new)) = changed.first() {
            let also: String = changed[1..]
                .iter()
                .map(|(k, old, new)| format!("; also {k}: {old} there, {new} here"))
                .collect();
            return Err(Error::invalid(
                key,
                new,
                format!(
                    "{old}, the value of the run in {} (a run folder keeps its configuration: \
                     resume it with the same options, or start another folder{also})",
                    dir.root.display()
                ),
            ));
        }
    }
    dir.remove_stale_temporaries();
    write_atomic(&dir.config(), cfg.to_toml()?.as_bytes())
}

/// Writes what the network takes (`input.json`) into a new run folder; a
/// resumed run's must be what its data gives again (the training images'
/// statistics, say), or the saved model would read its input otherwise
/// than it trained.
fn record_input(cfg: &TrainConfig, data: &RunData, dir: &RunDir) -> Result<()> {
    let input = RunInput::of(data);
    match RunInput::load(dir)? {
        None => input.save(dir),
        Some(saved) if saved == input => Ok(()),
        Some(_) => Err(Error::invalid(
            "data_root",
            cfg.data_root.as_ref().map_or_else(
                || "the dataset's default place".to_string(),
                |p| p.display().to_string(),
            ),
            format!(
                "the data the run in {} started with (its input.json: channels, classes, \
                 transform and pixel statistics differ from this data's)",
                dir.root.display()
            ),
        )),
    }
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
    // The data opens, and the network builds, before the run folder is
    // claimed: a run that cannot find its data or load its backbone leaves
    // no folder whose configuration would refuse the corrected retry.
    let data = RunData::open(cfg)?;
    let claimed = if rank == 0 {
        check_network(cfg, &data, device)
            .and_then(|()| claim_run_dir(cfg, &dir))
            .and_then(|()| record_input(cfg, &data, &dir))
            .map(|()| Value::Null)
    } else {
        Ok(Value::Null)
    };
    dist::agree(coll, claimed, device)?;
    let mut progress = if rank == 0 {
        Progress::new(cfg.progress)
    } else {
        Progress::silent()
    };
    progress.line(&run_line(cfg, run_dir, device, world));
    let members = train_members(cfg, &data, &dir, device, stop, &mut progress, coll)?;
    let outcome = if rank == 0 {
        summarize(cfg, &data, &dir, members, device, world, &mut progress).map(Some)
    } else {
        // Replaced by rank 0's outcome in `agree`.
        Ok(None)
    };
    let outcome = dist::agree(coll, outcome, device)?
        .ok_or_else(|| Error::invalid("rank 0", "no outcome", "a finished run"))?;
    Ok(TrainOutcome {
        run_dir: run_dir.to_path_buf(),
        ..outcome
    })
}

/// The run's first progress line.
fn run_line(cfg: &TrainConfig, run_dir: &Path, device: Device, world: usize) -> String {
    format!(
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
    )
}

/// What the ensemble's members leave for the summary.
struct Members {
    /// Each member's test embeddings (rank 0; empty elsewhere).
    test_embeddings: Vec<SetEmbeddings>,
    /// Each member's seed, best epoch and test metrics (rank 0).
    summaries: Vec<Value>,
    /// The first member's history and best epoch: the run's.
    history: Vec<Value>,
    best_epoch: usize,
}

/// Trains the ensemble's members one after the other, each evaluated on the
/// test set at its best epoch.
fn train_members(
    cfg: &TrainConfig,
    data: &RunData,
    dir: &RunDir,
    device: Device,
    stop: &AtomicBool,
    progress: &mut Progress,
    coll: &dyn Collective,
) -> Result<Members> {
    let mut out = Members {
        test_embeddings: Vec::new(),
        summaries: Vec::new(),
        history: Vec::new(),
        best_epoch: 0,
    };
    for i in 0..cfg.ensemble {
        let mdir = dir.member(i, cfg.ensemble);
        let (_vs, net, history, best_epoch) = train_member(
            cfg,
            data,
            &mdir,
            i,
            cfg.ensemble,
            device,
            stop,
            progress,
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
            out.summaries
                .push(json!({"seed": cfg.seed + i as u64, "best_epoch": best_epoch, "test": test}));
            out.test_embeddings.push(emb);
        }
        if i == 0 {
            out.history = history;
            out.best_epoch = best_epoch;
        }
    }
    Ok(out)
}

/// The test metrics of the members' embeddings side by side (each
/// L2-normalised), when there are several.
fn ensemble_test(
    test_embeddings: &[SetEmbeddings],
    cfg: &TrainConfig,
    progress: &mut Progress,
) -> Result<Option<Map<String, Value>>> {
    if test_embeddings.len() < 2 {
        return Ok(None);
    }
    let cat = |f: &dyn Fn(&SetEmbeddings) -> Tensor| {
        Tensor::cat(
            &test_embeddings
                .iter()
                .map(|m| model::l2_normalize(&f(m)))
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
    Ok(Some(m))
}

/// Rank 0's end of a run: the ensemble's test metrics and `summary.json`.
fn summarize(
    cfg: &TrainConfig,
    data: &RunData,
    dir: &RunDir,
    members: Members,
    device: Device,
    world: usize,
    progress: &mut Progress,
) -> Result<TrainOutcome> {
    let test = members.summaries[0]["test"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let ensemble_test = ensemble_test(&members.test_embeddings, cfg, progress)?;
    let best_epoch = members.best_epoch;
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
        "members": members.summaries,
        "train_classes": data.train.classes().len(),
        "train_images": data.train.len(),
        "device": device_name(device),
        "world_size": world,
    });
    dir.write_summary(&summary)?;
    Ok(TrainOutcome {
        run_dir: dir.root.clone(),
        history: members.history,
        best_epoch,
        test,
        ensemble_test,
        summary,
    })
}
