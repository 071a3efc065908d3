//! k-means over libtorch tensors (CPU or CUDA): greedy k-means++ seeding,
//! Lloyd iterations, the best of `n_init` runs by inertia.
//!
//! The algorithm is scikit-learn's `KMeans(init="k-means++",
//! algorithm="lloyd")`, so that results compare: seeding draws
//! `2 + floor(ln k)` candidates per centre with probability proportional to
//! the squared distance to the nearest centre so far and keeps the one that
//! lowers the potential most; Lloyd stops when the assignments repeat or the
//! centres move by at most `tol` times the mean per-feature variance (squared
//! Frobenius norm of the shift); an empty cluster takes the point farthest
//! from its centre. Randomness comes from [`crate::rng`] (run r of `n_init`
//! uses the stream `derive_seed(seed, [r])`), so results are fixed by the seed
//! up to floating-point rounding of the device. Distances go in row blocks:
//! memory is O(batch_size x k + n x d).

use tch::{Kind, Tensor};

use super::input::{block_rows, check_batch_size, check_embeddings, check_k, host_vec, prepare};
use super::knn::topk_ordered;
use crate::error::{at_least, ensure, Error, Result};
use crate::rng::Rng;

/// Options of [`kmeans_with`].
#[derive(Clone, Debug, PartialEq)]
pub struct KMeansOptions {
    /// Runs from different seedings; the lowest inertia wins.
    pub n_init: usize,
    /// Lloyd iterations per run at most.
    pub max_iter: usize,
    /// Convergence threshold relative to the mean per-feature variance.
    pub tol: f64,
    /// Seed of the seedings.
    pub seed: u64,
    /// Rows per block of distances; `None` keeps a block near 128 MiB.
    pub batch_size: Option<i64>,
}

impl Default for KMeansOptions {
    /// scikit-learn's defaults: one k-means++ run, 300 iterations, tol 1e-4.
    fn default() -> Self {
        KMeansOptions {
            n_init: 1,
            max_iter: 300,
            tol: 1e-4,
            seed: 0,
            batch_size: None,
        }
    }
}

/// A clustering.
#[derive(Debug)]
pub struct KMeans {
    /// Cluster of every sample, int64 (n,), on the input's device.
    pub assignments: Tensor,
    /// Centres (k x d), float32 or float64, on the input's device.
    pub centroids: Tensor,
    /// Sum of squared distances of the samples to their centres.
    pub inertia: f64,
    /// Lloyd iterations of the winning run.
    pub n_iter: usize,
}

/// k-means of the rows of `x` into `k` clusters with default options but
/// `n_init`, `max_iter` and `seed`.
pub fn kmeans(x: &Tensor, k: i64, n_init: usize, max_iter: usize, seed: u64) -> Result<KMeans> {
    kmeans_with(
        x,
        k,
        &KMeansOptions {
            n_init,
            max_iter,
            seed,
            ..Default::default()
        },
    )
}

/// k-means of the rows of `x` (n x d, floating, finite) into `k` clusters,
/// `1 <= k <= n`. float64 is computed as float64, other dtypes as float32.
pub fn kmeans_with(x: &Tensor, k: i64, opts: &KMeansOptions) -> Result<KMeans> {
    let _guard = tch::no_grad_guard();
    check_embeddings(x, "x", 1)?;
    let n = x.size()[0];
    check_k(k, n, "the number of samples")?;
    at_least("n_init", opts.n_init, 1)?;
    at_least("max_iter", opts.max_iter, 1)?;
    ensure(
        opts.tol.is_finite() && opts.tol >= 0.0,
        "tol",
        || opts.tol.to_string(),
        "a finite number >= 0",
    )?;
    check_batch_size(opts.batch_size)?;
    let x = prepare(x, false);
    let sq = x.square().sum_dim_intlist(1, false, x.kind());
    let variance = x
        .var_dim([0i64].as_slice(), false, false)
        .mean(Kind::Double);
    let tol = opts.tol * f64::try_from(variance)?;
    let rows = block_rows(opts.batch_size, k, x.kind());
    let mut best: Option<KMeans> = None;
    for run in 0..opts.n_init {
        let mut rng = Rng::derived(opts.seed, &[run as u64]);
        let centres = seed_plus_plus(&x, &sq, k, &mut rng)?;
        let out = lloyd(&x, &sq, centres, opts.max_iter, tol, rows)?;
        if best.as_ref().is_none_or(|b| out.inertia < b.inertia) {
            best = Some(out);
        }
    }
    best.ok_or_else(|| Error::invalid("n_init", 0, "an integer >= 1"))
}

