//! The similarity every retrieval metric ranks by, computed the same way
//! whatever the block size, the scan or the device.
//!
//! A matrix product's element depends on how the product was split: two
//! gallery items whose similarities to a query are equal (duplicate
//! embeddings of different classes, a collapsed model) can come out of two
//! tiles, or of a tile and the positives' batched product, rounded
//! differently, and rank in either order. So the metrics rank by [`dot`], a
//! fixed-order float64 sum of the products (exact products for float32
//! rows), a function of the two rows alone.
//!
//! The scans still find the candidates with fast matrix products: a tile's
//! value differs from [`dot`] by at most the pair's [`Rows::band`], so an
//! item can only matter where its tile value is within that band of what
//! decides (the best same-class similarity, the worst kept item), and only
//! there is [`dot`] computed.

use std::collections::HashMap;
use std::os::raw::c_int;

use tch::{Device, Kind, Tensor};

use super::input::host_vec;
use super::positives::rank_order;
use crate::error::{Error, Result};
use crate::names::{device_name, dtype_name};

/// The element types of prepared embeddings (float32 and float64).
pub(crate) trait Sim:
    tch::kind::Element + Copy + PartialOrd + Send + Sync + 'static
{
    /// Unit roundoff of the type's arithmetic.
    const UNIT_ROUNDOFF: f64;
    /// The smallest normal value: the absolute error of a product or sum
    /// that underflows is below it, subnormals kept or flushed to zero (as
    /// cuBLAS and a CPU in flush-to-zero mode do).
    const TINY: f64;
    fn is_finite(self) -> bool;
    fn to_f64(self) -> f64;
    /// The bits of the value.
    fn bits(self) -> u64;
    /// The nearest value (exact for values that came from `to_f64`).
    fn from_f64(v: f64) -> Self;
}

