//! The triplet margin loss with batch-hard mining, exactly as
//! pytorch-metric-learning 2.9.0 computes
//! `losses.TripletMarginLoss(margin=m)(emb, labels, miners.BatchHardMiner()(emb, labels))`
//! with both objects' defaults: `LpDistance(normalize_embeddings=True, p=2,
//! power=1)`, `AvgNonZeroReducer`, `swap=False`, `smooth_loss=False`.
//!
//! PML's definitions, step by step (file names under `pytorch_metric_learning/`):
//!
//! 1. **Distance** (`distances/base_distance.py`, `forward`; `lp_distance.py`,
//!    `compute_mat`): query and reference (both the batch) are normalised
//!    *separately*, `F.normalize(x, p=2, dim=1)`, i.e.
//!    `x / x.norm(2, 1, keepdim=True).clamp_min(1e-12).expand_as(x)`, then
//!    `D = torch.cdist(q, r, p=2)` with the default compute mode (for more
//!    than 25 rows libtorch takes the matmul form
//!    `sqrt(clamp_min(|q|^2 + |r|^2 - 2 q.r, 0))`, else the direct one).
//!    Both normalisations carry gradients back to the embeddings.
//! 2. **Mining** (`miners/batch_easy_hard_miner.py`, under `torch.no_grad`):
//!    positives of anchor i are the j != i with `y_j == y_i`
//!    (`lmu.get_matches_and_diffs` zeroes the diagonal), negatives the j with
//!    `y_j != y_i`. `get_x_per_row` sets every other entry of a copy of D to
//!    `finfo.min` (for the max) or `finfo.max` (for the min) and takes
//!    `torch.max(D, dim=1)` for the hardest positive and `torch.min(D, dim=1)`
//!    for the hardest negative (`get_negatives` picks the "easy" function,
//!    min, for the HARD strategy); ties go to libtorch's reduction index
//!    (the first). Anchors with no positive or no negative are dropped
//!    (`torch.where(a1p_keep & a2n_keep)`), anchors stay in increasing order.
//! 3. **Loss** (`losses/triplet_margin_loss.py`): D is computed again, with
//!    gradients; `relu(D[a, p] - D[a, n] + margin)` per triplet.
//! 4. **Reduction** (`reducers/threshold_reducer.py`, `low=0`): the mean of
//!    the triplet losses that are `> 0`. With no anchor left, or no triplet
//!    loss above 0, the result is `torch.sum(embeddings * 0)`
//!    (`base_reducer.py`, `zero_loss`): 0, with a zero gradient.
//!
//! Every step is the same libtorch op PML calls, on the same values, so the
//! loss and its autograd gradients agree with PML's to the last bit on the
//! same device and thread count. In particular a distance of exactly 0
//! (duplicate embeddings) passes no gradient (libtorch's cdist backward
//! masks it), while a near-0 one from the matmul form passes a large one,
//! as in PML.
//!
//! The data-dependent selections (the anchors kept, the losses above 0) read
//! back sizes, so on CUDA the function synchronises, like PML does.

use tch::{Kind, Tensor};

use super::checks::{check_dtype, check_finite, check_labels_shape, check_matrix_shape};
use crate::error::{ensure, Result};

/// The anchors, hardest positives and hardest negatives of PML's
/// `BatchHardMiner` for the distance matrix `dist` (n x n, no gradient
/// needed) and `labels` (n, on the same device), each an int64 vector.
pub fn batch_hard_triplets(dist: &Tensor, labels: &Tensor) -> (Tensor, Tensor, Tensor) {
    tch::no_grad(|| {
        let n = dist.size()[0];
        let device = dist.device();
        let same = labels.unsqueeze(1).eq_tensor(&labels.unsqueeze(0));
        let eye = Tensor::eye(n, (Kind::Bool, device));
        let is_pos = same.logical_and(&eye.logical_not());
        let is_neg = same.logical_not();
        let (lowest, highest) = match dist.kind() {
            Kind::Double => (f64::MIN, f64::MAX),
            _ => (f64::from(f32::MIN), f64::from(f32::MAX)),
        };
        let (_, pos_idx) = dist
            .masked_fill(&is_pos.logical_not(), lowest)
            .max_dim(1, false);
        let (_, neg_idx) = dist
            .masked_fill(&is_neg.logical_not(), highest)
            .min_dim(1, false);
        let keep = is_pos
            .any_dim(1, false)
            .logical_and(&is_neg.any_dim(1, false));
        let anchors = keep.nonzero().squeeze_dim(1);
        let positives = pos_idx.index_select(0, &anchors);
        let negatives = neg_idx.index_select(0, &anchors);
        (anchors, positives, negatives)
    })
}

