//! The Group Loss (Elezi et al., ECCV 2020) over libtorch tensors.
//!
//! One step, as in the authors' release (`../shared/spec/group-loss.md`,
//! beside the checkout):
//!
//! 1. `W = relu(corr(emb))`, the Pearson correlation between samples;
//! 2. `X0 = softmax(logits / T)`;
//! 3. the first `A` samples of every class become anchors: one-hot rows;
//! 4. `num_iters` replicator steps `X <- X * (W X)`, rows renormalised;
//! 5. `loss = gtg_weight * NLL(log(X + 1e-12), y) + ce_weight * CE(logits, y)`.
//!
//! [`group_loss`] and `Implementation::Autograd` build it from
//! differentiable libtorch ops, so gradients reach `emb` and `logits`
//! through whatever autograd graph they carry; the other implementations
//! (`analytic.rs`, `fused_cpu.rs`, chosen by `"auto"`) record no graph and
//! return the gradients in closed form.

pub mod analytic;
pub mod anchors;
#[cfg(target_arch = "x86_64")]
mod avx_f32;
pub(crate) mod checks;
mod fused_cpu;
pub(crate) mod gemm;
mod kernels;
pub mod memory;
mod options;
pub mod refine;
pub mod similarity;
pub(crate) mod threads;
pub mod triplet;

use tch::{Kind, Tensor};

pub use anchors::{anchor_flags, anchor_mask, AnchorMode};
pub use checks::{check_inputs, check_logits_width};
pub use memory::{group_loss_with_memory, push_rows, MemoryRows};
pub use options::{GroupLossOptions, GroupLossSettings};
pub use refine::{apply_anchors, refine, replicator};
pub use similarity::{sharpen, similarity, similarity_with_power, Similarity};

use crate::error::Result;
use refine::replicator_with_support;
use similarity::cross_similarity_with_power;

/// How the loss is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implementation {
    /// Closed form: the fused CPU kernels for CPU tensors, libtorch ops
    /// elsewhere.
    Auto,
    /// Closed form by fused loops over raw buffers (CPU tensors only).
    FusedCpu,
    /// Closed form by libtorch ops, on any device.
    Libtorch,
    /// Differentiable libtorch ops: the loss carries an autograd graph (and
    /// supports double backward); no gradients are returned.
    Autograd,
}

impl Implementation {
    /// The names [`Implementation::parse`] accepts.
    pub const NAMES: [&'static str; 4] = ["auto", "fused_cpu", "libtorch", "autograd"];

    /// Parses one of [`Implementation::NAMES`].
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "auto" => Ok(Implementation::Auto),
            "fused_cpu" => Ok(Implementation::FusedCpu),
            "libtorch" => Ok(Implementation::Libtorch),
            "autograd" => Ok(Implementation::Autograd),
            other => Err(crate::error::not_one_of(
                "implementation",
                other,
                &Implementation::NAMES,
            )),
        }
    }
}

/// What a loss evaluation returns beyond the loss and its parts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Want {
    /// d loss / d embeddings and d loss / d logits in closed form (not with
    /// [`Implementation::Autograd`], whose loss carries a graph instead).
    pub grads: bool,
    /// The refined probabilities (always there with the autograd graph).
    pub probs: bool,
}

/// The loss of a batch by `implementation`, with what `want` asks for.
pub fn evaluate(
    emb: &Tensor,
    logits: &Tensor,
    labels: &Tensor,
    opts: &GroupLossOptions,
    want: Want,
    implementation: Implementation,
) -> Result<GroupLossOutput> {
    let on_cpu = emb.device() == tch::Device::Cpu;
    let (grads, probs) = (want.grads, want.probs);
    match implementation {
        Implementation::Autograd => group_loss(emb, logits, labels, opts),
        Implementation::FusedCpu => {
            fused_cpu::group_loss_with_grads(emb, logits, labels, opts, grads, probs)
        }
        Implementation::Auto if on_cpu => {
            fused_cpu::group_loss_with_grads(emb, logits, labels, opts, grads, probs)
        }
        Implementation::Auto | Implementation::Libtorch => {
            analytic::group_loss_with_grads(emb, logits, labels, opts, grads, probs)
        }
    }
}