impl Sim for f32 {
    const UNIT_ROUNDOFF: f64 = f32::EPSILON as f64 / 2.0;
    const TINY: f64 = f32::MIN_POSITIVE as f64;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Sim for f64 {
    const UNIT_ROUNDOFF: f64 = f64::EPSILON / 2.0;
    const TINY: f64 = f64::MIN_POSITIVE;
    fn to_f64(self) -> f64 {
        self
    }
    fn bits(self) -> u64 {
        self.to_bits()
    }
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// Lanes of [`dot`]'s sum: element k goes to lane k mod `LANES`.
const LANES: usize = 8;

/// The similarity of rows `a` and `b`: the products in float64 (exact for
/// float32 rows), summed in lane k mod 8 in order, then the lanes in a fixed
/// tree. No step depends on the vector width, and Rust neither reorders nor
/// fuses float operations, so every CPU gives the same bits.
pub(crate) fn dot<T: Sim>(a: &[T], b: &[T]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for k in 0..LANES {
            acc[k] += x[k].to_f64() * y[k].to_f64();
        }
    }
    for (k, (x, y)) in ar.iter().zip(br).enumerate() {
        acc[k] += x.to_f64() * y.to_f64();
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// `x >= t`, or `x` is not finite: what the scans look at. A tile value
/// that overflowed (inf, -inf, or NaN from inf - inf) says nothing of the
/// exact similarity, so [`dot`] decides.
#[inline]
pub(crate) fn not_below<T: Sim>(x: T, t: T) -> bool {
    // `|`, not `||`: no branch, so that loops over it vectorise.
    (x >= t) | !x.is_finite()
}

/// The L2 norm of `row` in float64, scaled by its largest magnitude so that
/// it neither overflows nor underflows where the norm itself does not.
fn row_norm<T: Sim>(row: &[T]) -> f64 {
    let peak = row.iter().fold(0.0f64, |m, x| m.max(x.to_f64().abs()));
    if peak == 0.0 || !peak.is_finite() {
        return peak;
    }
    peak * row
        .iter()
        .map(|x| (x.to_f64() / peak).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// `n * u / (1 - n * u)`: the relative error bound of a sum of `n` products
/// in arithmetic of unit roundoff `u`, in any order (Higham, "Accuracy and
/// Stability of Numerical Algorithms", 3.1).
fn gamma(n: usize, u: f64) -> f64 {
    let nu = n as f64 * u;
    if nu >= 1.0 {
        f64::INFINITY
    } else {
        nu / (1.0 - nu)
    }
}

/// Host views of prepared queries and gallery (row-major, `d` columns) for
/// [`dot`], and the bound between a matrix product's element and [`dot`].
pub(crate) struct Rows<'a, T> {
    q: &'a [T],
    g: &'a [T],
    d: usize,
    /// Per query: twice the bound of |tile value - dot| over the gallery.
    bands: Vec<f64>,
    /// Per gallery item: the first item with the same bits.
    first_equal: Vec<usize>,
}

/// The last similarity a query computed, by the gallery row it was of
/// ([`Rows::first_equal`]): a collapsed model's rows are all equal, and
/// each query then computes one [`dot`] instead of one per item.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Memo {
    row: usize,
    sim: f64,
}

impl Default for Memo {
    fn default() -> Self {
        Memo {
            row: usize::MAX,
            sim: 0.0,
        }
    }
}

/// Per row of `rows` (`d` columns), the first row with the same bits.
fn first_equal<T: Sim>(rows: &[T], d: usize) -> Vec<usize> {
    let mut seen: HashMap<u64, Vec<usize>> = HashMap::new();
    let row = |j: usize| &rows[j * d..(j + 1) * d];
    let same = |a: &[T], b: &[T]| a.iter().zip(b).all(|(x, y)| x.bits() == y.bits());
    (0..rows.len().checked_div(d).unwrap_or(0))
        .map(|j| {
            // FNV-1a over the elements' bits.
            let hash = row(j).iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
                (h ^ x.bits()).wrapping_mul(0x0100_0000_01b3)
            });
            let bucket = seen.entry(hash).or_default();
            match bucket.iter().find(|&&k| same(row(k), row(j))) {
                Some(&k) => k,
                None => {
                    bucket.push(j);
                    j
                }
            }
        })
        .collect()
}

impl<'a, T: Sim> Rows<'a, T> {
    /// `q` (m x d) and `g` (n x d) as contiguous host slices of `T`, with
    /// products computed in `T`'s arithmetic.
    pub fn new(q: &'a [T], g: &'a [T], d: usize) -> Self {
        let norm = |rows: &[T]| -> Vec<f64> { rows.chunks(d.max(1)).map(row_norm).collect() };
        let g_max = norm(g).into_iter().fold(0.0f64, f64::max);
        // Both the product's and dot's error are bounded by
        // gamma(d) * sum |a_k b_k| <= gamma(d) * |a| |b| (Cauchy-Schwarz),
        // plus, where products or sums underflow, less than the smallest
        // normal number a step (Higham 2.2; also with flush-to-zero). The factor 2 covers the norms' own
        // rounding and the rounding of a threshold to `T`. A norm of zero
        // gives a product of zero, even against an infinite one.
        let unit = gamma(d, T::UNIT_ROUNDOFF) + gamma(d, f64::EPSILON / 2.0) + T::UNIT_ROUNDOFF;
        let tiny = (d + 2) as f64 * (T::TINY + <f64 as Sim>::TINY);
        let bands = norm(q)
            .into_iter()
            .map(|qn| {
                let scale = if qn == 0.0 || g_max == 0.0 {
                    0.0
                } else {
                    qn * g_max
                };
                2.0 * (unit * scale + tiny)
            })
            .collect();
        let first_equal = first_equal(g, d);
        Rows {
            q,
            g,
            d,
            bands,
            first_equal,
        }
    }

    /// The width of a row.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// [`dot`] of query `i` and gallery item `j`; NaN (float64 rows whose
    /// products overflow to inf - inf) is -inf, so that similarities have a
    /// total order: such an item ranks last.
    #[inline]
    pub fn sim(&self, i: usize, j: usize) -> f64 {
        let d = self.d;
        let sim = dot(&self.q[i * d..(i + 1) * d], &self.g[j * d..(j + 1) * d]);
        if sim.is_nan() {
            f64::NEG_INFINITY
        } else {
            sim
        }
    }

    /// [`Rows::sim`], reusing `memo` when item `j`'s row equals the row it
    /// holds.
    #[inline]
    pub fn sim_memo(&self, i: usize, j: usize, memo: &mut Memo) -> f64 {
        let row = self.first_equal[j];
        if memo.row != row {
            *memo = Memo {
                row,
                sim: self.sim(i, row),
            };
        }
        memo.sim
    }