/// PML's `LpDistance()` matrix of the batch against itself: the rows
/// normalised (twice, as query and as reference) and `torch.cdist(p=2)`.
pub fn lp_distance(embeddings: &Tensor) -> Tensor {
    let normalize = |x: &Tensor| {
        let norm = x
            .linalg_norm(2.0, [1i64].as_slice(), true, None)
            .clamp_min(1e-12)
            .expand_as(x);
        x / norm
    };
    let query = normalize(embeddings);
    let reference = normalize(embeddings);
    Tensor::cdist(&query, &reference, 2.0, None)
}

/// The triplet margin loss of a batch over PML's batch-hard triplets (see
/// the module documentation for the exact definition):
///
/// `mean { l_i : l_i > 0 }`, `l_i = relu(D[i, P(i)] - D[i, N(i)] + margin)`
/// over the anchors i that have a positive and a negative, `P(i)` the
/// farthest same-label sample, `N(i)` the nearest other-label one, `D` the
/// Euclidean distance of the L2-normalised embeddings; 0 (with zero
/// gradient) when no `l_i` is positive.
///
/// `embeddings`: n x d, float32 or float64, finite, n >= 1; `labels`: n
/// integers (any values; moved to the embeddings' device, as PML does);
/// `margin`: finite, >= 0. The result is a 0-d tensor of the embeddings'
/// dtype and device, differentiable by autograd.
pub fn triplet_margin_batch_hard(
    embeddings: &Tensor,
    labels: &Tensor,
    margin: f64,
) -> Result<Tensor> {
    check_triplet_inputs(embeddings, labels, margin)?;
    let labels = labels.to_device(embeddings.device());
    let dist = lp_distance(embeddings);
    let (anchors, positives, negatives) = batch_hard_triplets(&dist.detach(), &labels);
    let zero = || (embeddings * 0.0).sum(None::<Kind>);
    if anchors.numel() == 0 {
        return Ok(zero());
    }
    let ap = dist.index(&[Some(&anchors), Some(&positives)]);
    let an = dist.index(&[Some(&anchors), Some(&negatives)]);
    let losses = ((ap - an) + margin).relu();
    let above = losses.masked_select(&losses.gt(0.0));
    if above.numel() == 0 {
        return Ok(zero());
    }
    Ok(above.mean(None::<Kind>))
}

