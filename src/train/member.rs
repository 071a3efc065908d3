//! One model's training (an ensemble member), in named phases: set-up and
//! resume ([`Member::set_up`]), one epoch of steps ([`Member::train_epoch`]),
//! evaluation and selection ([`Member::select`]), and saving
//! ([`Member::save_last`], the `best` checkpoint in `select`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use tch::{nn, Device, Tensor};

use super::checkpoint::Checkpoint;
use super::config::TrainConfig;
use super::distributed::{self as dist, Collective};
use super::memory::Memory;
use super::objective::{forward_backward, GroupScope, Objective};
use super::optim::{Optimizer, OptimizerKind, Schedule};
use super::progress::{Progress, Step};
use super::replica::{average_gradients, restore};
use super::run_dir::{RunDir, StepLog};
use super::runner::{
    embed_set, evaluate_for_selection, initial_network, load_model, model_tensors,
    parameter_groups, selection_key, RunData,
};
use super::state::{BestState, EpochSoFar, TrainerState};
use crate::data::{Batch, Loader, LoaderOptions, OnError};
use crate::error::{Error, Result};
use crate::model::EmbeddingNet;
use crate::rng::{derive_seed, stream};
use crate::sampler::{ClassBalancedSampler, SamplerOptions};

/// What a member's training holds between its phases.
struct Member<'a> {
    cfg: &'a TrainConfig,
    data: &'a RunData,
    dir: &'a RunDir,
    coll: &'a dyn Collective,
    device: Device,
    /// Prefix of the progress lines (`[model 2/3] ` in an ensemble).
    label: String,
    seed: u64,
    member: usize,
    vs: nn::VarStore,
    net: EmbeddingNet,
    opt: Optimizer,
    schedule: Schedule,
    /// The optimizer's parameters, whose gradients the ranks average.
    trainable: Vec<Tensor>,
    /// Variables outside the optimizer: BatchNorm's running statistics.
    buffers: Vec<Tensor>,
    sampler: ClassBalancedSampler,
    loader: Loader,
    history: Vec<Value>,
    /// The best epoch so far (1-based) and its selection value.
    best: Option<(usize, f64)>,
    /// `steps.tsv` (rank 0 only).
    step_log: Option<StepLog>,
    /// The Group Loss's memory of earlier batches (`memory_size`).
    memory: Option<Memory>,
}

/// Where a member starts: the epoch (0-based), the steps of it done and
/// what they added up.
struct Start {
    epoch: usize,
    step: usize,
    so_far: EpochSoFar,
}

/// An epoch's running totals: what a checkpoint saves of them (carried on
/// by a resumed epoch) and the epoch's number of steps.
struct EpochTotals {
    sums: EpochSoFar,
    /// The epoch's steps (all of them, done before this call or in it).
    steps: usize,
}

impl EpochTotals {
    /// A step done: its control values (stop flag, loss, NLL, CE) and the
    /// images it saw, all ranks together.
    fn add(&mut self, control: &[f64], images: usize) {
        self.sums.loss += control[1];
        self.sums.nll += control[2];
        self.sums.ce += control[3];
        self.sums.images += images;
        self.sums.steps += 1;
    }

    fn mean(&self, sum: f64) -> f64 {
        sum / self.sums.steps.max(1) as f64
    }

    fn images_per_s(&self) -> f64 {
        self.sums.images as f64 / self.sums.train_s.max(1e-9)
    }
}