/// Squared distances (n x c) of the rows of `x` (squared norms `sq`) to the
/// rows of `c`, clamped at 0 against cancellation: one matrix product into
/// the broadcast norms and two in-place passes.
fn sq_dist(x: &Tensor, sq: &Tensor, c: &Tensor) -> Tensor {
    let csq = c.square().sum_dim_intlist(1, false, c.kind());
    let mut d = sq.unsqueeze(1).addmm(x, &(c * -2.0).tr());
    let _ = d.g_add_(&csq.unsqueeze(0));
    let _ = d.clamp_min_(0.0);
    d
}

/// Greedy k-means++ (Arthur and Vassilvitskii 2007, with scikit-learn's
/// local trials). Everything stays on the device: the host only draws the
/// uniform numbers. As in scikit-learn, distances are in the data's dtype and
/// their running sums in float64.
fn seed_plus_plus(x: &Tensor, sq: &Tensor, k: i64, rng: &mut Rng) -> Result<Tensor> {
    let (n, d) = (x.size()[0], x.size()[1]);
    let device = x.device();
    let trials = 2 + (k as f64).ln().floor() as usize;
    let centres = Tensor::zeros([k, d], (x.kind(), device));
    let first = rng.below(n as u64) as i64;
    centres.narrow(0, 0, 1).copy_(&x.narrow(0, first, 1));
    let mut closest = sq_dist(x, sq, &x.narrow(0, first, 1)).squeeze_dim(1);
    for c in 1..k {
        let u: Vec<f64> = (0..trials).map(|_| rng.next_f64()).collect();
        let cum = closest.cumsum(0, Kind::Double);
        let potential = cum.narrow(0, n - 1, 1);
        let targets = Tensor::from_slice(&u).to_device(device) * &potential;
        let ids = targets
            .f_searchsorted(&cum, false, false, "left", None::<Tensor>)?
            .clamp_max(n - 1);
        let candidates = x.index_select(0, &ids);
        let dist = sq_dist(x, sq, &candidates).minimum(&closest.unsqueeze(1));
        let pots = dist.sum_dim_intlist(0, false, Kind::Double);
        let best = pots.argmin(0, true);
        closest = dist.index_select(1, &best).squeeze_dim(1);
        centres
            .narrow(0, c, 1)
            .copy_(&candidates.index_select(0, &best));
    }
    Ok(centres)
}

/// Nearest centre of every row and its squared distance, in row blocks.
fn assign(x: &Tensor, sq: &Tensor, centres: &Tensor, rows: i64) -> (Tensor, Tensor) {
    let n = x.size()[0];
    let csq = centres.square().sum_dim_intlist(1, false, centres.kind());
    let minus2t = (centres * -2.0).tr().contiguous();
    let (mut labels, mut dists) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let d = csq.addmm(&x.narrow(0, start, len), &minus2t);
        let (dmin, idx) = d.min_dim(1, false);
        dists.push((dmin + sq.narrow(0, start, len)).clamp_min(0.0));
        labels.push(idx);
        start += len;
    }
    (Tensor::cat(&labels, 0), Tensor::cat(&dists, 0))
}

/// Exact inertia: sum of |x - centre(x)|^2, in row blocks.
fn inertia(x: &Tensor, centres: &Tensor, labels: &Tensor, rows: i64) -> Result<f64> {
    let n = x.size()[0];
    let mut total = 0.0;
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let diff = x.narrow(0, start, len) - centres.index_select(0, &labels.narrow(0, start, len));
        total += f64::try_from(diff.square().sum(Kind::Double))?;
        start += len;
    }
    Ok(total)
}