fn check_triplet_inputs(embeddings: &Tensor, labels: &Tensor, margin: f64) -> Result<()> {
    crate::error::non_negative("margin", margin)?;
    check_matrix_shape(embeddings, "embeddings", "batch x embedding dims")?;
    check_dtype(
        embeddings,
        "embeddings",
        |k| matches!(k, Kind::Float | Kind::Double),
        "float32 or float64",
    )?;
    let n = embeddings.size()[0];
    ensure(
        n >= 1,
        "embeddings",
        || format!("{n} samples"),
        "a batch of at least 1 sample",
    )?;
    check_labels_shape(labels, Some(n))?;
    check_finite(embeddings, "embeddings")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The loss from its definition: plain loops in f64.
    fn brute_force(emb: &[Vec<f64>], labels: &[i64], margin: f64) -> f64 {
        let unit: Vec<Vec<f64>> = emb
            .iter()
            .map(|r| {
                let norm = r.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
                r.iter().map(|v| v / norm).collect()
            })
            .collect();
        let d = |i: usize, j: usize| {
            unit[i]
                .iter()
                .zip(&unit[j])
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt()
        };
        let n = emb.len();
        let mut losses = Vec::new();
        for i in 0..n {
            let mut hardest_pos: Option<f64> = None;
            let mut hardest_neg: Option<f64> = None;
            for j in 0..n {
                if j != i && labels[j] == labels[i] {
                    hardest_pos = Some(hardest_pos.map_or(d(i, j), |p| p.max(d(i, j))));
                }
                if labels[j] != labels[i] {
                    hardest_neg = Some(hardest_neg.map_or(d(i, j), |q| q.min(d(i, j))));
                }
            }
            if let (Some(p), Some(q)) = (hardest_pos, hardest_neg) {
                let l = (p - q + margin).max(0.0);
                if l > 0.0 {
                    losses.push(l);
                }
            }
        }
        if losses.is_empty() {
            0.0
        } else {
            losses.iter().sum::<f64>() / losses.len() as f64
        }
    }

    fn to_rows(t: &Tensor) -> Vec<Vec<f64>> {
        let d = t.size()[1] as usize;
        let flat = Vec::<f64>::try_from(&t.flatten(0, -1)).unwrap();
        flat.chunks(d).map(<[f64]>::to_vec).collect()
    }

    fn batch(n: i64, d: i64, classes: i64, seed: i64) -> (Tensor, Tensor) {
        tch::manual_seed(seed);
        let emb = Tensor::randn([n, d], (Kind::Double, Device::Cpu)) * 3.0;
        let labels = Tensor::randint(classes, [n], (Kind::Int64, Device::Cpu));
        (emb, labels)
    }

    #[test]
    fn equals_the_triple_loop() {
        // 12 rows: cdist's direct form; 60 rows: its matmul form.
        for (case, (n, d, classes, margin)) in [
            (12, 5, 3, 0.1),
            (12, 3, 5, 0.5),
            (60, 16, 20, 0.1),
            (60, 8, 6, 1.0),
        ]
        .into_iter()
        .enumerate()
        {
            let (emb, labels) = batch(n, d, classes, case as i64);
            let got = triplet_margin_batch_hard(&emb, &labels, margin).unwrap();
            assert_eq!(got.kind(), Kind::Double);
            assert_eq!(got.dim(), 0);
            let got = f64::try_from(&got).unwrap();
            let want = brute_force(
                &to_rows(&emb),
                &Vec::<i64>::try_from(&labels).unwrap(),
                margin,
            );
            assert!(want > 0.0, "case {case}");
            assert!(
                (got - want).abs() <= 1e-10 * want,
                "case {case}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn gradients_reach_the_embeddings() {
        let (emb, labels) = batch(30, 6, 5, 7);
        let emb = emb.to_kind(Kind::Float).set_requires_grad(true);
        let loss = triplet_margin_batch_hard(&emb, &labels, 0.2).unwrap();
        assert_eq!(loss.kind(), Kind::Float);
        loss.backward();
        let g = emb.grad();
        assert!(bool::try_from(g.isfinite().all()).unwrap());
        assert!(f64::try_from(g.abs().sum(Kind::Double)).unwrap() > 0.0);
    }

    #[test]
    fn no_valid_anchor_gives_zero_with_zero_gradient() {
        // Every label distinct: no positives. One label: no negatives.
        let (emb, _) = batch(6, 4, 1, 3);
        for labels in [
            Tensor::arange(6, (Kind::Int64, Device::Cpu)),
            Tensor::zeros([6], (Kind::Int64, Device::Cpu)),
        ] {
            let e = emb.detach().set_requires_grad(true);
            let loss = triplet_margin_batch_hard(&e, &labels, 0.1).unwrap();
            assert_eq!(f64::try_from(&loss).unwrap(), 0.0);
            loss.backward();
            assert_eq!(f64::try_from(e.grad().abs().max()).unwrap(), 0.0);
        }
        let one = Tensor::ones([1, 3], (Kind::Double, Device::Cpu));
        let loss = triplet_margin_batch_hard(&one, &Tensor::from_slice(&[4i64]), 0.1).unwrap();
        assert_eq!(f64::try_from(&loss).unwrap(), 0.0);
    }

    #[test]
    fn all_triplets_satisfied_gives_zero_with_zero_gradient() {
        // Two tight clusters at right angles: positives ~0.01 apart,
        // negatives ~1.41, far beyond a margin of 0.5.
        let emb = Tensor::from_slice(&[
            1.0, 0.0, 1.0, 0.01, 0.99, 0.0, 0.0, 1.0, 0.01, 1.0, 0.0, 0.99,
        ])
        .reshape([6, 2])
        .set_requires_grad(true);
        let labels = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1]);
        let loss = triplet_margin_batch_hard(&emb, &labels, 0.5).unwrap();
        assert_eq!(f64::try_from(&loss).unwrap(), 0.0);
        loss.backward();
        assert_eq!(f64::try_from(emb.grad().abs().max()).unwrap(), 0.0);
        // A margin beyond the gap makes them count again.
        let loss = triplet_margin_batch_hard(&emb, &labels, 2.0).unwrap();
        assert!(f64::try_from(&loss).unwrap() > 0.5);
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_argument() {
        let (emb, labels) = batch(6, 4, 2, 1);
        let cases = [
            triplet_margin_batch_hard(&emb.view([-1]), &labels, 0.1),
            triplet_margin_batch_hard(&emb.to_kind(Kind::Half), &labels, 0.1),
            triplet_margin_batch_hard(&emb.narrow(0, 0, 0), &labels.narrow(0, 0, 0), 0.1),
            triplet_margin_batch_hard(&emb, &labels.narrow(0, 0, 5), 0.1),
            triplet_margin_batch_hard(&emb, &labels.to_kind(Kind::Float), 0.1),
            triplet_margin_batch_hard(&emb, &labels, -0.1),
            triplet_margin_batch_hard(&emb, &labels, f64::NAN),
            triplet_margin_batch_hard(&(&emb / 0.0), &labels, 0.1),
        ];
        let names = [
            "embeddings",
            "embeddings",
            "embeddings",
            "labels",
            "labels",
            "margin",
            "margin",
            "embeddings",
        ];
        for (r, name) in cases.into_iter().zip(names) {
            let e = r.unwrap_err().to_string();
            assert!(e.starts_with(&format!("{name}: expected")), "{e}");
        }
    }
}