/// Trains one model (ensemble member `member`) in `dir`, resuming from its
/// `last` checkpoint if there is one. Returns the network with its best
/// weights, the history (on rank 0; empty on the other ranks, which write
/// nothing) and the best epoch.
#[allow(clippy::too_many_arguments)]
pub(super) fn train_member(
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
    let (mut m, start) = Member::set_up(cfg, data, dir, member, members, device, coll)?;
    for epoch in start.epoch..cfg.epochs {
        let (first, so_far) = if epoch == start.epoch {
            (start.step, start.so_far.clone())
        } else {
            (0, EpochSoFar::default())
        };
        let started = Instant::now();
        let (objective, totals) = m.train_epoch(epoch, first, so_far, stop, progress)?;
        if dist::any(coll, stop.load(Ordering::SeqCst), device)? {
            m.save_last(epoch, totals.steps, &totals.sums)?;
            return Err(Error::Interrupted);
        }
        m.select(epoch, &totals, &objective, started, progress)?;
    }
    // Rank 0 kept the best epoch; every rank continues with its weights.
    let best_epoch = reload_best(coll, &m.vs, dir, m.best, device)?
        .ok_or_else(|| Error::invalid("epochs", 0, "at least one trained epoch"))?;
    m.vs.freeze();
    Ok((m.vs, m.net, m.history, best_epoch))
}

impl<'a> Member<'a> {
    /// Builds the network, optimizer, schedule, sampler and loader, and
    /// restores an interrupted run (rank 0 reads, every rank receives).
    fn set_up(
        cfg: &'a TrainConfig,
        data: &'a RunData,
        dir: &'a RunDir,
        member: usize,
        members: usize,
        device: Device,
        coll: &'a dyn Collective,
    ) -> Result<(Self, Start)> {
        let (rank, world) = (coll.rank(), coll.world_size());
        let seed = cfg.seed + member as u64;
        let num_classes = data.train.classes().len() as i64;
        let vs = nn::VarStore::new(device);
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
        let mut memory = group_memory(cfg, world, device)?;
        let state = restore(cfg, dir, &vs, &mut opt, memory.as_mut(), device, coll)?;
        if let Some(s) = &state {
            s.check_member(seed, member).map_err(|what| {
                Error::format(dir.last(), None, format!("trainer state: {what}"))
            })?;
        }
        if let (0, Some(s)) = (rank, &state) {
            dir.write_metrics(&s.history)?;
        }
        let start = state.as_ref().map_or(
            Start {
                epoch: 0,
                step: 0,
                so_far: EpochSoFar::default(),
            },
            |s| Start {
                epoch: s.epoch,
                step: s.step,
                so_far: s.epoch_so_far.clone(),
            },
        );
        let buffers = model_tensors(&vs)
            .into_iter()
            .filter(|(_, t)| !t.requires_grad())
            .map(|(_, t)| t)
            .collect();
        let step_log = (rank == 0)
            .then(|| StepLog::open(dir.steps(), start.epoch, start.step))
            .transpose()?;
        let m = Member {
            cfg,
            data,
            dir,
            coll,
            device,
            label: if members > 1 {
                format!("[model {}/{members}] ", member + 1)
            } else {
                String::new()
            },
            seed,
            member,
            sampler: member_sampler(cfg, data, seed, coll)?,
            loader: member_loader(cfg, data, seed, coll)?,
            schedule: Schedule::of(cfg),
            history: state.as_ref().map_or_else(Vec::new, |s| s.history.clone()),
            best: state.as_ref().and_then(TrainerState::best),
            vs,
            net,
            opt,
            trainable,
            buffers,
            step_log,
            memory,
        };
        Ok((m, start))
    }

    /// Saves the `last` checkpoint (rank 0) at `step` steps into `epoch`
    /// (0-based; all its steps and no evaluation yet: `step` = its steps),
    /// which added up to `so_far`.
    fn save_last(&self, epoch: usize, step: usize, so_far: &EpochSoFar) -> Result<()> {
        if self.coll.rank() != 0 {
            return Ok(());
        }
        Checkpoint {
            model: model_tensors(&self.vs),
            optimizer: self.opt.state_tensors(),
            memory: self.memory.as_ref().map_or_else(Vec::new, Memory::tensors),
            state: TrainerState {
                epoch,
                step,
                optimizer_steps: self.opt.steps(),
                history: self.history.clone(),
                best_epoch: self.best.map(|b| b.0),
                best_value: self.best.map(|b| b.1),
                seed: self.seed,
                member: self.member,
                world_size: self.coll.world_size(),
                memory_steps: self.memory.as_ref().map_or(0, Memory::steps),
                epoch_so_far: so_far.clone(),
            },
        }
        .save(&self.dir.last())
    }