/// [`evaluate`] of a batch joined by `memory` (see [`memory`]): an empty or
/// absent memory leaves it as it is; otherwise the loss goes through
/// libtorch ops (its gradients by autograd), whatever `implementation`
/// names, and keeps its graph with [`Implementation::Autograd`].
pub fn evaluate_with_memory(
    emb: &Tensor,
    logits: &Tensor,
    labels: &Tensor,
    memory: Option<MemoryRows<'_>>,
    opts: &GroupLossOptions,
    want: Want,
    implementation: Implementation,
) -> Result<GroupLossOutput> {
    match memory {
        Some(mem) if !mem.is_empty() => {
            let want = Want {
                grads: want.grads && implementation != Implementation::Autograd,
                ..want
            };
            group_loss_with_memory(emb, logits, labels, mem, opts, want)
        }
        _ => evaluate(emb, logits, labels, opts, want, implementation),
    }
}

/// The result of one loss evaluation.
#[derive(Debug)]
pub struct GroupLossOutput {
    /// `gtg_weight * nll + ce_weight * ce`, a 0-d tensor.
    pub loss: Tensor,
    /// The NLL of the refined probabilities (None when `gtg_weight == 0`).
    pub nll: Option<Tensor>,
    /// The cross-entropy of the raw logits (None when `ce_weight == 0`).
    pub ce: Option<Tensor>,
    /// The refined probabilities X, n x m (n x c with `batch_classes_only`,
    /// columns in the order of `classes`). None when `gtg_weight == 0` or
    /// not asked for.
    pub probs: Option<Tensor>,
    /// With `batch_classes_only`: the sorted classes the columns of `probs`
    /// stand for.
    pub classes: Option<Tensor>,
    /// d loss / d embeddings in closed form, when asked for.
    pub grad_embeddings: Option<Tensor>,
    /// d loss / d logits in closed form, when asked for.
    pub grad_logits: Option<Tensor>,
}

/// The Group Loss of a batch: `emb` (n x d), `logits` (n x m), `labels` (n,
/// integers in `[0, m)`). Half inputs are computed in float32; float64 stays
/// float64. The result lives on the inputs' device.
pub fn group_loss(
    emb: &Tensor,
    logits: &Tensor,
    labels: &Tensor,
    opts: &GroupLossOptions,
) -> Result<GroupLossOutput> {
    check_inputs(emb, logits, labels, opts)?;
    autograd_loss(emb, logits, labels, None, opts)
}

/// [`group_loss`] on checked inputs, by differentiable libtorch ops: the
/// batch alone, or joined by a checked `memory` (see [`memory`]).
pub(crate) fn autograd_loss(
    emb: &Tensor,
    logits: &Tensor,
    labels: &Tensor,
    memory: Option<MemoryRows<'_>>,
    opts: &GroupLossOptions,
) -> Result<GroupLossOutput> {
    let kind = refine::compute_kind(&[emb.kind(), logits.kind()]);
    let emb = emb.to_kind(kind);
    let logits = logits.to_kind(kind);
    let labels = labels.to_kind(Kind::Int64);

    let (nll, probs, classes) = if opts.gtg_weight != 0.0 {
        let refined = refined_probs(&emb, &logits, &labels, memory, opts)?;
        let nll = refine::log_probs(&refined.x).nll_loss(&refined.targets);
        (Some(nll), Some(refined.x), refined.classes)
    } else {
        (None, None, None)
    };
    let ce = if opts.ce_weight != 0.0 {
        Some(logits.log_softmax(1, kind).nll_loss(&labels))
    } else {
        None
    };
    Ok(GroupLossOutput {
        loss: weighted(&nll, &ce, opts),
        nll,
        ce,
        probs,
        classes,
        grad_embeddings: None,
        grad_logits: None,
    })
}

/// The refinement's result: X (n x columns), the batch's columns of X
/// (`targets`) and, with `batch_classes_only`, the classes of the columns.
struct Refined {
    x: Tensor,
    targets: Tensor,
    classes: Option<Tensor>,
}

