//! The Group Loss with its gradients in closed form, over libtorch ops on any
//! device.
//!
//! Autograd through the replicator dynamics keeps every intermediate and runs
//! three n x n x m products per step. Here the backward is written out:
//!
//! * the NLL reads one entry per row of the last X, so the gradient entering
//!   the last step is one-hot per row, and the last step needs only
//!   `s_i = sum_j W_ij G_ij` with `G = X X^T` in the forward, and one product
//!   `(W o (b 1^T + 1 b^T)) X` in the backward (W is symmetric);
//! * earlier steps (num_iters > 1) take two products each;
//! * softmax, cross-entropy and the similarity have their textbook gradients.
//!
//! Nothing here records an autograd graph: callers hand the gradients to the
//! autograd engine (`torch.autograd.Function` in Python; in the Rust training
//! loop, the backward of the surrogate `sum(emb * d_emb) + sum(logits *
//! d_logits)`, `train::objective`).

use tch::{Kind, Tensor};

use super::anchors::anchor_mask;
use super::checks::check_inputs;
use super::refine::{apply_anchors, compute_kind, min_normal, on_support};
use super::similarity::SimilarityPass;
use super::{GroupLossOptions, GroupLossOutput};
use crate::error::Result;

fn rowsum(t: &Tensor) -> Tensor {
    t.sum_dim_intlist([1i64].as_slice(), true, t.kind())
}

/// One replicator step of the forward pass, kept for the backward.
struct Step {
    x_prev: Tensor,
    a: Tensor,
    s: Tensor,
    ok: Tensor,
    x: Tensor,
}

/// The loss and, if `want_grads`, its gradients; the refined probabilities if
/// `want_probs`. Same inputs and semantics as [`super::group_loss`].
pub fn group_loss_with_grads(
    emb: &Tensor,
    logits: &Tensor,
    labels: &Tensor,
    opts: &GroupLossOptions,
    want_grads: bool,
    want_probs: bool,
) -> Result<GroupLossOutput> {
    check_inputs(emb, logits, labels, opts)?;
    let _guard = tch::no_grad_guard();
    let kind = compute_kind(&[emb.kind(), logits.kind()]);
    let emb = emb.detach().to_kind(kind);
    let logits = logits.detach().to_kind(kind);
    let labels = labels.to_kind(Kind::Int64);

    let mut grad_logits = want_grads.then(|| logits.zeros_like());
    let ce = (opts.ce_weight != 0.0)
        .then(|| cross_entropy(&logits, &labels, opts.ce_weight, grad_logits.as_mut()));
    let (nll, probs, classes, grad_emb) = if opts.gtg_weight != 0.0 {
        let r = refinement(
            &emb,
            &logits,
            &labels,
            opts,
            grad_logits.as_mut(),
            want_probs,
        )?;
        (Some(r.nll), r.probs, r.classes, r.grad_emb)
    } else {
        (None, None, None, None)
    };
    let grad_emb = grad_emb.or_else(|| want_grads.then(|| emb.zeros_like()));
    Ok(GroupLossOutput {
        loss: super::weighted(&nll, &ce, opts),
        nll,
        ce,
        probs,
        classes,
        grad_embeddings: grad_emb,
        grad_logits,
    })
}

/// The cross-entropy of the logits; its gradient, times `weight`, is added
/// to `grad` when given.
fn cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    weight: f64,
    grad: Option<&mut Tensor>,
) -> Tensor {
    let kind = logits.kind();
    let lse = logits.logsumexp([1i64].as_slice(), true);
    let picked = logits.gather(1, &labels.unsqueeze(1), false);
    let ce = (&lse - picked).mean(kind);
    if let Some(g) = grad {
        let p = (logits - &lse).exp();
        let one_hot = labels.one_hot(logits.size()[1]).to_kind(kind);
        *g += (p - one_hot) * (weight / logits.size()[0] as f64);
    }
    ce
}

/// What the refinement gives.
struct Refinement {
    nll: Tensor,
    probs: Option<Tensor>,
    /// With `batch_classes_only`: the classes of the columns.
    classes: Option<Tensor>,
    /// d loss / d embeddings, when gradients are asked for.
    grad_emb: Option<Tensor>,
}