    /// Runs the steps of `epoch` from step `first` (the steps before it
    /// added up to `so_far`): the release's reload of the best weights
    /// first where the schedule says so. Returns the epoch's objective and
    /// its totals. A stop request saves `last` after the step and returns
    /// [`Error::Interrupted`].
    fn train_epoch(
        &mut self,
        epoch: usize,
        first: usize,
        so_far: EpochSoFar,
        stop: &AtomicBool,
        progress: &mut Progress,
    ) -> Result<(Objective, EpochTotals)> {
        let cfg = self.cfg;
        self.sampler.set_epoch(epoch as u64);
        let mut plan = self.sampler.batches();
        if cfg.max_steps_per_epoch > 0 {
            plan.truncate(cfg.max_steps_per_epoch);
        }
        let steps = plan.len();
        let first = first.min(steps);
        let mut totals = EpochTotals {
            sums: so_far,
            steps,
        };
        if first == 0 {
            totals.sums.reloaded_best_epoch = self.reload_if_scheduled(epoch, progress)?;
        }
        let mut objective = Objective::of(cfg, epoch)?;
        let images_before = totals.sums.images;
        let started = Instant::now();
        let batches = plan[first..].to_vec();
        for (j, batch) in self
            .loader
            .epoch_from(batches, epoch as u64, first)?
            .enumerate()
        {
            let step = first + j;
            let batch = batch?;
            let frac = step as f64 / steps.max(1) as f64;
            self.opt.set_lr_factor(self.schedule.factor(epoch, frac));
            objective.at(cfg, epoch as f64 + frac);
            let control = self.step(epoch, step, &batch, &objective, stop)?;
            totals.add(&control, batch.indices.len() * self.coll.world_size());
            if control[0] > 0.0 {
                // Stops after the step: its forward pass already moved the
                // BatchNorm statistics, so a resumed run must not redo it.
                self.flush_steps()?;
                totals.sums.train_s += started.elapsed().as_secs_f64();
                self.save_last(epoch, step + 1, &totals.sums)?;
                return Err(Error::Interrupted);
            }
            let elapsed = started.elapsed().as_secs_f64();
            progress.step(&Step {
                label: &self.label,
                epoch: epoch + 1,
                epochs: cfg.epochs,
                step: step + 1,
                steps,
                loss: totals.mean(totals.sums.loss),
                images_per_s: (totals.sums.images - images_before) as f64 / elapsed.max(1e-9),
                elapsed_epoch: elapsed,
            });
        }
        for s in self.loader.take_skipped() {
            progress.line(&format!(
                "skipped {}: {}",
                self.data.train.describe(s.index),
                s.message
            ));
        }
        totals.sums.train_s += started.elapsed().as_secs_f64();
        self.flush_steps()?;
        Ok((objective, totals))
    }

    /// The release's reload of the best weights at the start of `epoch`,
    /// where the schedule says so (told on `progress`). Returns the epoch
    /// reloaded.
    fn reload_if_scheduled(
        &mut self,
        epoch: usize,
        progress: &mut Progress,
    ) -> Result<Option<usize>> {
        if !self.schedule.reloads_best_at(epoch) {
            return Ok(None);
        }
        let reloaded = reload_best(self.coll, &self.vs, self.dir, self.best, self.device)?;
        if let Some(e) = reloaded {
            progress.line(&format!(
                "{}epoch {}: reloaded the weights of epoch {e} (the best so far), lr {}",
                self.label,
                epoch + 1,
                self.cfg.lr * self.schedule.factor(epoch, 0.0)
            ));
        }
        Ok(reloaded)
    }

