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
    /// The smallest positive (subnormal) value: the absolute error of a
    /// product or sum that underflows is at most half of it.
    const TINY: f64;
    fn to_f64(self) -> f64;
    /// The bits of the value.
    fn bits(self) -> u64;
    /// The nearest value (exact for values that came from `to_f64`).
    fn from_f64(v: f64) -> Self;
}

impl Sim for f32 {
    const UNIT_ROUNDOFF: f64 = f32::EPSILON as f64 / 2.0;
    const TINY: f64 = f32::from_bits(1) as f64; // 2^-149
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Sim for f64 {
    const UNIT_ROUNDOFF: f64 = f64::EPSILON / 2.0;
    const TINY: f64 = f64::from_bits(1); // 2^-1074
    fn to_f64(self) -> f64 {
        self
    }
    fn bits(self) -> u64 {
        self.to_bits()
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

/// `x >= t`, or `x` is NaN: what the scans look at, so that a NaN tile value
/// (float32 products overflowing to inf - inf) is decided by [`dot`].
#[inline]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // NaN passes on purpose
pub(crate) fn not_below<T: PartialOrd>(x: T, t: T) -> bool {
    !(x < t)
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
        let norm =
            |rows: &[T]| -> Vec<f64> { rows.chunks(d.max(1)).map(|r| dot(r, r).sqrt()).collect() };
        let g_max = norm(g).into_iter().fold(0.0f64, f64::max);
        // Both the product's and dot's error are bounded by
        // gamma(d) * sum |a_k b_k| <= gamma(d) * |a| |b| (Cauchy-Schwarz),
        // plus, where products or sums underflow, half the smallest
        // subnormal a step (Higham 2.2). The factor 2 covers the norms' own
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

    /// [`dot`] of query `i` and gallery item `j`.
    #[inline]
    pub fn sim(&self, i: usize, j: usize) -> f64 {
        let d = self.d;
        dot(&self.q[i * d..(i + 1) * d], &self.g[j * d..(j + 1) * d])
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
/// Let v be the row's cap-th best tile value: each of the cap items with
/// the best tile values has an exact similarity of at least v - band, so
/// every item of the result has a tile value of at least v - 2 band (less
/// half a float32 step with `round_f32`, as rounding makes ties). Those,
/// and NaN tile values, are the candidates: few, unless many similarities
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
    let masked = match excluded {
        Some(e) => s.masked_fill(e, f64::NEG_INFINITY),
        None => s.shallow_clone(),
    };
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
            if !kth.is_finite() {
                return T::from_f64(f64::NEG_INFINITY);
            }
            let ties = if round_f32 {
                kth.abs() * f64::from(f32::EPSILON) + f64::from(f32::from_bits(1))
            } else {
                0.0
            };
            T::from_f64(kth - 2.0 * exact.band(start + r) - ties)
        })
        .collect();
    let thr = Tensor::from_slice(&thresholds)
        .to_device(s.device())
        .unsqueeze(1);
    let mut candidates = s.ge_tensor(&thr).logical_or(&s.isnan());
    if let Some(e) = excluded {
        candidates = candidates.logical_and(&e.logical_not());
    }
    let round = |sim: f64| if round_f32 { sim as f32 as f64 } else { sim };
    let mut out: Vec<Vec<(f64, i64)>> = vec![Vec::new(); rows];
    let (mut memo, mut memo_of) = (Memo::default(), usize::MAX);
    // `nonzero` lists the candidates row by row.
    for pair in host_vec::<i64>(&candidates.nonzero())?.chunks(2) {
        let (r, j) = (pair[0] as usize, pair[1] as usize);
        if memo_of != r {
            (memo, memo_of) = (Memo::default(), r);
        }
        let sim = round(exact.sim_memo(start + r, j, &mut memo));
        out[r].push((sim, j as i64));
    }
    for (items, &cap) in out.iter_mut().zip(caps) {
        items.sort_unstable_by(rank_order);
        items.truncate(cap);
    }
    Ok(out)
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
pub(crate) fn on_host(t: &Tensor) -> Tensor {
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