/// Steps 1 to 4 of the module notes on a batch in the compute kind, with
/// `memory`'s rows (when given) as one-hot points outside the batch: their
/// similarities to the batch, scattered into their classes' columns, are the
/// replicator's fixed support.
fn refined_probs(
    emb: &Tensor,
    logits: &Tensor,
    labels: &Tensor,
    memory: Option<MemoryRows<'_>>,
    opts: &GroupLossOptions,
) -> Result<Refined> {
    let kind = emb.kind();
    let n = emb.size()[0];
    let w = similarity_with_power(
        emb,
        opts.similarity,
        opts.zero_diagonal,
        opts.similarity_power,
    );
    let mem_labels = memory.map(|m| m.labels.to_kind(Kind::Int64));
    let mut prior = (logits / opts.temperature).softmax(1, kind);
    let (targets, mem_targets, classes) = if opts.batch_classes_only {
        let all = match &mem_labels {
            Some(m) => Tensor::cat(&[labels, m], 0),
            None => labels.shallow_clone(),
        };
        let (classes, inverse, _) = all.internal_unique2(true, true, false);
        prior = prior.index_select(1, &classes);
        prior = &prior / prior.sum_dim_intlist([1i64].as_slice(), true, kind);
        let rest = inverse.size()[0] - n;
        let mem_targets = mem_labels.as_ref().map(|_| inverse.narrow(0, n, rest));
        (inverse.narrow(0, 0, n), mem_targets, Some(classes))
    } else {
        (labels.shallow_clone(), mem_labels, None)
    };
    // W_bm Y_m: each memory row's similarities added into its class's column.
    let support = memory.zip(mem_targets).map(|(mem, mem_targets)| {
        let mem = mem.embeddings.detach().to_kind(kind);
        let w_mem = cross_similarity_with_power(emb, &mem, opts.similarity, opts.similarity_power);
        Tensor::zeros([n, prior.size()[1]], (kind, emb.device())).index_add(1, &mem_targets, &w_mem)
    });
    let mask = anchor_mask(labels, opts.num_anchors, opts.anchors)?;
    let x = replicator_with_support(
        &apply_anchors(&prior, &targets, &mask),
        &w,
        support.as_ref(),
        opts.num_iters,
    );
    Ok(Refined {
        x,
        targets,
        classes,
    })
}

/// `gtg_weight * nll + ce_weight * ce` of the terms computed.
pub(crate) fn weighted(
    nll: &Option<Tensor>,
    ce: &Option<Tensor>,
    opts: &GroupLossOptions,
) -> Tensor {
    match (nll, ce) {
        (Some(n), Some(c)) => n * opts.gtg_weight + c * opts.ce_weight,
        (Some(n), None) => n * opts.gtg_weight,
        (None, Some(c)) => c * opts.ce_weight,
        (None, None) => unreachable!("check_inputs rejects two zero weights"),
    }
}

/// [`similarity_with_power`] after checking `emb` (2-D, floating, finite,
/// n >= 1) and `power` (finite, >= 1).
pub fn similarity_checked(
    emb: &Tensor,
    kind: Similarity,
    zero_diagonal: bool,
    power: f64,
) -> Result<Tensor> {
    checks::check_matrix(emb, "embeddings", "batch x embedding dims")?;
    checks::check_power(power)?;
    let k = refine::compute_kind(&[emb.kind()]);
    Ok(similarity_with_power(
        &emb.to_kind(k),
        kind,
        zero_diagonal,
        power,
    ))
}

/// [`anchor_mask`] after checking that `labels` are 1-D non-negative integers.
pub fn anchor_mask_checked(labels: &Tensor, num_anchors: i64, mode: AnchorMode) -> Result<Tensor> {
    checks::check_labels(labels, None, None)?;
    anchor_mask(labels, num_anchors, mode)
}