    /// One optimizer step on `batch`. Returns the step's control values,
    /// averaged over the ranks: stop flag, loss, NLL and CE terms.
    fn step(
        &mut self,
        epoch: usize,
        step: usize,
        batch: &Batch,
        objective: &Objective,
        stop: &AtomicBool,
    ) -> Result<Vec<f64>> {
        let world = self.coll.world_size();
        let mut stream = vec![epoch as u64, step as u64, stream::STEP];
        if world > 1 {
            stream.push(self.coll.rank() as u64);
        }
        tch::manual_seed(derive_seed(self.seed, &stream) as i64 & i64::MAX);
        let images = batch.images.to_device(self.device);
        let labels = batch.labels.to_device(self.device);
        self.opt.zero_grad();
        let autocast = self.cfg.bf16 && self.device.is_cuda();
        let scope = GroupScope {
            ranks: self.cfg.gather_ranks.then_some(self.coll),
            memory: self.memory.as_mut(),
        };
        let out = forward_backward(&self.net, &images, &labels, objective, autocast, scope)?;
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
            let t = Tensor::from_slice(&control).to_device(self.device);
            average_gradients(self.coll, &self.trainable, &t)?;
            control = Vec::<f64>::try_from(&t.to_device(Device::Cpu))?;
        }
        let loss = control[1];
        if !loss.is_finite() {
            return Err(Error::invalid(
                "loss",
                format!("{loss} at epoch {}, step {step}", epoch + 1),
                "a finite loss (lower lr or temperature?)",
            ));
        }
        self.opt.step();
        if let Some(log) = &mut self.step_log {
            log.write(epoch + 1, step + 1, loss, self.opt.lrs())?;
        }
        Ok(control)
    }

    /// Writes the step log's buffer (rank 0 keeps one).
    fn flush_steps(&mut self) -> Result<()> {
        self.step_log.as_mut().map_or(Ok(()), StepLog::flush)
    }

    /// After `epoch`'s steps: evaluates on the selection split, records
    /// the epoch, saves `best` when it improved and `last` always, and
    /// reports the epoch's line.
    fn select(
        &mut self,
        epoch: usize,
        totals: &EpochTotals,
        objective: &Objective,
        started: Instant,
        progress: &mut Progress,
    ) -> Result<()> {
        let cfg = self.cfg;
        // Ranks evaluate (and rank 0 saves) the same network: rank 0's
        // running statistics, which a resumed run restores as well.
        dist::broadcast_bucketed(self.coll, &self.buffers)?;
        let Some(embeddings) = embed_set(
            &self.net,
            &self.data.select,
            &self.data.eval_transform,
            cfg,
            self.device,
            cfg.select_max_images,
            self.coll,
        )?
        else {
            return Ok(());
        };
        let metrics = evaluate_for_selection(&embeddings, cfg)?;
        let value = metrics
            .get(&cfg.select_metric)
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN);
        let mut record = json!({
            "epoch": epoch + 1,
            "train_loss": totals.mean(totals.sums.loss),
            "train_nll": totals.mean(totals.sums.nll),
            "train_ce": totals.mean(totals.sums.ce),
            "images_per_s": totals.images_per_s(),
            "lr": self.opt.lrs()[1],
            "gtg_weight": objective.gtg_weight(),
            "backbone_lr": self.opt.lrs()[0],
            "reloaded_best_epoch": totals.sums.reloaded_best_epoch,
            "time_s": started.elapsed().as_secs_f64(),
        });
        record[selection_key(cfg)] = Value::Object(metrics);
        self.history.push(record);
        let improved = self.best.is_none_or(|(_, b)| value > b || b.is_nan());
        if improved {
            self.best = Some((epoch + 1, value));
            self.save_best(epoch, value)?;
        }
        self.save_last(epoch + 1, 0, &EpochSoFar::default())?;
        self.dir.write_metrics(&self.history)?;
        progress.line(&format!(
            "{}epoch {}/{}: loss {:.4}, {:.0} img/s, {} {} {:.4}{}",
            self.label,
            epoch + 1,
            cfg.epochs,
            totals.mean(totals.sums.loss),
            totals.images_per_s(),
            selection_key(cfg),
            cfg.select_metric,
            value,
            if improved { " (best)" } else { "" }
        ));
        Ok(())
    }

    /// Saves the `best` checkpoint (weights only) of `epoch` (0-based).
    fn save_best(&self, epoch: usize, value: f64) -> Result<()> {
        if self.coll.rank() != 0 {
            return Ok(());
        }
        Checkpoint {
            model: model_tensors(&self.vs),
            optimizer: Vec::new(),
            memory: Vec::new(),
            state: BestState {
                epoch: epoch + 1,
                value: value.is_finite().then_some(value),
                metric: self.cfg.select_metric.clone(),
            },
        }
        .save(&self.dir.best())
    }
}

