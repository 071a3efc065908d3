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
/// normal range the division's gradient overflows. Everywhere else the
/// result and its autograd gradient are exactly the release's, the gradient
/// of `probs`' zeros included.
pub fn replicator(probs: &Tensor, w: &Tensor, num_iters: i64) -> Tensor {
    steps(probs, w, None, num_iters, false)
}

/// The loss's [`replicator`]: `support` (n x m, fixed) added to `W X` at
/// every step, the pull of labelled points outside the batch (`W_bm Y_m`
/// for their similarities `W_bm` to the batch and their one-hot rows `Y_m`,
/// which replicator steps leave one-hot), and no gradient through the exact
/// zeros of X, from X0 to the result ([`gradient_on_support`]).
pub fn replicator_with_support(
    probs: &Tensor,
    w: &Tensor,
    support: Option<&Tensor>,
    num_iters: i64,
) -> Tensor {
    steps(probs, w, support, num_iters, true)
}

fn steps(
    probs: &Tensor,
    w: &Tensor,
    support: Option<&Tensor>,
    num_iters: i64,
    zeros_constant: bool,
) -> Tensor {
    let mut x = probs.shallow_clone();
    for _ in 0..num_iters {
        if zeros_constant {
            x = gradient_on_support(&x);
        }
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
    if zeros_constant {
        gradient_on_support(&x)
    } else {
        x
    }
}

/// `x` whose exact zeros pass no gradient back (autograd).
///
/// In the loss an exact zero of X is a constant: X0's zeros are the anchors'
/// one-hot rows or a prior that underflowed (derivative 0), and a step's
/// zero comes from a zero of X or of W X, whose terms each have a factor
/// that is such a zero or a W entry clipped by the relu (or the zeroed
/// diagonal). Carried anyway, the gradient of such a zero can overflow (an
/// anchor whose only unanchored neighbour gives its class 7e-23 has 1e43
/// there in float32; a label probability of 0 has 1e12 / n, divided by its
/// row's sum), and inf * 0 made every gradient NaN. Where a zero is a
/// product that underflowed instead (a W entry within 1e-37 of the relu's
/// kink, a row summing to 1e-35), the gradient it would carry is lost with
/// its value: float32 holds neither. [`on_support`] is the same rule for
/// the closed-form backward.
pub fn gradient_on_support(x: &Tensor) -> Tensor {
    let nonzero = tch::no_grad(|| x.ne(0.0));
    x.where_self(&nonzero, &x.detach())
}

/// `grad`, the gradient of X, where `x` is non-zero and 0 elsewhere: see
/// [`gradient_on_support`].
pub fn on_support(grad: &Tensor, x: &Tensor) -> Tensor {
    grad.where_scalarother(&x.ne(0.0), 0.0)
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
