//! A memory of earlier batches joining the group (`memory_size`).
//!
//! The embeddings of the last M samples of earlier steps (detached) and
//! their labels join each batch's group as labelled points: they are rows of
//! W and one-hot rows of X, like anchors, but they are not scored and
//! receive no gradient. The loss is that of the concatenation of memory and
//! batch with the memory rows as anchors, the NLL averaged over the batch's
//! rows only and the cross-entropy over the batch's logits only.
//!
//! A memory row stays one-hot through the replicator steps, so only the
//! batch's rows of W are needed: `W X` of a batch row is `W_bb X_b + W_bm
//! Y_m`, with `W_bm` the n x M similarities of the batch to the memory and
//! `Y_m` the memory's one-hot rows; the second term is fixed over the steps
//! (the "support"). The cost beyond the batch is one n x M similarity,
//! O(n M d), and a scatter of its columns into their classes, O(n M).
//!
//! With `batch_classes_only`, the columns are the classes of batch and
//! memory together.

use tch::{Kind, Tensor};

use super::checks::{self, check_finite, check_matrix_shape, check_same_device};
use super::refine;
use super::{autograd_loss, evaluate, GroupLossOptions, GroupLossOutput, Implementation, Want};
use crate::error::{ensure, Result};

/// The labelled points of earlier batches: embeddings (M x d) and labels
/// (M, integers in `[0, m)`), on the batch's device.
#[derive(Clone, Copy, Debug)]
pub struct MemoryRows<'a> {
    pub embeddings: &'a Tensor,
    pub labels: &'a Tensor,
}

impl MemoryRows<'_> {
    /// Number of rows.
    pub fn len(&self) -> i64 {
        self.embeddings.size()[0]
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The memory fits a batch of `d`-dimensional embeddings, `m` logits, on
    /// the device of `emb`: shapes, dtypes, device, finite values, labels in
    /// range (names `memory_embeddings` and `memory_labels`).
    pub fn check(&self, emb: &Tensor, m: i64) -> Result<()> {
        let (mem, labels) = (self.embeddings, self.labels);
        checks::check_dense(mem, "memory_embeddings")?;
        ensure(
            mem.dim() == 2,
            "memory_embeddings",
            || format!("a tensor of shape {}", checks::shape(mem)),
            "a (memory rows x embedding dims) tensor",
        )?;
        if mem.size()[0] > 0 {
            check_matrix_shape(mem, "memory_embeddings", "memory rows x embedding dims")?;
        }
        let d = emb.size()[1];
        ensure(
            mem.size()[0] == 0 || mem.size()[1] == d,
            "memory_embeddings",
            || format!("{} columns", mem.size()[1]),
            format!("the embeddings' {d} columns"),
        )?;
        checks::check_dtype(
            mem,
            "memory_embeddings",
            checks::is_float,
            "a floating dtype",
        )?;
        checks::check_label_vector(
            labels,
            "memory_labels",
            "a 1-D tensor of class indices",
            Some((mem.size()[0], "one label per memory row".to_string())),
        )?;
        check_same_device(
            "embeddings",
            emb,
            &[("memory_embeddings", mem), ("memory_labels", labels)],
        )?;
        check_finite(mem, "memory_embeddings")?;
        if labels.numel() > 0 {
            let (lo, hi) = (i64::try_from(labels.min())?, i64::try_from(labels.max())?);
            ensure(
                lo >= 0 && hi < m,
                "memory_labels",
                || format!("labels from {lo} to {hi}"),
                format!("labels in [0, {m}) (the logits' columns)"),
            )?;
        }
        Ok(())
    }
}

