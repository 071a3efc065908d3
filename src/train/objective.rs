//! What the trainer minimises: the Group Loss, or one of the peers it is
//! compared with in the same loop (cross-entropy alone, a batch-hard
//! triplet loss).

use tch::{Kind, Reduction, Tensor};

use super::config::TrainConfig;
use super::distributed::{all_gather_rows, Collective};
use super::memory::Memory;
use crate::error::{Error, Result};
use crate::loss::{self, AnchorMode, GroupLossOptions, Implementation};
use crate::model::EmbeddingNet;
use crate::rng::derive_seed;

/// The loss of a run (`loss` in the configuration).
#[derive(Clone, Debug)]
pub enum Objective {
    /// The Group Loss, with its closed-form gradients.
    Group(GroupLossOptions),
    /// Cross-entropy of the classifier's logits (normalised softmax with the
    /// cosine classifier).
    Softmax,
    /// pytorch-metric-learning's `TripletMarginLoss` over `BatchHardMiner`'s
    /// triplets.
    Triplet { margin: f64 },
}

/// A step's loss and, for the Group Loss, its two terms (0-d tensors).
#[derive(Debug)]
pub struct StepLoss {
    pub loss: Tensor,
    pub nll: Option<Tensor>,
    pub ce: Option<Tensor>,
}

impl Objective {
    /// The objective of `epoch` (0-based): the Group Loss's anchors are
    /// seeded per epoch, its weight set per step by [`Objective::at`].
    pub fn of(cfg: &TrainConfig, epoch: usize) -> Result<Self> {
        match cfg.loss.as_str() {
            "group" => Ok(Objective::Group(group_options(cfg, epoch)?)),
            "softmax" => Ok(Objective::Softmax),
            "triplet" => Ok(Objective::Triplet {
                margin: cfg.triplet_margin,
            }),
            other => Err(crate::error::not_one_of(
                "loss",
                other,
                &super::config::LOSSES,
            )),
        }
    }

    /// Sets what changes within a run to its value `progress` epochs in
    /// (the Group Loss term's warm-up and ramp).
    pub fn at(&mut self, cfg: &TrainConfig, progress: f64) {
        if let Objective::Group(o) = self {
            o.gtg_weight = cfg.gtg_weight_at(progress);
        }
    }

    /// The Group Loss term's weight (None for the other losses).
    pub fn gtg_weight(&self) -> Option<f64> {
        match self {
            Objective::Group(o) => Some(o.gtg_weight),
            _ => None,
        }
    }
}

/// The Group Loss's options for `epoch`: the weight of its warm-up and
/// ramp, random anchors seeded for the epoch.
pub fn group_options(cfg: &TrainConfig, epoch: usize) -> Result<GroupLossOptions> {
    let mut opts = cfg.group_loss_options()?;
    opts.gtg_weight = cfg.gtg_weight_at(epoch as f64);
    if let AnchorMode::Random { seed } = &mut opts.anchors {
        *seed = derive_seed(cfg.seed, &[epoch as u64, crate::rng::stream::ANCHORS]);
    }
    Ok(opts)
}

/// What the Group Loss's group holds beyond this rank's batch.
#[derive(Default)]
pub struct GroupScope<'a> {
    /// `gather_ranks`: the ranks whose batches form one group with this
    /// one (None: this rank's batch alone).
    pub ranks: Option<&'a dyn Collective>,
    /// `memory_size`: earlier batches, joining as labelled points.
    pub memory: Option<&'a mut Memory>,
}

/// The forward pass of a batch, the loss and its backward pass into the
/// network: the parameters' `.grad` receive this batch's gradients (added
/// to what they hold). The Group Loss's group may reach beyond the batch
/// (`scope`).
pub fn forward_backward(
    net: &EmbeddingNet,
    images: &Tensor,
    labels: &Tensor,
    objective: &Objective,
    autocast: bool,
    scope: GroupScope<'_>,
) -> Result<StepLoss> {
    let (emb, logits) = if autocast {
        super::autocast::bfloat16(|| net.forward_t(images, true))
    } else {
        net.forward_t(images, true)
    };
    match objective {
        Objective::Group(opts) => group_backward(&emb, &logits, labels, opts, scope),
        Objective::Softmax => {
            let logits = logits.to_kind(Kind::Float);
            let (no_weights, ignore_index, label_smoothing) = (None, -100, 0.0);
            let ce = logits.cross_entropy_loss::<Tensor>(
                labels,
                no_weights,
                Reduction::Mean,
                ignore_index,
                label_smoothing,
            );
            ce.backward();
            Ok(StepLoss {
                loss: ce.detach(),
                nll: None,
                ce: Some(ce.detach()),
            })
        }
        Objective::Triplet { margin } => {
            let loss = loss::triplet::triplet_margin_batch_hard(
                &emb.to_kind(Kind::Float),
                labels,
                *margin,
            )?;
            if loss.requires_grad() {
                loss.backward();
            }
            Ok(StepLoss {
                loss: loss.detach(),
                nll: None,
                ce: None,
            })
        }
    }
}

/// The Group Loss with its closed-form gradients, handed to autograd for
/// the network. With `scope.ranks`, the loss is that of every rank's batch
/// together (the same on every rank) and this rank's rows of its gradient
/// are scaled by the world size, so that averaging the ranks' parameter
/// gradients gives the global loss's. With `scope.memory`, the memory joins
/// the group and then takes the group's samples in.
fn group_backward(
    emb: &Tensor,
    logits: &Tensor,
    labels: &Tensor,
    opts: &GroupLossOptions,
    scope: GroupScope<'_>,
) -> Result<StepLoss> {
    let want = loss::Want {
        grads: true,
        probs: false,
    };
    let (emb_d, logits_d) = (emb.detach(), logits.detach());
    let (group_emb, group_logits, group_labels, mine, world) = match scope.ranks {
        Some(coll) if coll.world_size() > 1 => {
            let (all, mine) = all_gather_rows(coll, &[&emb_d, &logits_d, labels])?;
            let [e, l, y]: [Tensor; 3] = all.try_into().expect("one result per tensor");
            (e, l, y, Some(mine), coll.world_size() as f64)
        }
        _ => (emb_d, logits_d, labels.shallow_clone(), None, 1.0),
    };
    let memory = scope.memory;
    let rows = memory.as_ref().and_then(|m| m.rows());
    let out = loss::evaluate_with_memory(
        &group_emb,
        &group_logits,
        &group_labels,
        rows,
        opts,
        want,
        Implementation::Auto,
    )?;
    if let Some(m) = memory {
        m.push(&group_emb, &group_labels)?;
    }
    let (ge, gl) = match (out.grad_embeddings, out.grad_logits) {
        (Some(a), Some(b)) => (a, b),
        _ => return Err(Error::invalid("loss", "no gradients", "gradients")),
    };
    let (ge, gl) = match mine {
        Some((start, n)) => (
            ge.narrow(0, start, n) * world,
            gl.narrow(0, start, n) * world,
        ),
        None => (ge, gl),
    };
    let surrogate = (emb.to_kind(ge.kind()) * &ge).sum(ge.kind())
        + (logits.to_kind(gl.kind()) * &gl).sum(gl.kind());
    surrogate.backward();
    Ok(StepLoss {
        loss: out.loss,
        nll: out.nll,
        ce: out.ce,
    })
}