/// New centres: means of the clusters; an empty cluster takes the point
/// farthest from its centre (largest `dist`, then smallest index), which
/// leaves its old cluster, as scikit-learn does.
fn update(x: &Tensor, labels: &Tensor, dist: &Tensor, centres: &Tensor) -> Result<Tensor> {
    let k = centres.size()[0];
    let sums = centres.zeros_like().index_add(0, labels, x);
    let mut counts = host_vec::<i64>(&labels.bincount(None::<Tensor>, k))?;
    let empty: Vec<i64> = (0..k).filter(|&c| counts[c as usize] == 0).collect();
    if !empty.is_empty() {
        let (_, far) = topk_ordered(&dist.unsqueeze(0), empty.len() as i64)?;
        let far_from = labels.index_select(0, &far.squeeze_dim(0));
        for ((&e, f), old) in empty
            .iter()
            .zip(host_vec::<i64>(&far)?)
            .zip(host_vec::<i64>(&far_from)?)
        {
            let point = x.narrow(0, f, 1);
            let _ = sums.narrow(0, old, 1).g_sub_(&point);
            sums.narrow(0, e, 1).copy_(&point);
            counts[old as usize] -= 1;
            counts[e as usize] = 1;
        }
    }
    let counts = Tensor::from_slice(&counts)
        .to_device(x.device())
        .unsqueeze(1);
    let means = &sums / counts.clamp_min(1).to_kind(x.kind());
    Ok(means.where_self(&counts.gt(0), centres))
}

fn lloyd(
    x: &Tensor,
    sq: &Tensor,
    mut centres: Tensor,
    max_iter: usize,
    tol: f64,
    rows: i64,
) -> Result<KMeans> {
    let mut previous: Option<Tensor> = None;
    let mut n_iter = 0;
    for it in 1..=max_iter {
        n_iter = it;
        let (labels, dist) = assign(x, sq, &centres, rows);
        let next = update(x, &labels, &dist, &centres)?;
        let shift = f64::try_from((&next - &centres).square().sum(Kind::Double))?;
        centres = next;
        if previous.as_ref().is_some_and(|p| p.equal(&labels)) || shift <= tol {
            break;
        }
        previous = Some(labels);
    }
    let (labels, _) = assign(x, sq, &centres, rows);
    let inertia = inertia(x, &centres, &labels, rows)?;
    Ok(KMeans {
        assignments: labels,
        centroids: centres,
        inertia,
        n_iter,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three tight blobs far apart.
    fn blobs(rng: &mut Rng, per: usize) -> (Tensor, Vec<i64>) {
        let centres = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]];
        let mut v = Vec::new();
        let mut y = Vec::new();
        for (c, ctr) in centres.iter().enumerate() {
            for _ in 0..per {
                v.push(ctr[0] + rng.uniform(-1.0, 1.0));
                v.push(ctr[1] + rng.uniform(-1.0, 1.0));
                y.push(c as i64);
            }
        }
        (Tensor::from_slice(&v).reshape([-1, 2]), y)
    }

    #[test]
    fn finds_separated_blobs_and_is_fixed_by_the_seed() {
        let mut rng = Rng::new(1);
        let (x, y) = blobs(&mut rng, 50);
        let a = kmeans(&x, 3, 2, 100, 7).unwrap();
        let got = host_vec::<i64>(&a.assignments).unwrap();
        // Same partition up to renaming.
        for i in 0..got.len() {
            for j in 0..got.len() {
                assert_eq!(got[i] == got[j], y[i] == y[j]);
            }
        }
        let b = kmeans(&x, 3, 2, 100, 7).unwrap();
        assert!(a.centroids.equal(&b.centroids));
        assert_eq!(a.inertia, b.inertia);
        let direct = inertia(&x, &a.centroids, &a.assignments, 1000).unwrap();
        assert!((direct - a.inertia).abs() < 1e-9);
    }

    #[test]
    fn empty_clusters_take_far_points() {
        // Four distinct points, duplicates; k = 4 must use all of them.
        let x = Tensor::from_slice(&[0.0f64, 0.0, 0.0, 1.0, 5.0, 5.0, 9.0, 9.0]).reshape([-1, 1]);
        let out = kmeans(&x, 4, 1, 50, 0).unwrap();
        assert!(out.inertia < 1e-12, "{}", out.inertia);
        let c = host_vec::<i64>(&out.assignments).unwrap();
        let mut s = c.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn bad_arguments_are_named() {
        let x = Tensor::from_slice(&[0.0f32, 1.0, 2.0]).reshape([3, 1]);
        let e = kmeans(&x, 4, 1, 10, 0).unwrap_err().to_string();
        assert_eq!(e, "k: expected 1 <= k <= 3, the number of samples, got 4");
        let e = kmeans(&x, 2, 0, 10, 0).unwrap_err().to_string();
        assert!(e.starts_with("n_init: expected an integer >= 1"), "{e}");
        let nan = Tensor::from_slice(&[0.0f32, f32::NAN]).reshape([2, 1]);
        let e = kmeans(&nan, 1, 1, 10, 0).unwrap_err().to_string();
        assert!(e.starts_with("x: expected finite values"), "{e}");
    }
}
