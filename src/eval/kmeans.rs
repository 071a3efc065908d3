//! k-means over libtorch tensors (CPU or CUDA): k-means++ seeding, Lloyd
//! iterations, the best of `n_init` runs by inertia.
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
//!
//! Two changes make it fast at k in the thousands (evaluating NMI on
//! Stanford Online Products, k = 11,316), neither of which changes a small
//! clustering:
//!
//! * **Seeding in rounds** for k >= 2 x [`SEED_ROUNDS`] and n x k >
//!   [`GREEDY_SEEDING_MAX_WORK`] ([`seeds_in_rounds`]): greedy k-means++
//!   makes a pass over the data per centre (11,316 passes of a few columns,
//!   memory-bound); from that size on, each round fills `k / SEED_ROUNDS`
//!   slots at once ("batched k-means++"): [`SEED_TRIALS`] points drawn by the
//!   same D^2 law per slot, the one lowering the potential most kept, then
//!   thinned against the others of the round (see `seed_in_rounds`). The
//!   whole seeding costs about `SEED_TRIALS` Lloyd iterations, in wide matrix
//!   products, and ends with the first assignment and its Hamerly bounds.
//!   Below that size, the seeding is the greedy one above, which finds
//!   better centres (more trials, one centre at a time). (On the SOP-shaped benchmark: NMI
//!   0.870 with one trial, 0.884 with two, 0.904 greedy with 12, and
//!   faiss's 0.870.)
//! * **Lloyd with Hamerly's bounds** (Hamerly 2010): each point keeps a lower
//!   bound on its distance to its second-nearest centre, lowered by the
//!   largest centre shift after each update; a point whose exact distance to
//!   its own (moved) centre is below that bound keeps its centre without
//!   being compared with the others. The assignments are those of plain
//!   Lloyd (up to ties within rounding); only points near a boundary are
//!   compared with all k centres once the centres settle.
//!
//! On a CPU with AVX2 and FMA, in float32, the points x centres products go
//! through the crate's register-tile kernel (`crate::loss::gemm`'s
//! `dot_tiles`) instead of libtorch's product: every point's two nearest
//! centres are kept as the tiles are computed, so that the points x k
//! distances are never written out, and the seeding's products go into one
//! buffer reused from round to round. Meanwhile libtorch's own ops run on
//! one thread (`crate::loss::threads::TorchInline`): its OpenMP workers,
//! spinning after each parallel op, would compete with the kernel's threads.
//! (SOP-shaped benchmark, 2 cores: 24.3 s before, 17 to 20 s after; see
//! BENCHMARKS.md.)

use tch::{Kind, Tensor};