/// Steps 1 to 5 of the loss's NLL term; with `grad_logits`, its gradient
/// of the logits is added there and that of the embeddings returned.
fn refinement(
    emb: &Tensor,
    logits: &Tensor,
    labels: &Tensor,
    opts: &GroupLossOptions,
    grad_logits: Option<&mut Tensor>,
    want_probs: bool,
) -> Result<Refinement> {
    let kind = emb.kind();
    let sim = SimilarityPass::forward(
        emb,
        opts.similarity,
        opts.zero_diagonal,
        opts.similarity_power,
    );
    let w = &sim.w;
    let (selected, targets, classes) = if opts.batch_classes_only {
        let (classes, inverse, _) = labels.internal_unique2(true, true, false);
        // softmax over all classes, restricted and renormalised, is the
        // softmax over the restricted columns.
        (logits.index_select(1, &classes), inverse, Some(classes))
    } else {
        (logits.shallow_clone(), labels.shallow_clone(), None)
    };
    let prior = (&selected / opts.temperature).softmax(1, kind);
    let mask = anchor_mask(labels, opts.num_anchors, opts.anchors)?;
    let x0 = apply_anchors(&prior, &targets, &mask);
    let (steps, x) = forward_steps(w, x0, opts.num_iters);
    let last = LastStep::of(&x, w, &targets);
    let probs = want_probs.then(|| last.probs(w, &x));
    let grad_emb = grad_logits.map(|gl| {
        let (dx, dw) = last.grads(w, &targets, opts.gtg_weight);
        let (dx0, dw) = backward_steps(&steps, w, dx, dw);
        // Through the anchors (constant rows) and the softmax prior.
        let r0 = rowsum(&(&dx0 * &prior));
        let dprior = (&prior * (dx0 - r0) / opts.temperature)
            .where_scalarother(&mask.unsqueeze(1).logical_not(), 0.0);
        match &classes {
            Some(c) => {
                let _ = gl.index_add_(1, c, &dprior);
            }
            None => *gl += dprior,
        }
        sim.backward(&dw)
    });
    Ok(Refinement {
        nll: last.nll(),
        probs,
        classes,
        grad_emb,
    })
}

/// The first `num_iters - 1` replicator steps from `x0`, kept for the
/// backward, and the X they end at.
fn forward_steps(w: &Tensor, x0: Tensor, num_iters: i64) -> (Vec<Step>, Tensor) {
    let mut steps: Vec<Step> = Vec::new();
    let mut x = x0;
    for _ in 1..num_iters {
        let a = w.mm(&x);
        let num = &x * &a;
        let s = rowsum(&num);
        let ok = s.gt(min_normal(s.kind()));
        let next = (num / s.where_scalarother(&ok, 1.0)).where_self(&ok, &x);
        steps.push(Step {
            x_prev: x,
            a,
            s,
            ok,
            x: next.shallow_clone(),
        });
        x = next;
    }
    (steps, x)
}

/// The last step, through the Gram matrix of X with each row's own label
/// entry left out (X~): every quantity below is then a sum of non-negative
/// terms, and 1 - p comes without cancellation, which keeps float32
/// gradients as accurate as autograd's when X is close to one-hot.
struct LastStep {
    /// The rows' columns as an n x 1 index.
    t1: Tensor,
    /// X[i, y_i].
    xy: Tensor,
    /// X~.
    x_off: Tensor,
    /// X~ X^T.
    g_off: Tensor,
    /// s~_i = sum_j W_ij (X~ X^T)_ij.
    s_off: Tensor,
    /// q[j, i] = X[j, y_i].
    q: Tensor,
    /// W o q^T; its row sums are A[i, y_i].
    wq: Tensor,
    /// Which rows' update sums are above the smallest normal (updated; the
    /// others keep X).
    ok: Tensor,
    /// The update's row sums, 1 where they are not above it.
    safe_s: Tensor,
    /// The refined label probabilities.
    p: Tensor,
}

impl LastStep {
    fn of(x: &Tensor, w: &Tensor, targets: &Tensor) -> Self {
        let kind = x.kind();
        let t1 = targets.unsqueeze(1);
        let xy = x.gather(1, &t1, false).squeeze_dim(1);
        let x_off = x.scatter(1, &t1, &xy.zeros_like().unsqueeze(1));
        let g_off = x_off.mm(&x.transpose(0, 1));
        let s_off = (w * &g_off).sum_dim_intlist([1i64].as_slice(), false, kind);
        let q = x.index_select(1, targets);
        let wq = w * q.transpose(0, 1);
        let ay = wq.sum_dim_intlist([1i64].as_slice(), false, kind);
        let s = &s_off + &xy * &ay;
        let ok = s.gt(min_normal(s.kind()));
        let safe_s = s.where_scalarother(&ok, 1.0);
        let p = (&xy * &ay / &safe_s).where_self(&ok, &xy);
        LastStep {
            t1,
            xy,
            x_off,
            g_off,
            s_off,
            q,
            wq,
            ok,
            safe_s,
            p,
        }
    }

