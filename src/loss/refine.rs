//! Label propagation by replicator dynamics.

use tch::{Kind, Tensor};

/// Replaces the rows of `probs` flagged in `anchor_mask` (bool, n) by the
/// one-hot vectors of their `labels` (int64 in `[0, probs.size(1))`).
/// No renormalisation, as in the release.
pub fn apply_anchors(probs: &Tensor, labels: &Tensor, anchor_mask: &Tensor) -> Tensor {
    let m = probs.size()[1];
    let one_hot = labels.one_hot(m).to_kind(probs.kind());
    one_hot.where_self(&anchor_mask.unsqueeze(1), probs)
}

/// `num_iters` replicator steps `X <- X * (W X) / rowsum(X * (W X))`.
///
/// A row whose update sums to zero (a sample similar to nothing, with a zeroed
/// diagonal, or whose support vanished) or to less than the smallest normal
/// number is left as it is: the release divides 0 by 0 there, and below the
/// normal range the division's gradient overflows. Everywhere else the result is exactly the release's.
pub fn replicator(probs: &Tensor, w: &Tensor, num_iters: i64) -> Tensor {
    replicator_with_support(probs, w, None, num_iters)
}

/// [`replicator`] with `support` (n x m, fixed) added to `W X` at every
/// step: the pull of labelled points outside the batch, `W_bm Y_m` for
/// their similarities `W_bm` to the batch and their one-hot rows `Y_m`
/// (which replicator steps leave one-hot).
pub fn replicator_with_support(
    probs: &Tensor,
    w: &Tensor,
    support: Option<&Tensor>,
    num_iters: i64,
) -> Tensor {
    let mut x = probs.shallow_clone();
    for _ in 0..num_iters {
        let pull = match support {
            Some(s) => w.mm(&x) + s,
            None => w.mm(&x),
        };
        let num = &x * pull;
        let total = num.sum_dim_intlist([1i64].as_slice(), true, num.kind());
        let ok = tch::no_grad(|| total.gt(min_normal(total.kind())));
        let safe_total = total.where_scalarother(&ok, 1.0);
        x = (num / safe_total).where_self(&ok, &x);
    }
    x
}

/// The smallest positive normal number of `kind`: row sums at or below it
/// count as zero (their reciprocal overflows, their square underflows).
pub fn min_normal(kind: Kind) -> f64 {
    match kind {
        Kind::Double => f64::MIN_POSITIVE,
        Kind::Half => 6.103_515_625e-5,
        _ => f32::MIN_POSITIVE as f64,
    }
}

/// Anchors, then replicator steps: the refined probabilities.
pub fn refine(
    probs: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    anchor_mask: &Tensor,
    num_iters: i64,
) -> Tensor {
    replicator(&apply_anchors(probs, labels, anchor_mask), w, num_iters)
}

/// `log(X + 1e-12)`, the release's guard against log(0).
pub fn log_probs(x: &Tensor) -> Tensor {
    (x + 1e-12).log()
}

/// The kind arithmetic runs in: at least float32.
pub fn compute_kind(kinds: &[Kind]) -> Kind {
    if kinds.contains(&Kind::Double) {
        Kind::Double
    } else {
        Kind::Float
    }
}