use super::input::{
    block_rows, check_batch_size, check_embeddings, check_k, compute_kind, host_vec, prepare,
    BLOCK_BYTES,
};
use super::kmeans_cpu;
use super::knn::topk_ordered;
use crate::error::{at_least, non_negative, Error, Result};
use crate::loss::threads;
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
    non_negative("tol", opts.tol)?;
    check_batch_size(opts.batch_size)?;
    let x = prepare(x, compute_kind(x.kind()), false);
    // The libtorch ops between the fused products are small: on one thread,
    // they leave the cores to the products' threads.
    let _inline = kmeans_cpu::has_product_kernels(&x).then(threads::TorchInline::begin);
    let sq = x.square().sum_dim_intlist(1, false, x.kind());
    let variance = x
        .var_dim([0i64].as_slice(), false, false)
        .mean(Kind::Double);
    let tol = opts.tol * f64::try_from(variance)?;
    let rows = block_rows(opts.batch_size, k, x.kind());
    let mut best: Option<KMeans> = None;
    for run in 0..opts.n_init {
        let mut rng = Rng::derived(opts.seed, &[run as u64]);
        let (centres, near) = if seeds_in_rounds(n, k) {
            seed_in_rounds(&x, &sq, k, &mut rng)?
        } else {
            let centres = seed_plus_plus(&x, &sq, k, &mut rng)?;
            let near = Nearest::exact(&x, &sq, &centres, rows);
            (centres, near)
        };
        let out = lloyd(&x, &sq, centres, near, opts.max_iter, tol, rows)?;
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
    let trials = 2 + (k as f64).ln().floor() as i64;
    let (centres, mut closest) = first_centre(x, sq, k, rng);
    for c in 1..k {
        let ids = draw_d2(&closest, trials, rng)?;
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

/// The centres of a seeding (k x d, zeros) with the first, a point drawn
/// uniformly, in place; and every point's squared distance to it.
fn first_centre(x: &Tensor, sq: &Tensor, k: i64, rng: &mut Rng) -> (Tensor, Tensor) {
    let centres = Tensor::zeros([k, x.size()[1]], (x.kind(), x.device()));
    let first = rng.below(x.size()[0] as u64) as i64;
    centres.narrow(0, 0, 1).copy_(&x.narrow(0, first, 1));
    let closest = sq_dist(x, sq, &x.narrow(0, first, 1)).squeeze_dim(1);
    (centres, closest)
}

/// Rounds of the batched seeding: from k = 2 x SEED_ROUNDS on, each round
/// draws k / SEED_ROUNDS centres (the last round the rest; fewer where the
/// distances of a round would pass the block budget).
pub const SEED_ROUNDS: i64 = 256;

/// Greedy k-means++ up to this much work (samples x clusters): about 15 s
/// of seeding for 512-d data on 2 CPU cores.
pub const GREEDY_SEEDING_MAX_WORK: i64 = 1 << 26;

/// Whether `k` centres of `n` samples are seeded in rounds: where the
/// greedy seeding would cost more than [`GREEDY_SEEDING_MAX_WORK`] and a
/// round holds at least 2 centres.
pub fn seeds_in_rounds(n: i64, k: i64) -> bool {
    k >= 2 * SEED_ROUNDS && n.saturating_mul(k) > GREEDY_SEEDING_MAX_WORK
}

/// Candidates per centre of the batched seeding (scikit-learn's local
/// trials, fewer: each costs a pass over the data per round).
pub const SEED_TRIALS: i64 = 2;

/// k-means++ in rounds. Each round fills up to `k / SEED_ROUNDS` slots (fewer
/// where its distances would pass the block budget): per slot,
/// [`SEED_TRIALS`] points drawn with probability proportional to their
/// squared distance to the nearest centre so far, of which the one giving
/// the lowest potential (sum over the data of the squared distance to the
/// nearest centre) is chosen, as in scikit-learn's local trials. The chosen
/// points are then thinned in order: each is kept with probability (its
/// squared distance to the centres so far and to those kept before it in
/// the round) / (its squared distance when drawn), so that two draws from
/// one tight group rarely both become centres; slots left empty go to later
/// rounds. Every point's nearest and second-nearest centres are updated once
/// per round, so that the seeding ends with Lloyd's first assignment and its
/// Hamerly bounds.
fn seed_in_rounds(x: &Tensor, sq: &Tensor, k: i64, rng: &mut Rng) -> Result<(Tensor, Nearest)> {
    let (n, device) = (x.size()[0], x.device());
    let elt = if x.kind() == Kind::Double { 8 } else { 4 };
    let most = (BLOCK_BYTES / (n * elt * SEED_TRIALS)).max(1);
    let per_round = (k / SEED_ROUNDS).clamp(1, most);
    let (centres, closest) = first_centre(x, sq, k, rng);
    // Squared distance to the second-nearest centre, Hamerly's bound when
    // the seeding ends.
    let mut second = closest.full_like(f64::INFINITY);
    let mut near = Nearest {
        labels: Tensor::zeros([n], (Kind::Int64, device)),
        dist: closest,
        lower: Tensor::zeros([n], (x.kind(), device)),
    };
    let scratch = kmeans_cpu::has_product_kernels(x)
        .then(|| Tensor::empty([n * per_round * SEED_TRIALS], (Kind::Float, device)));
    let mut c = 1;
    while c < k {
        let b = per_round.min(k - c);
        // SEED_TRIALS draws a slot; each slot keeps the draw that lowers
        // the potential most.
        let ids = draw_d2(&near.dist, b * SEED_TRIALS, rng)?;
        let round = Round::new(x, sq, &ids, scratch.as_ref());
        let potential = round.potentials(&near.dist)?.view([b, SEED_TRIALS]);
        let best =
            potential.argmin(1, false) + Tensor::arange(b, (Kind::Int64, device)) * SEED_TRIALS;
        let cols = best.index_select(
            0,
            &thin(x, sq, &near.dist, &ids.index_select(0, &best), rng)?,
        );
        let m = cols.size()[0];
        centres
            .narrow(0, c, m)
            .copy_(&x.index_select(0, &ids.index_select(0, &cols)));
        round.take(&cols, c, &mut near, &mut second)?;
        c += m;
    }
    near.lower = second.sqrt();
    Ok((centres, near))
}

/// One round's candidates: the dot products `x_i . c_j` of every point i
/// and candidate j (n x b, one matrix product), the points' and the
/// candidates' squared norms; the squared distance is `(sq_i - 2 dot_ij) +
/// csq_j` clamped at 0. On the CPU the passes over the block are fused
/// ([`super::kmeans_cpu`]); elsewhere they are libtorch ops.
struct Round<'a> {
    dot: Tensor,
    sq: &'a Tensor,
    csq: Tensor,
}

impl<'a> Round<'a> {
    /// `scratch`: float32 elements for the dot products of the fused
    /// kernels, reused from round to round.
    fn new(x: &Tensor, sq: &'a Tensor, ids: &Tensor, scratch: Option<&Tensor>) -> Round<'a> {
        Round {
            dot: {
                let candidates = x.index_select(0, ids);
                let (n, b) = (x.size()[0], ids.size()[0]);
                scratch
                    .and_then(|s| {
                        let mut dot = s.narrow(0, 0, n * b).view([n, b]);
                        kmeans_cpu::dots(x, &candidates, &mut dot).then_some(dot)
                    })
                    .unwrap_or_else(|| x.mm(&candidates.tr()))
            },
            sq,
            csq: sq.index_select(0, ids),
        }
    }

    /// The block as the fused CPU passes take it.
    fn block(&self) -> kmeans_cpu::Block<'_> {
        kmeans_cpu::Block {
            dot: &self.dot,
            sq: self.sq,
            csq: &self.csq,
        }
    }

    /// The squared distances (n x b).
    fn dist(&self) -> Tensor {
        ((self.sq.unsqueeze(1) - &self.dot * 2.0) + self.csq.unsqueeze(0)).clamp_min(0.0)
    }

    /// The potential of each candidate, `sum_i min(d_ij, nearest_i)` (only
    /// compared between the candidates of a slot).
    fn potentials(&self, nearest: &Tensor) -> Result<Tensor> {
        if kmeans_cpu::applies(&self.dot) {
            let p = kmeans_cpu::potentials(self.block(), nearest)?;
            return Ok(Tensor::from_slice(&p));
        }
        // Summed in the data's dtype here: float64 costs a fifth of the
        // seeding's time on a GPU.
        Ok(self
            .dist()
            .minimum(&nearest.unsqueeze(1))
            .sum_dim_intlist(0, false, self.dot.kind()))
    }

    /// Takes in the candidates `cols` as centres numbered from `first`.
    fn take(
        &self,
        cols: &Tensor,
        first: i64,
        near: &mut Nearest,
        second: &mut Tensor,
    ) -> Result<()> {
        if kmeans_cpu::applies(&self.dot) {
            let cols = host_vec::<i64>(cols)?;
            let state = kmeans_cpu::TwoNearest {
                labels: &mut near.labels,
                nearest: &mut near.dist,
                second,
            };
            return kmeans_cpu::take_centres(self.block(), &cols, first, state);
        }
        near.add_centres(self.dist().index_select(1, cols), first, second);
        Ok(())
    }
}

/// `b` row indices drawn with probability proportional to `weights`, with
/// replacement.
fn draw_d2(weights: &Tensor, b: i64, rng: &mut Rng) -> Result<Tensor> {
    let n = weights.size()[0];
    let u: Vec<f64> = (0..b).map(|_| rng.next_f64()).collect();
    let cum = weights.cumsum(0, Kind::Double);
    let targets = Tensor::from_slice(&u).to_device(weights.device()) * cum.narrow(0, n - 1, 1);
    Ok(targets
        .f_searchsorted(&cum, false, false, "left", None::<Tensor>)?
        .clamp_max(n - 1))
}

/// The positions in `ids` (draws by the squared distances `dist`) that the
/// thinning of [`seed_in_rounds`] keeps, in order; the first is always kept.
fn thin(x: &Tensor, sq: &Tensor, dist: &Tensor, ids: &Tensor, rng: &mut Rng) -> Result<Tensor> {
    let drawn = x.index_select(0, ids);
    let pair = sq_dist(&drawn, &sq.index_select(0, ids), &drawn);
    let pair = host_vec::<f64>(&pair.to_kind(Kind::Double))?;
    let before = host_vec::<f64>(&dist.index_select(0, ids).to_kind(Kind::Double))?;
    let b = before.len();
    let mut kept: Vec<i64> = Vec::with_capacity(b);
    for j in 0..b {
        let now = kept
            .iter()
            .fold(before[j], |m, &i| m.min(pair[i as usize * b + j]));
        let u = rng.next_f64();
        if kept.is_empty() || before[j] <= 0.0 || u * before[j] < now {
            kept.push(j as i64);
        }
    }
    Ok(Tensor::from_slice(&kept).to_device(x.device()))
}

/// Exact inertia: sum of |x - centre(x)|^2, in row blocks.
fn inertia(x: &Tensor, centres: &Tensor, labels: &Tensor, rows: i64) -> Result<f64> {
    let own = own_distance(x, centres, labels, rows, Kind::Double);
    Ok(f64::try_from(own.sum(Kind::Double))?)
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

/// Every point's centre, with Hamerly's bound (see the module notes).
struct Nearest {
    /// Centre of every point, int64 (n,).
    labels: Tensor,
    /// Squared distance to that centre (n,).
    dist: Tensor,
    /// Lower bound on the distance (not squared) to any other centre (n,).
    lower: Tensor,
}

impl Nearest {
    /// Every point compared with every centre, in row blocks.
    fn exact(x: &Tensor, sq: &Tensor, centres: &Tensor, rows: i64) -> Nearest {
        let n = x.size()[0];
        let all = Tensor::arange(n, (Kind::Int64, x.device()));
        let (labels, dist, lower) = nearest_two(x, sq, centres, &all, rows);
        Nearest {
            labels,
            dist,
            lower,
        }
    }

    /// Takes in new centres numbered from `first`, given the squared
    /// distances (n x m) of every point to them (ties: the earlier centre),
    /// and keeps `second`, every point's squared distance to its
    /// second-nearest centre, up to date.
    fn add_centres(&mut self, mut dist: Tensor, first: i64, second: &mut Tensor) {
        let (d1, idx) = dist.min_dim(1, true);
        let d2 = if dist.size()[1] > 1 {
            let _ = dist.scatter_value_(1, &idx, f64::INFINITY);
            dist.min_dim(1, false).0
        } else {
            d1.squeeze_dim(1).full_like(f64::INFINITY)
        };
        let (d1, idx) = (d1.squeeze_dim(1), idx.squeeze_dim(1));
        let better = d1.lt_tensor(&self.dist);
        // A new nearest centre leaves the old one (or the new second) second;
        // otherwise the new nearest may come second.
        *second = d2
            .minimum(&self.dist)
            .where_self(&better, &second.minimum(&d1));
        self.labels = (idx + first).where_self(&better, &self.labels);
        self.dist = d1.where_self(&better, &self.dist);
    }

    /// The assignment to `centres`, which moved by `shift` (distances, k)
    /// since `self` was exact: points whose own centre is still nearer than
    /// the lowered bound keep it; the others are compared with every centre.
    fn refresh(&mut self, x: &Tensor, sq: &Tensor, centres: &Tensor, shift: &Tensor, rows: i64) {
        let largest = shift.max();
        let _ = self.lower.g_sub_(&largest);
        self.dist = own_distance(x, centres, &self.labels, rows, x.kind());
        let stale = self
            .dist
            .sqrt()
            .ge_tensor(&self.lower)
            .nonzero()
            .squeeze_dim(1);
        if stale.size()[0] == 0 {
            return;
        }
        let (labels, dist, lower) = nearest_two(x, sq, centres, &stale, rows);
        let _ = self.labels.index_copy_(0, &stale, &labels);
        let _ = self.dist.index_copy_(0, &stale, &dist);
        let _ = self.lower.index_copy_(0, &stale, &lower);
    }
}

/// For the points `which`: the nearest centre, its squared distance, and
/// the distance (not squared) to the second nearest (infinite for k = 1).
fn nearest_two(
    x: &Tensor,
    sq: &Tensor,
    centres: &Tensor,
    which: &Tensor,
    rows: i64,
) -> (Tensor, Tensor, Tensor) {
    let m = which.size()[0];
    let csq = centres.square().sum_dim_intlist(1, false, centres.kind());
    // The crate's kernels where they apply (Ok), else libtorch's product
    // through the centres times -2, transposed (Err).
    let products =
        kmeans_cpu::Centres::new(centres, &csq).ok_or_else(|| (centres * -2.0).tr().contiguous());
    let (mut labels, mut dists, mut lowers) = (Vec::new(), Vec::new(), Vec::new());
    let mut start = 0;
    while start < m {
        let len = rows.min(m - start);
        let ids = which.narrow(0, start, len);
        let (points, own) = (x.index_select(0, &ids), sq.index_select(0, &ids));
        let (l, d1, lower) = match &products {
            // Rows of `x`, like the centres: float32 on the CPU, d wide.
            Ok(c) => c.nearest_two(&points, &own).expect("rows like the centres"),
            Err(minus2t) => nearest_two_by_ops(&points, &own, minus2t, &csq),
        };
        labels.push(l);
        dists.push(d1);
        lowers.push(lower);
        start += len;
    }
    (
        Tensor::cat(&labels, 0),
        Tensor::cat(&dists, 0),
        Tensor::cat(&lowers, 0),
    )
}

/// [`kmeans_cpu::Centres::nearest_two`] as libtorch ops, through the
/// points x centres distances: on CUDA, in float64, and without the CPU
/// kernels. `minus2t`: the centres times -2, transposed (d x k).
fn nearest_two_by_ops(
    points: &Tensor,
    own: &Tensor,
    minus2t: &Tensor,
    csq: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let mut d = csq.addmm(points, minus2t);
    let (d1, idx) = d.min_dim(1, true);
    let lower = if minus2t.size()[1] > 1 {
        let _ = d.scatter_value_(1, &idx, f64::INFINITY);
        let (d2, _) = d.min_dim(1, false);
        (d2 + own).clamp_min(0.0).sqrt()
    } else {
        own.full_like(f64::INFINITY)
    };
    (
        idx.squeeze_dim(1),
        (d1.squeeze_dim(1) + own).clamp_min(0.0),
        lower,
    )
}

/// Squared distance of every point to its own centre, summed in `kind`, in
/// row blocks.
fn own_distance(x: &Tensor, centres: &Tensor, labels: &Tensor, rows: i64, kind: Kind) -> Tensor {
    let n = x.size()[0];
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let diff = x.narrow(0, start, len) - centres.index_select(0, &labels.narrow(0, start, len));
        out.push(diff.square().sum_dim_intlist(1, false, kind));
        start += len;
    }
    Tensor::cat(&out, 0)
}

/// Lloyd from `centres`, `near` their assignment.
fn lloyd(
    x: &Tensor,
    sq: &Tensor,
    mut centres: Tensor,
    mut near: Nearest,
    max_iter: usize,
    tol: f64,
    rows: i64,
) -> Result<KMeans> {
    let mut previous: Option<Tensor> = None;
    let mut n_iter = 0;
    for it in 1..=max_iter {
        n_iter = it;
        let next = update(x, &near.labels, &near.dist, &centres)?;
        let moved = (&next - &centres)
            .square()
            .sum_dim_intlist(1, false, Kind::Double);
        let shift = f64::try_from(moved.sum(Kind::Double))?;
        centres = next;
        let repeated = previous.as_ref().is_some_and(|p| p.equal(&near.labels));
        previous = Some(near.labels.copy());
        near.refresh(x, sq, &centres, &moved.sqrt().to_kind(x.kind()), rows);
        if repeated || shift <= tol {
            break;
        }
    }
    let inertia = inertia(x, &centres, &near.labels, rows)?;
    Ok(KMeans {
        assignments: near.labels,
        centroids: centres,
        inertia,
        n_iter,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

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

    /// Plain Lloyd, every point compared with every centre each iteration:
    /// the reference for the bounded one.
    fn plain_lloyd(x: &Tensor, mut centres: Tensor, max_iter: usize) -> (Tensor, Tensor) {
        let sq = x.square().sum_dim_intlist(1, false, x.kind());
        let n = x.size()[0];
        let all = Tensor::arange(n, (Kind::Int64, x.device()));
        let mut previous: Option<Tensor> = None;
        for _ in 0..max_iter {
            let (labels, dist, _) = nearest_two(x, &sq, &centres, &all, 7);
            centres = update(x, &labels, &dist, &centres).unwrap();
            if previous.as_ref().is_some_and(|p| p.equal(&labels)) {
                break;
            }
            previous = Some(labels);
        }
        let (labels, _, _) = nearest_two(x, &sq, &centres, &all, 7);
        (labels, centres)
    }

    #[test]
    fn bounded_lloyd_assigns_as_plain_lloyd() {
        let mut rng = Rng::new(3);
        // 400 points of 5 overlapping blobs in 3-d, 12 centres: many points
        // near boundaries, centres that move for many iterations.
        let v: Vec<f64> = (0..400 * 3)
            .map(|i| (i / 3 % 5) as f64 + rng.uniform(-1.5, 1.5))
            .collect();
        let x = Tensor::from_slice(&v).reshape([400, 3]);
        let sq = x.square().sum_dim_intlist(1, false, x.kind());
        let start = seed_plus_plus(&x, &sq, 12, &mut Rng::new(9)).unwrap();
        let (labels, centres) = plain_lloyd(&x, start.copy(), 300);
        let near = Nearest::exact(&x, &sq, &start, 7);
        let ours = lloyd(&x, &sq, start, near, 300, 0.0, 7).unwrap();
        assert!(ours.n_iter > 3, "{}", ours.n_iter);
        assert!(ours.assignments.equal(&labels));
        let diff = f64::try_from((&ours.centroids - &centres).abs().max()).unwrap();
        assert!(diff < 1e-12, "{diff}");
    }

    #[test]
    fn seeding_in_rounds_draws_k_data_points_by_the_seed() {
        let mut rng = Rng::new(4);
        let v: Vec<f32> = (0..2000 * 4)
            .map(|_| rng.uniform(-1.0, 1.0) as f32)
            .collect();
        let x = Tensor::from_slice(&v).reshape([2000, 4]);
        let sq = x.square().sum_dim_intlist(1, false, x.kind());
        let k = 2 * SEED_ROUNDS + 37;
        let (a, near) = seed_in_rounds(&x, &sq, k, &mut Rng::new(5)).unwrap();
        let (b, _) = seed_in_rounds(&x, &sq, k, &mut Rng::new(5)).unwrap();
        assert_eq!(a.size(), [k, 4]);
        assert!(a.equal(&b));
        // It ends with the exact assignment to its centres.
        let exact = Nearest::exact(&x, &sq, &a, 100);
        assert!(near.labels.equal(&exact.labels));
        let gap = f64::try_from((&near.dist - &exact.dist).abs().max()).unwrap();
        assert!(gap < 1e-5, "{gap}");
        // And with Hamerly's bound: the distance to the second-nearest centre.
        let gap = f64::try_from((&near.lower - &exact.lower).abs().max()).unwrap();
        assert!(gap < 1e-4, "{gap}");
        // Every centre is a row of x.
        let (nearest, _) =
            sq_dist(&a, &a.square().sum_dim_intlist(1, false, a.kind()), &x).min_dim(1, false);
        assert!(f64::try_from(nearest.max()).unwrap() < 1e-5);
        // Lloyd from it: k non-empty clusters, inertia below the seeding's
        // potential.
        let potential = f64::try_from(near.dist.sum(Kind::Double)).unwrap();
        let out = lloyd(&x, &sq, a, near, 50, 0.0, 100).unwrap();
        assert!(out.inertia < potential, "{} {potential}", out.inertia);
        let used = out
            .assignments
            .bincount(None::<Tensor>, k)
            .gt(0)
            .sum(Kind::Int64);
        assert_eq!(i64::try_from(used).unwrap(), k);
    }

    #[test]
    fn the_fused_cpu_round_equals_the_libtorch_ops() {
        let mut rng = Rng::new(9);
        let (n, d) = (9000, 5); // more than one chunk of rows
        let v: Vec<f64> = (0..n * d).map(|_| rng.uniform(-1.0, 1.0)).collect();
        for kind in [Kind::Float, Kind::Double] {
            let x = Tensor::from_slice(&v)
                .reshape([n as i64, d as i64])
                .to_kind(kind);
            let sq = x.square().sum_dim_intlist(1, false, kind);
            let (_, closest) = first_centre(&x, &sq, 40, &mut Rng::new(1));
            let ids = draw_d2(&closest, 12, &mut Rng::new(2)).unwrap();
            // Float32: the fused product into reused scratch, where the
            // kernels run.
            let scratch = Tensor::empty([n as i64 * 12], (Kind::Float, Device::Cpu));
            let round = Round::new(&x, &sq, &ids, Some(&scratch));
            let fused = round.potentials(&closest).unwrap();
            let ops =
                round
                    .dist()
                    .minimum(&closest.unsqueeze(1))
                    .sum_dim_intlist(0, false, Kind::Double);
            let gap = f64::try_from((&fused - &ops).abs().max()).unwrap();
            let scale = f64::try_from(ops.abs().max()).unwrap();
            assert!(gap <= 1e-5 * scale, "{kind:?}: {gap} of {scale}");
            // Taking columns 3, 0, 7 (ties among repeated draws included).
            let cols = Tensor::from_slice(&[3i64, 0, 7]);
            let fresh = || Nearest {
                labels: Tensor::zeros([n as i64], (Kind::Int64, Device::Cpu)),
                dist: closest.copy(),
                lower: Tensor::zeros([n as i64], (kind, Device::Cpu)),
            };
            let (mut a, mut b) = (fresh(), fresh());
            let mut second_a = closest.full_like(f64::INFINITY);
            let mut second_b = second_a.copy();
            // `a` takes the fused pass, `b` the libtorch ops.
            round.take(&cols, 5, &mut a, &mut second_a).unwrap();
            b.add_centres(round.dist().index_select(1, &cols), 5, &mut second_b);
            assert!(a.labels.equal(&b.labels), "{kind:?}");
            assert!(a.dist.equal(&b.dist), "{kind:?}");
            assert!(second_a.equal(&second_b), "{kind:?}");
        }
    }

    /// The fused products (where this CPU has the kernels) equal libtorch's
    /// up to the order of summation: the seeding's dot products, and every
    /// point's two nearest centres.
    #[test]
    fn the_fused_cpu_products_equal_the_libtorch_ops() {
        let mut rng = Rng::new(11);
        let (n, k, d) = (500, 45, 300); // tails of every tile and block
        let v: Vec<f32> = (0..n * d).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let x = Tensor::from_slice(&v).reshape([n as i64, d as i64]);
        let sq = x.square().sum_dim_intlist(1, false, Kind::Float);
        let centres = x.narrow(0, 7, k).copy();
        let csq = centres.square().sum_dim_intlist(1, false, Kind::Float);
        let mut dots = Tensor::empty([n as i64, k], (Kind::Float, Device::Cpu));
        if !kmeans_cpu::dots(&x, &centres, &mut dots) {
            return; // no kernels: the libtorch ops run, tested elsewhere
        }
        let gap = f64::try_from((dots - x.mm(&centres.tr())).abs().max()).unwrap();
        assert!(gap < 1e-4, "{gap}");
        let fused = kmeans_cpu::Centres::new(&centres, &csq).unwrap();
        let (l, d1, lower) = fused.nearest_two(&x, &sq).unwrap();
        let minus2t = (&centres * -2.0).tr().contiguous();
        let (want_l, want_d1, want_lower) = nearest_two_by_ops(&x, &sq, &minus2t, &csq);
        // Every centre is a point: its own distance is (about) 0.
        assert!(l.equal(&want_l));
        let gap = f64::try_from((d1 - want_d1).abs().max()).unwrap();
        assert!(gap < 1e-3, "{gap}");
        let gap = f64::try_from((lower - want_lower).abs().max()).unwrap();
        assert!(gap < 1e-3, "{gap}");
        // One centre: no second.
        let one = centres.narrow(0, 0, 1);
        let fused = kmeans_cpu::Centres::new(&one, &csq.narrow(0, 0, 1)).unwrap();
        let (_, _, lower) = fused.nearest_two(&x, &sq).unwrap();
        assert_eq!(f64::try_from(lower.min()).unwrap(), f64::INFINITY);
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