    /// How far a matrix product's element for query `i` may be from
    /// [`Rows::sim`], with room to spare.
    pub fn band(&self, i: usize) -> f64 {
        self.bands[i]
    }
}

/// Per row r of `s` (tile values of queries `start..` against the gallery
/// of `exact`), its `caps[r]` best items by exact similarity ([`Rows::sim`],
/// rounded to float32 with `round_f32`), ranked by (-similarity, index);
/// items where `excluded` (bool, the shape of `s`) is true are left out.
///
/// Let v be the row's cap-th best finite tile value: each of the cap items
/// with the best finite tile values has an exact similarity of at least
/// v - band, so every item of the result has a tile value of at least
/// v - 2 band (less what rounding to float32 makes a tie with v), or one
/// that overflowed. Those are the candidates: few, unless many similarities
/// are within rounding of each other.
pub(crate) fn best_by_exact<T: Sim>(
    exact: &Rows<'_, T>,
    s: &Tensor,
    excluded: Option<&Tensor>,
    start: usize,
    caps: &[usize],
    round_f32: bool,
) -> Result<Vec<Vec<(f64, i64)>>> {
    let (rows, n) = (caps.len(), s.size()[1] as usize);
    let width = caps.iter().copied().max().unwrap_or(0).min(n);
    if width == 0 {
        return Ok(vec![Vec::new(); rows]);
    }
    let overflowed = s.isfinite().logical_not();
    let mut candidates_out = overflowed.shallow_clone();
    if let Some(e) = excluded {
        candidates_out = candidates_out.logical_or(e);
    }
    let masked = s.masked_fill(&candidates_out, f64::NEG_INFINITY);
    let top = host_vec::<f64>(&masked.topk(width as i64, 1, true, true).0)?;
    let thresholds: Vec<T> = caps
        .iter()
        .enumerate()
        .map(|(r, &cap)| {
            let kth = match cap {
                0 => return T::from_f64(f64::INFINITY),
                cap if cap > n => f64::NEG_INFINITY,
                cap => top[r * width + cap - 1],
            };
            T::from_f64(candidate_threshold(kth, exact.band(start + r), round_f32))
        })
        .collect();
    let thr = Tensor::from_slice(&thresholds)
        .to_device(s.device())
        .unsqueeze(1);
    let mut candidates = s.ge_tensor(&thr).logical_or(&overflowed);
    if let Some(e) = excluded {
        candidates = candidates.logical_and(&e.logical_not());
    }
    let round = |sim: f64| if round_f32 { sim as f32 as f64 } else { sim };
    let mut out: Vec<Vec<(f64, i64)>> = vec![Vec::new(); rows];
    for_each_exact(exact, &candidates, start, |r, j, sim| {
        out[r].push((round(sim), j as i64))
    })?;
    for (items, &cap) in out.iter_mut().zip(caps) {
        items.sort_unstable_by(rank_order);
        items.truncate(cap);
    }
    Ok(out)
}

/// `f(r, j, sim)` for every true entry (r, j) of `mask` (rows: queries
/// `start..`; columns: the gallery of `exact`), row by row, `sim` being
/// their [`Rows::sim`]. The pairs are read from the device a chunk of rows
/// at a time: at most about 2^22 pairs (64 MB) unless one row has more.
pub(crate) fn for_each_exact<T: Sim>(
    exact: &Rows<'_, T>,
    mask: &Tensor,
    start: usize,
    mut f: impl FnMut(usize, usize, f64),
) -> Result<()> {
    let counts = host_vec::<i64>(&mask.sum_dim_intlist(1, false, Kind::Int64))?;
    let mut r0 = 0;
    while r0 < counts.len() {
        let (mut r1, mut pairs) = (r0, 0i64);
        while r1 < counts.len() && (r1 == r0 || pairs + counts[r1] <= 1 << 22) {
            pairs += counts[r1];
            r1 += 1;
        }
        let chunk = mask.narrow(0, r0 as i64, (r1 - r0) as i64);
        let (mut memo, mut memo_of) = (Memo::default(), usize::MAX);
        // `nonzero` lists the pairs row by row: one memo per row.
        for pair in host_vec::<i64>(&chunk.nonzero())?.chunks(2) {
            let (r, j) = (r0 + pair[0] as usize, pair[1] as usize);
            if memo_of != r {
                (memo, memo_of) = (Memo::default(), r);
            }
            f(r, j, exact.sim_memo(start + r, j, &mut memo));
        }
        r0 = r1;
    }
    Ok(())
}

/// Host copies of prepared queries and gallery (the tensors themselves when
/// they are contiguous CPU ones), which [`Rows`] borrow.
pub(crate) struct HostRows {
    q: Tensor,
    g: Tensor,
}

impl HostRows {
    pub fn new(q: &Tensor, g: &Tensor) -> Self {
        HostRows {
            q: on_host(q),
            g: on_host(g),
        }
    }

    /// Their [`Rows`], of `T`'s dtype.
    pub fn rows<T: Sim>(&self) -> Result<Rows<'_, T>> {
        let d = self.q.size()[1] as usize;
        Ok(Rows::new(cpu_slice(&self.q)?, cpu_slice(&self.g)?, d))
    }
}

