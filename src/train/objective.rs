//! What the trainer minimises: the Group Loss, or one of the peers it is
//! compared with in the same loop (cross-entropy alone, a batch-hard
//! triplet loss).

use tch::{Kind, Reduction, Tensor};

use super::config::TrainConfig;
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
            other => Err(Error::invalid(
                "loss",
                format!("{other:?}"),
                "one of group, softmax, triplet",
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
        *seed = derive_seed(cfg.seed, &[epoch as u64, 7]);
    }
    Ok(opts)
}

/// The forward pass of a batch, the loss and its backward pass into the
/// network: the parameters' `.grad` receive this batch's gradients (added
/// to what they hold).
pub fn forward_backward(
    net: &EmbeddingNet,
    images: &Tensor,
    labels: &Tensor,
    objective: &Objective,
    autocast: bool,
) -> Result<StepLoss> {
    let (emb, logits) = if autocast {
        tch::autocast(true, || net.forward_t(images, true))
    } else {
        net.forward_t(images, true)
    };
    match objective {
        Objective::Group(opts) => group_backward(&emb, &logits, labels, opts),
        Objective::Softmax => {
            let logits = logits.to_kind(Kind::Float);
            let ce = logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Mean, -100, 0.0);
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
/// the network.
fn group_backward(
    emb: &Tensor,
    logits: &Tensor,
    labels: &Tensor,
    opts: &GroupLossOptions,
) -> Result<StepLoss> {
    let want = loss::Want {
        grads: true,
        probs: false,
    };
    let out = loss::evaluate(emb, logits, labels, opts, want, Implementation::Auto)?;
    let (ge, gl) = match (&out.grad_embeddings, &out.grad_logits) {
        (Some(a), Some(b)) => (a, b),
        _ => return Err(Error::invalid("loss", "no gradients", "gradients")),
    };
    let surrogate = (emb.to_kind(ge.kind()) * ge).sum(ge.kind())
        + (logits.to_kind(gl.kind()) * gl).sum(gl.kind());
    surrogate.backward();
    Ok(StepLoss {
        loss: out.loss,
        nll: out.nll,
        ce: out.ce,
    })
}