    /// The NLL of the label probabilities (`log(p + 1e-12)`, the release's).
    fn nll(&self) -> Tensor {
        -(&self.p + 1e-12).log().mean(self.p.kind())
    }

    /// The refined probabilities of this step from `x`.
    fn probs(&self, w: &Tensor, x: &Tensor) -> Tensor {
        let a = w.mm(x);
        let s2 = self.safe_s.unsqueeze(1);
        (x * a / s2).where_self(&self.ok.unsqueeze(1), x)
    }

    /// dX and dW of `gtg_weight` times the NLL through this step.
    fn grads(&self, w: &Tensor, targets: &Tensor, gtg_weight: f64) -> (Tensor, Tensor) {
        let (xy, p, ok, safe_s) = (&self.xy, &self.p, &self.ok, &self.safe_s);
        let kind = p.kind();
        let n = p.size()[0] as f64;
        // Gradient of the NLL w.r.t. X_T[i, y_i], then through the row
        // normalisation: dN[i, k] = b_i + [k = y_i] a_i, with
        // c_i = a_i + b_i = g_i (1 - p_i) / s_i and 1 - p_i = s~_i / s_i.
        // A label probability that is exactly 0 passes nothing.
        let gi = on_support(&((p + 1e-12).reciprocal() * (-gtg_weight / n)), p);
        let zero = gi.zeros_like();
        let a_coef = (&gi / safe_s).where_self(ok, &zero);
        let b_coef = (-&gi * p / safe_s).where_self(ok, &zero);
        // (g / s) (s~ / s): s * s would underflow for small s.
        let c_coef = (&gi / safe_s * (&self.s_off / safe_s)).where_self(ok, &zero);

        // dX[j, k] = dN[j, k] A[j, k] + sum_i W_ij dN[i, k] X[i, k], split
        // into the off-label entries (one product with X~) and the label
        // entries, where same-class pairs take c instead of a + b.
        let m = w * (b_coef.unsqueeze(1) + b_coef.unsqueeze(0));
        let mut dx = m.mm(&self.x_off);
        let same = targets.unsqueeze(1).eq_tensor(&targets.unsqueeze(0));
        let b_other = b_coef
            .unsqueeze(1)
            .where_scalarother(&same.logical_not(), 0.0);
        let label_src = w * (xy * &c_coef).unsqueeze(0) + w * xy.unsqueeze(0) * b_other;
        let _ = dx.index_add_(1, targets, &label_src);
        let own_class =
            self.wq
                .where_scalarother(&same, 0.0)
                .sum_dim_intlist([1i64].as_slice(), false, kind);
        let other_class = self
            .wq
            .where_scalarother(&same.logical_not(), 0.0)
            .sum_dim_intlist([1i64].as_slice(), false, kind);
        // A coefficient may overflow where its factor is 0 (a label
        // probability that underflowed): 0 * inf is 0 here.
        let own_term = (&c_coef * &own_class).where_self(&own_class.ne(0.0), &zero);
        let other_term = (&a_coef * &other_class).where_self(&other_class.ne(0.0), &zero);
        let diag = own_term + other_term + gi.where_self(&ok.logical_not(), &zero);
        let _ = dx.scatter_add_(1, &self.t1, &diag.unsqueeze(1));
        // dW_ij = sum_k dN[i, k] X[i, k] X[j, k]
        let dw = (&c_coef * xy).unsqueeze(1) * self.q.transpose(0, 1)
            + b_coef.unsqueeze(1) * &self.g_off;
        (dx, dw)
    }
}

/// dX0 and dW from the last step's input's `dx` and `dw`, back through the
/// kept steps. dN is kept on the support of the X it multiplies
/// ([`on_support`]): a zero entry of X stays zero, its gradient reaches
/// nothing, and carried it could overflow and meet the zero as inf * 0.
fn backward_steps(steps: &[Step], w: &Tensor, mut dx: Tensor, mut dw: Tensor) -> (Tensor, Tensor) {
    for st in steps.iter().rev() {
        let r = rowsum(&(&dx * &st.x));
        // st.s and st.ok keep their row dimension (n x 1).
        let ok2 = &st.ok;
        let dn = ((&dx - r) / &st.s.where_scalarother(ok2, 1.0)).where_scalarother(ok2, 0.0);
        let dn = on_support(&dn, &st.x_prev);
        let da = &dn * &st.x_prev;
        let pass = dx.where_scalarother(&ok2.logical_not(), 0.0);
        dw += da.mm(&st.x_prev.transpose(0, 1));
        dx = &dn * &st.a + w.mm(&da) + pass;
    }
    (dx, dw)
}