/// The memory once a batch has joined it: `memory`'s rows (oldest first),
/// then `embeddings` (detached) and `labels`, of which the last `size` are
/// kept, in the batch's dtype and on its device. The one first-in
/// first-out rule of the `GroupLoss` module (`_native.memory_push`) and of
/// the trainer ([`crate::train::memory::Memory`]). Errors name
/// `embeddings` when its width is not the memory's.
pub fn push_rows(
    memory: MemoryRows<'_>,
    embeddings: &Tensor,
    labels: &Tensor,
    size: usize,
) -> Result<(Tensor, Tensor)> {
    check_matrix_shape(embeddings, "embeddings", "samples x embedding dims")?;
    checks::check_label_vector(
        labels,
        "labels",
        "a 1-D tensor of class indices",
        Some((
            embeddings.size()[0],
            "one label per row of embeddings".to_string(),
        )),
    )?;
    let new = embeddings.detach();
    let (device, kind) = (new.device(), new.kind());
    let labels = labels.to_device(device).to_kind(Kind::Int64);
    ensure(
        memory.labels.size() == [memory.len()],
        "memory_labels",
        || format!("a tensor of shape {}", checks::shape(memory.labels)),
        format!("one label per memory row ({})", memory.len()),
    )?;
    let (have, got) = (memory.len(), new.size()[0]);
    if have > 0 {
        let width = memory.embeddings.size()[1];
        ensure(
            width == new.size()[1],
            "embeddings",
            || format!("{} columns", new.size()[1]),
            format!("the memory's {width} columns"),
        )?;
    }
    // The kept rows only are copied: the newest `from_new` of the batch
    // after the newest `from_old` of the memory, in one new tensor (which
    // shares no storage with the batch or the old memory).
    // A size beyond i64 keeps everything, as any size beyond the rows does.
    let keep = i64::try_from(size).unwrap_or(i64::MAX).min(have + got);
    let from_new = keep.min(got);
    let from_old = keep - from_new;
    let new_rows = new.narrow(0, got - from_new, from_new);
    let new_labels = labels.narrow(0, got - from_new, from_new);
    if from_old == 0 {
        return Ok((new_rows.copy(), new_labels.copy()));
    }
    let old_rows = memory
        .embeddings
        .narrow(0, have - from_old, from_old)
        .to_device(device)
        .to_kind(kind);
    let old_labels = memory
        .labels
        .narrow(0, have - from_old, from_old)
        .to_device(device)
        .to_kind(Kind::Int64);
    Ok((
        Tensor::cat(&[&old_rows, &new_rows], 0),
        Tensor::cat(&[&old_labels, &new_labels], 0),
    ))
}

/// The Group Loss of a batch joined by `memory` (see the module notes), by
/// differentiable libtorch ops on any device; with `want.grads`, the
/// gradients with respect to `emb` and `logits` are taken by autograd and
/// the loss returned without a graph.
pub fn group_loss_with_memory(
    emb: &Tensor,
    logits: &Tensor,
    labels: &Tensor,
    memory: MemoryRows<'_>,
    opts: &GroupLossOptions,
    want: Want,
) -> Result<GroupLossOutput> {
    checks::check_inputs(emb, logits, labels, opts)?;
    memory.check(emb, logits.size()[1])?;
    if memory.is_empty() || opts.gtg_weight == 0.0 {
        // The memory only joins the refinement.
        let how = if want.grads {
            Implementation::Libtorch
        } else {
            Implementation::Autograd
        };
        return evaluate(emb, logits, labels, opts, want, how);
    }
    if !want.grads {
        return autograd_loss(emb, logits, labels, Some(memory), opts);
    }
    let kind = refine::compute_kind(&[emb.kind(), logits.kind()]);
    let e = emb.detach().to_kind(kind).set_requires_grad(true);
    let l = logits.detach().to_kind(kind).set_requires_grad(true);
    let (mut out, grads) = tch::with_grad(|| -> Result<_> {
        let out = autograd_loss(&e, &l, labels, Some(memory), opts)?;
        let grads = Tensor::run_backward(&[&out.loss], &[&e, &l], false, false);
        Ok((out, grads))
    })?;
    out.grad_embeddings = Some(grads[0].shallow_clone());
    out.grad_logits = Some(grads[1].shallow_clone());
    out.loss = out.loss.detach();
    out.nll = out.nll.map(|t| t.detach());
    out.ce = out.ce.map(|t| t.detach());
    out.probs = if want.probs {
        out.probs.map(|t| t.detach())
    } else {
        None
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// First in, first out; the batch's dtype; the width checked by name.
    #[test]
    fn push_rows_keeps_the_last_rows_in_the_batchs_dtype() {
        let empty = Tensor::zeros([0, 0], (Kind::Float, Device::Cpu));
        let none = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
        let batch = |v: f64| Tensor::full([2, 3], v, (Kind::Double, Device::Cpu));
        let rows = |e, l| MemoryRows {
            embeddings: e,
            labels: l,
        };
        let (e, l) = push_rows(
            rows(&empty, &none),
            &batch(1.0),
            &Tensor::from_slice(&[1i32, 2]),
            3,
        )
        .unwrap();
        assert_eq!(
            (e.kind(), l.kind(), e.size()),
            (Kind::Double, Kind::Int64, vec![2, 3])
        );
        let (e, l) = push_rows(
            rows(&e, &l),
            &batch(2.0),
            &Tensor::from_slice(&[3i64, 4]),
            3,
        )
        .unwrap();
        assert_eq!(Vec::<i64>::try_from(&l).unwrap(), [2, 3, 4]);
        assert_eq!(
            Vec::<f64>::try_from(e.select(1, 0)).unwrap(),
            [1.0, 2.0, 2.0]
        );
        let narrow = Tensor::zeros([2, 4], (Kind::Double, Device::Cpu));
        let err = push_rows(rows(&e, &l), &narrow, &Tensor::from_slice(&[0i64, 0]), 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            "embeddings: expected the memory's 3 columns, got 4 columns"
        );
    }
}