/// [`refine()`] after checking that the shapes agree: `probs` n x m, `w` n x n,
/// `labels` n in `[0, m)`, `anchor_mask` n booleans, `num_iters >= 1`.
pub fn refine_checked(
    probs: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    anchor_mask: &Tensor,
    num_iters: i64,
) -> Result<Tensor> {
    use crate::error::{at_least, ensure};
    checks::check_matrix(probs, "probs", "batch x classes")?;
    let (n, m) = (probs.size()[0], probs.size()[1]);
    checks::check_matrix(w, "w", "batch x batch")?;
    ensure(
        w.size() == [n, n],
        "w",
        || format!("shape {}", checks::shape(w)),
        format!("shape [{n}, {n}] (batch x batch)"),
    )?;
    checks::check_labels(labels, Some(n), Some(m))?;
    ensure(
        anchor_mask.kind() == Kind::Bool && anchor_mask.size() == [n],
        "anchor_mask",
        || {
            format!(
                "dtype {:?}, shape {}",
                anchor_mask.kind(),
                checks::shape(anchor_mask)
            )
        },
        format!("a bool tensor of shape [{n}]"),
    )?;
    at_least("num_iters", num_iters, 1)?;
    let others = [("w", w), ("labels", labels), ("anchor_mask", anchor_mask)];
    checks::check_same_device("probs", probs, &others)?;
    let k = refine::compute_kind(&[probs.kind(), w.kind()]);
    Ok(refine(
        &probs.to_kind(k),
        &w.to_kind(k),
        &labels.to_kind(Kind::Int64),
        anchor_mask,
        num_iters,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Gradients and probabilities.
    const ALL: Want = Want {
        grads: true,
        probs: true,
    };

    fn golden() -> (Tensor, Tensor, Tensor) {
        let o = (Kind::Double, Device::Cpu);
        let emb = Tensor::from_slice(&[
            0.9, 0.1, 0.4, 0.7, 0.2, 0.8, 0.3, 0.5, 0.6, 0.1, 0.1, 0.9, 0.2, 0.3, 0.8, 0.2, 0.7,
            0.1, 0.4, 0.9,
        ])
        .reshape([4, 5])
        .to_kind(o.0);
        let logits =
            Tensor::from_slice(&[2.0, 1.0, 0.0, 1.0, 2.0, 0.5, 0.0, 1.0, 3.0, 0.5, 0.2, 0.1])
                .reshape([4, 3]);
        let y = Tensor::from_slice(&[0i64, 0, 1, 1]);
        (emb, logits, y)
    }

    fn opts(iters: i64) -> GroupLossOptions {
        GroupLossOptions {
            temperature: 2.0,
            num_anchors: 1,
            num_iters: iters,
            ..Default::default()
        }
    }

    fn close(t: &Tensor, expected: &[f64], tol: f64) {
        let got = Vec::<f64>::try_from(&t.flatten(0, -1)).unwrap();
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() <= tol, "got {got:?}, expected {expected:?}");
        }
    }

    #[test]
    fn golden_vector_of_the_spec() {
        let (emb, logits, y) = golden();
        let w = similarity(&emb, Similarity::Correlation, false);
        #[rustfmt::skip]
        close(&w, &[1.0, 0.913855, 0.0, 0.0, 0.913855, 1.0, 0.0, 0.0,
                    0.0, 0.0, 1.0, 0.921751, 0.0, 0.0, 0.921751, 1.0], 1e-6);
        let out = group_loss(&emb, &logits, &y, &opts(1)).unwrap();
        #[rustfmt::skip]
        close(out.probs.as_ref().unwrap(), &[1.0, 0.0, 0.0, 0.554140, 0.364524, 0.081336,
                                             0.0, 1.0, 0.0, 0.220415, 0.631836, 0.147749], 1e-6);
        close(out.nll.as_ref().unwrap(), &[0.2623659], 1e-6);
        close(out.ce.as_ref().unwrap(), &[1.3054799], 1e-6);
        close(&out.loss, &[1.5678459], 1e-6);
        let three = group_loss(&emb, &logits, &y, &opts(3)).unwrap();
        close(three.nll.as_ref().unwrap(), &[0.0035789], 1e-6);
    }

    #[test]
    fn gradients_reach_both_inputs() {
        let (emb, logits, y) = golden();
        let emb = emb.set_requires_grad(true);
        let logits = logits.set_requires_grad(true);
        let out = group_loss(&emb, &logits, &y, &opts(2)).unwrap();
        out.loss.backward();
        for g in [emb.grad(), logits.grad()] {
            assert!(g.defined());
            assert!(bool::try_from(g.isfinite().all()).unwrap());
            assert!(f64::try_from(g.abs().sum(Kind::Double)).unwrap() > 0.0);
        }
    }

    #[test]
    fn constant_rows_do_not_give_nan() {
        let (_, logits, y) = golden();
        let emb = Tensor::from_slice(&[0.3f64; 20])
            .reshape([4, 5])
            .set_requires_grad(true);
        let out = group_loss(&emb, &logits, &y, &opts(1)).unwrap();
        out.loss.backward();
        assert!(bool::try_from(out.loss.isfinite()).unwrap());
        assert!(bool::try_from(emb.grad().isfinite().all()).unwrap());
    }

    #[test]
    fn batch_classes_only_renormalises_the_present_columns() {
        let (emb, logits, _) = golden();
        let y = Tensor::from_slice(&[2i64, 2, 0, 0]);
        let o = GroupLossOptions {
            batch_classes_only: true,
            num_anchors: 0,
            ..opts(1)
        };
        let out = group_loss(&emb, &logits, &y, &o).unwrap();
        let x = out.probs.unwrap();
        assert_eq!(x.size(), vec![4, 2]);
        close(
            &out.classes.unwrap().to_kind(Kind::Double),
            &[0.0, 2.0],
            0.0,
        );
        // The prior renormalised over the present columns is the softmax of
        // those columns' logits: refining it gives the same X.
        let columns = Tensor::from_slice(&[0i64, 2]);
        let restricted = GroupLossOptions {
            batch_classes_only: false,
            ..o
        };
        let by_hand = group_loss(
            &emb,
            &logits.index_select(1, &columns),
            &Tensor::from_slice(&[1i64, 1, 0, 0]),
            &restricted,
        )
        .unwrap();
        let want = Vec::<f64>::try_from(by_hand.probs.unwrap().reshape([-1])).unwrap();
        close(&x.reshape([-1]), &want, 1e-12);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let (emb, logits, y) = golden();
        let e = group_loss(&emb.view([-1]), &logits, &y, &opts(1)).unwrap_err();
        assert!(e.to_string().starts_with("embeddings:"), "{e}");
        let bad = Tensor::from_slice(&[0i64, 0, 1, 5]);
        let e = group_loss(&emb, &logits, &bad, &opts(1)).unwrap_err();
        assert!(e.to_string().contains("labels"), "{e}");
    }

    fn random_batch(p: i64, k: i64, m: i64, d: i64, seed: i64) -> (Tensor, Tensor, Tensor) {
        tch::manual_seed(seed);
        let o = (Kind::Double, Device::Cpu);
        let labels = Tensor::randperm(m, (Kind::Int64, Device::Cpu))
            .narrow(0, 0, p)
            .repeat_interleave_self_int(k, 0, None);
        let labels = labels.index_select(0, &Tensor::randperm(p * k, (Kind::Int64, Device::Cpu)));
        let centres = Tensor::randn([m, d], o);
        let emb = centres.index_select(0, &labels) + Tensor::randn([p * k, d], o) * 0.8;
        let logits = Tensor::randn([p * k, m], o) * 2.0;
        (emb, logits, labels)
    }

    fn autograd_grads(
        emb: &Tensor,
        logits: &Tensor,
        y: &Tensor,
        o: &GroupLossOptions,
    ) -> (f64, Tensor, Tensor) {
        let e = emb.detach().set_requires_grad(true);
        let l = logits.detach().set_requires_grad(true);
        let out = group_loss(&e, &l, y, o).unwrap();
        out.loss.backward();
        (f64::try_from(&out.loss).unwrap(), e.grad(), l.grad())
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        let scale = f64::try_from(b.abs().max()).unwrap().max(1e-3);
        f64::try_from((a - b).abs().max()).unwrap() / scale
    }

    /// Sharpness of W in the gradient tests: the release's, an integer and a
    /// fractional power.
    const POWERS: [f64; 3] = [1.0, 2.0, 4.5];

    /// The options of one case of the tests' grid (temperature, zero
    /// diagonal, batch classes only; the weights); the similarity and power
    /// cycle with `case`.
    fn grid_options(
        case: i64,
        iters: i64,
        anchors: i64,
        (t, zero_diagonal, batch_classes_only): (f64, bool, bool),
        (gtg_weight, ce_weight): (f64, f64),
    ) -> GroupLossOptions {
        GroupLossOptions {
            temperature: t,
            num_anchors: anchors,
            num_iters: iters,
            zero_diagonal,
            batch_classes_only,
            similarity: SIMS[case as usize % 3],
            similarity_power: POWERS[(case as usize / 3) % 3],
            gtg_weight,
            ce_weight,
            ..Default::default()
        }
    }

    /// Every similarity (the gaussian at a bandwidth that keeps W spread).
    const SIMS: [Similarity; 3] = [
        Similarity::Correlation,
        Similarity::Cosine,
        Similarity::Gaussian { sigma: 3.0 },
    ];

    #[test]
    fn sharpened_w_is_w_to_the_power_entrywise() {
        let (emb, _, _) = random_batch(3, 4, 7, 6, 5);
        for kind in [
            Similarity::Correlation,
            Similarity::Cosine,
            Similarity::Gaussian { sigma: 2.0 },
        ] {
            for zero_diag in [false, true] {
                let w = Vec::<f64>::try_from(&similarity(&emb, kind, zero_diag).flatten(0, -1))
                    .unwrap();
                for p in POWERS {
                    let sharp = similarity_with_power(&emb, kind, zero_diag, p);
                    let expected: Vec<f64> = w.iter().map(|v| v.powf(p)).collect();
                    close(&sharp, &expected, 1e-12);
                }
            }
        }
        let e = similarity_checked(&emb, Similarity::Cosine, false, 0.5).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("similarity_power: expected a finite number >= 1"),
            "{e}"
        );
        let (_, logits, y) = golden();
        let o = GroupLossOptions {
            similarity_power: f64::NAN,
            ..opts(1)
        };
        let e = group_loss(&golden().0, &logits, &y, &o).unwrap_err();
        assert!(e.to_string().starts_with("similarity_power:"), "{e}");
    }

    #[test]
    fn power_one_keeps_the_golden_vector() {
        let (emb, logits, y) = golden();
        let o = GroupLossOptions {
            similarity_power: 1.0,
            ..opts(1)
        };
        for imp in [Implementation::Libtorch, Implementation::FusedCpu] {
            let out = evaluate(&emb, &logits, &y, &o, Want::default(), imp).unwrap();
            close(&out.loss, &[1.5678459], 1e-6);
        }
    }

    #[test]
    fn analytic_gradients_equal_autograd() {
        let mut case = 0;
        for iters in 1..=3 {
            for anchors in 0..=3 {
                for (t, zero_diag, restrict) in [
                    (1.0, false, false),
                    (24.0, true, false),
                    (79.0, false, true),
                ] {
                    case += 1;
                    let (emb, logits, y) = random_batch(4, 5, 11, 8, case);
                    let o =
                        grid_options(case, iters, anchors, (t, zero_diag, restrict), (0.7, 1.3));
                    let (loss, ge, gl) = autograd_grads(&emb, &logits, &y, &o);
                    let out =
                        evaluate(&emb, &logits, &y, &o, ALL, Implementation::Libtorch).unwrap();
                    let l2 = f64::try_from(&out.loss).unwrap();
                    assert!(
                        (loss - l2).abs() < 1e-12 * loss.abs().max(1.0),
                        "{o:?}: {loss} vs {l2}"
                    );
                    let de = max_rel_diff(out.grad_embeddings.as_ref().unwrap(), &ge);
                    let dl = max_rel_diff(out.grad_logits.as_ref().unwrap(), &gl);
                    assert!(de < 1e-10 && dl < 1e-10, "{o:?}: emb {de}, logits {dl}");
                    let probs = group_loss(&emb, &logits, &y, &o).unwrap().probs.unwrap();
                    assert!(max_rel_diff(out.probs.as_ref().unwrap(), &probs) < 1e-12);
                }
            }
        }
    }

    /// A lone class-2 anchor among rows whose prior gives class 2 about
    /// exp(-3900 / 80) ~ 7e-22: in float32 the gradient of the zeros of its
    /// one-hot row overflows (1e43) and, carried, met them as inf * 0. Every
    /// implementation in float32 against autograd in float64.
    #[test]
    fn a_class_almost_absent_around_its_anchor_keeps_float32_gradients() {
        // Fixed values (the generator is shared by the tests' threads).
        let emb: Vec<f64> = (0..9)
            .flat_map(|i| (0..8).map(move |j| (i, j)))
            .map(|(i, j)| {
                let (i, j) = (f64::from(i), f64::from(j));
                (0.7 * i + 0.37 * j * j + i * j).sin()
            })
            .collect();
        let emb = Tensor::from_slice(&emb).reshape([9, 8]);
        let logits: Vec<f64> = (0..9)
            .flat_map(|i| (0..3).map(move |k| (i, k)))
            .map(|(i, k)| {
                if k == 2 {
                    -3900.0
                } else {
                    (1.9 * f64::from(i) + 2.9 * f64::from(k)).cos()
                }
            })
            .collect();
        let logits = Tensor::from_slice(&logits).reshape([9, 3]);
        let y = Tensor::from_slice(&[0i64, 0, 0, 0, 1, 1, 1, 1, 2]);
        let o = GroupLossOptions {
            temperature: 80.0,
            num_anchors: 1,
            num_iters: 3,
            zero_diagonal: true,
            ..GroupLossOptions::default()
        };
        let (_, ge, gl) = autograd_grads(&emb, &logits, &y, &o);
        let (emb32, logits32) = (emb.to_kind(Kind::Float), logits.to_kind(Kind::Float));
        let (_, ae, al) = autograd_grads(&emb32, &logits32, &y, &o);
        let mut grads = vec![("autograd", ae, al)];
        for (name, imp) in [
            ("libtorch", Implementation::Libtorch),
            ("fused_cpu", Implementation::FusedCpu),
        ] {
            let out = evaluate(&emb32, &logits32, &y, &o, ALL, imp).unwrap();
            grads.push((name, out.grad_embeddings.unwrap(), out.grad_logits.unwrap()));
        }
        for (name, e, l) in grads {
            let de = max_rel_diff(&e.to_kind(Kind::Double), &ge);
            let dl = max_rel_diff(&l.to_kind(Kind::Double), &gl);
            assert!(de < 1e-4 && dl < 1e-4, "{name}: emb {de}, logits {dl}");
        }
    }

    /// The fused path against the libtorch path computed in float64 from
    /// the same inputs (a float32 libtorch path would add rounding whose
    /// bits depend on the CPU's kernels). float32's tolerance grows with
    /// the temperature: the logits' gradient is O(1/T), its rounding O(eps).
    #[test]
    fn fused_cpu_equals_libtorch() {
        let mut case = 100;
        for kind in [Kind::Double, Kind::Float] {
            let tol_at = |t: f64| {
                if kind == Kind::Double {
                    1e-10
                } else {
                    f64::max(2e-5, 16.0 * f64::from(f32::EPSILON) * t)
                }
            };
            for iters in 1..=3 {
                for anchors in 0..=3 {
                    for (t, zero_diag, restrict, gw, cw) in [
                        (1.0, false, false, 1.0, 1.0),
                        (24.0, true, false, 0.7, 0.0),
                        (79.0, false, true, 1.0, 1.3),
                        (10.0, false, false, 0.0, 1.0),
                    ] {
                        case += 1;
                        let tol = tol_at(t);
                        let (emb, logits, y) = random_batch(4, 5, 11, 8, case);
                        let (emb, logits) = (emb.to_kind(kind), logits.to_kind(kind));
                        let (emb64, logits64) =
                            (emb.to_kind(Kind::Double), logits.to_kind(Kind::Double));
                        let o =
                            grid_options(case, iters, anchors, (t, zero_diag, restrict), (gw, cw));
                        let a = evaluate(&emb64, &logits64, &y, &o, ALL, Implementation::Libtorch)
                            .unwrap();
                        let b =
                            evaluate(&emb, &logits, &y, &o, ALL, Implementation::FusedCpu).unwrap();
                        assert_eq!(b.loss.kind(), kind);
                        let pairs = [
                            (Some(&a.loss), Some(&b.loss)),
                            (a.grad_embeddings.as_ref(), b.grad_embeddings.as_ref()),
                            (a.grad_logits.as_ref(), b.grad_logits.as_ref()),
                            (a.probs.as_ref(), b.probs.as_ref()),
                            (a.nll.as_ref(), b.nll.as_ref()),
                            (a.ce.as_ref(), b.ce.as_ref()),
                        ];
                        for (k, (x, z)) in pairs.into_iter().enumerate() {
                            match (x, z) {
                                (Some(x), Some(z)) => {
                                    let d = max_rel_diff(
                                        &z.to_kind(Kind::Double),
                                        &x.to_kind(Kind::Double),
                                    );
                                    assert!(d < tol, "{o:?} {kind:?} part {k}: {d}");
                                }
                                (None, None) => {}
                                _ => panic!("{o:?} part {k}: one side missing"),
                            }
                        }
                    }
                }
            }
        }
    }
}