/// The Group Loss's memory of a run (`memory_size` > 0 with `loss =
/// "group"`). Several processes need `gather_ranks`, so that the memory
/// (of global batches) is the same on every rank and rank 0's checkpoint
/// holds it.
fn group_memory(cfg: &TrainConfig, world: usize, device: Device) -> Result<Option<Memory>> {
    if cfg.loss != "group" || cfg.memory_size == 0 {
        return Ok(None);
    }
    if world > 1 && !cfg.gather_ranks {
        return Err(Error::invalid(
            "memory_size",
            format!(
                "{} with {world} processes and gather_ranks = false",
                cfg.memory_size
            ),
            "gather_ranks = true with several processes (one memory of the global batches)",
        ));
    }
    Ok(Some(Memory::new(
        cfg.memory_size,
        cfg.memory_warmup_steps,
        device,
    )))
}

/// The member's P x K sampler: its seed, this rank's share.
fn member_sampler(
    cfg: &TrainConfig,
    data: &RunData,
    seed: u64,
    coll: &dyn Collective,
) -> Result<ClassBalancedSampler> {
    ClassBalancedSampler::new(
        data.train.labels(),
        cfg.classes_per_batch,
        cfg.samples_per_class,
        SamplerOptions {
            seed,
            num_replicas: coll.world_size(),
            rank: coll.rank(),
        },
    )
}

/// The member's training loader. Ranks draw their own augmentations; one
/// process keeps `seed`.
fn member_loader(
    cfg: &TrainConfig,
    data: &RunData,
    seed: u64,
    coll: &dyn Collective,
) -> Result<Loader> {
    let workers = cfg.num_workers.max(1);
    Loader::new(
        Arc::clone(&data.train),
        data.train_transform.clone(),
        LoaderOptions {
            num_threads: workers,
            prefetch: cfg.prefetch.max(workers),
            seed: if coll.world_size() > 1 {
                derive_seed(seed, &[coll.rank() as u64, stream::RANK])
            } else {
                seed
            },
            on_error: OnError::parse(&cfg.on_error)?,
        },
    )
}

/// Rank 0 loads the best checkpoint so far (`best`: its epoch and value on
/// rank 0) and every rank takes its weights and BatchNorm statistics.
/// Returns the epoch loaded, or None when there is no best epoch yet.
pub(super) fn reload_best(
    coll: &dyn Collective,
    vs: &nn::VarStore,
    dir: &RunDir,
    best: Option<(usize, f64)>,
    device: Device,
) -> Result<Option<usize>> {
    let loaded = match best {
        Some((e, _)) if coll.rank() == 0 => Checkpoint::<BestState>::load(&dir.best())
            .and_then(|ck| load_model(vs, &ck.model, &dir.best()))
            .map(|()| Some(e)),
        _ => Ok(None),
    };
    let Some(epoch) = dist::agree(coll, loaded, device)? else {
        return Ok(None);
    };
    let vars: Vec<Tensor> = model_tensors(vs).into_iter().map(|(_, t)| t).collect();
    dist::broadcast_bucketed(coll, &vars)?;
    Ok(Some(epoch))
}