/// The lowest tile value that can be among a row's best items, its cap-th
/// best finite tile value being `kth` (-inf when there is none) and its
/// band `band`. With `round_f32` an exact similarity rounded to the same
/// float32 as the cap-th best one ties with it: half a float32 step lower,
/// or every value beyond float32's range where that rounds to an infinity.
fn candidate_threshold(kth: f64, band: f64, round_f32: bool) -> f64 {
    if !kth.is_finite() {
        return f64::NEG_INFINITY;
    }
    if !round_f32 {
        return kth - 2.0 * band;
    }
    let lowest = kth - 2.0 * band;
    match lowest as f32 {
        f32::NEG_INFINITY => f64::NEG_INFINITY,
        f32::INFINITY => f64::from(f32::MAX) - 2.0 * band,
        _ => lowest - lowest.abs() * f64::from(f32::EPSILON) - f64::from(f32::from_bits(1)),
    }
}

/// The elements of a contiguous CPU tensor of `T`'s dtype.
pub(crate) fn cpu_slice<T: Sim>(t: &Tensor) -> Result<&[T]> {
    if t.device() != Device::Cpu || !t.is_contiguous() || t.kind() != T::KIND {
        return Err(Error::invalid(
            "similarity tile",
            format!("{} {}", device_name(t.device()), dtype_name(t.kind())),
            "a contiguous CPU tensor of the compute dtype",
        ));
    }
    let n = t.numel();
    if n == 0 {
        return Ok(&[]);
    }
    // SAFETY: `t` is a contiguous CPU tensor of `n` elements of type `T`
    // (checked above); its storage lives as long as the borrow of `t`, and
    // nothing writes to it while the slice exists.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, n) })
}

/// A contiguous CPU copy of `t` (or `t` itself when it is one).
fn on_host(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu).contiguous()
}

extern "C" {
    fn gl_float32_matmul_is_reduced(cuda: c_int) -> c_int;
}

/// Whether float32 matrix products on `device` may run in reduced precision
/// (TF32 or bfloat16, as `torch.set_float32_matmul_precision("high")` or
/// `torch.backends.*.matmul.fp32_precision` allow): their error is then
/// beyond [`Rows::band`], and the scans compute their tiles in float64.
pub(crate) fn float32_matmul_is_reduced(device: Device) -> bool {
    let cuda = c_int::from(matches!(device, Device::Cuda(_)));
    // SAFETY: the function reads libtorch's global settings and catches
    // every exception (returning 1).
    unsafe { gl_float32_matmul_is_reduced(cuda) != 0 }
}

/// The dtype the scans multiply `kind` (a compute dtype) in on `device`.
pub(crate) fn tile_kind(kind: Kind, device: Device) -> Kind {
    if kind == Kind::Float && float32_matmul_is_reduced(device) {
        Kind::Double
    } else {
        kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn dot_is_the_sum_of_exact_products_within_its_bound() {
        let mut rng = Rng::new(5);
        for d in [1usize, 7, 8, 9, 64, 131] {
            let a: Vec<f32> = (0..d).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
            let b: Vec<f32> = (0..d).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
            // Products of float32 are exact in float64; their sum in 128
            // fixed-point bits is exact too (every product is a multiple of
            // 2^-48 below 1).
            let exact: i128 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| ((x as f64 * y as f64) * 2f64.powi(100)) as i128)
                .sum();
            let exact = exact as f64 / 2f64.powi(100);
            let abs: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| (x as f64 * y as f64).abs())
                .sum();
            let got = dot(&a, &b);
            assert!(
                (got - exact).abs() <= gamma(d, f64::EPSILON / 2.0) * abs,
                "d = {d}"
            );
            assert_eq!(got.to_bits(), dot(&b, &a).to_bits());
            let a64: Vec<f64> = a.iter().map(|&x| x as f64).collect();
            let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
            assert_eq!(got.to_bits(), dot(&a64, &b64).to_bits());
        }
    }

    #[test]
    fn a_float32_product_is_within_the_band_of_dot() {
        let mut rng = Rng::new(9);
        let (m, n, d) = (37usize, 53usize, 300usize);
        let q: Vec<f32> = (0..m * d).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let g: Vec<f32> = (0..n * d).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let rows = Rows::new(&q, &g, d);
        let qt = Tensor::from_slice(&q).reshape([m as i64, d as i64]);
        let gt = Tensor::from_slice(&g).reshape([n as i64, d as i64]);
        let s = qt.matmul(&gt.tr()).contiguous();
        let s = cpu_slice::<f32>(&s).unwrap();
        let mut worst = 0.0f64;
        for i in 0..m {
            for j in 0..n {
                let off = (s[i * n + j] as f64 - rows.sim(i, j)).abs() / rows.band(i);
                worst = worst.max(off);
            }
        }
        assert!(worst <= 0.5, "{worst}");
    }
}
