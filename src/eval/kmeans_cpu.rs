//! k-means' passes on the CPU, fused.
//!
//! The seeding in rounds: a round computes the dot products `x_i . c_j` of
//! every point i and candidate j into a block (by [`dots`], or libtorch's
//! product); the squared distance is `(|x_i|^2 - 2 x_i . c_j) + |c_j|^2`,
//! clamped at 0. As libtorch ops, the potentials of the candidates and the
//! update of every point's two nearest centres read and write the n x
//! candidates block about eight times; on SOP's shape (60,502 points, 88
//! candidates a round, 257 rounds) that is 20 MiB a pass, out of cache, and
//! cost a third of the seeding. Here each is one pass, in row chunks of
//! [`CHUNK`] over the threads. The potentials are summed in float64 per
//! chunk, then the chunks in order, so that the result does not depend on
//! the thread count.
//!
//! Lloyd: every point's two nearest centres ([`Centres::nearest_two`]) are
//! kept as the register tiles of the points x centres products are made,
//! without writing the products out.

use tch::{Device, Kind, Tensor};

use super::exact::{cpu_slice, Sim};
use crate::error::{Error, Result};
use crate::loss::{gemm, threads};

/// Rows per unit of work.
const CHUNK: usize = 4096;

/// Rows of points per call of [`gemm::dot_tiles`]: 192 rows of 512 float32
/// features (384 KiB) stay in L2 while the centres stream past.
const DOT_ROWS_BYTES: usize = 384 << 10;

/// Whether the fused passes apply: CPU tensors of float32 or float64.
pub(crate) fn applies(x: &Tensor) -> bool {
    x.device() == Device::Cpu && matches!(x.kind(), Kind::Float | Kind::Double)
}

/// The element arithmetic the passes need.
pub(crate) trait Elem:
    Sim + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self>
{
}

impl Elem for f32 {}

impl Elem for f64 {}

/// `max((sq_i - 2 dot_ij) + csq_j, 0)`: the squared distance, rounded as
/// the libtorch ops of `kmeans::Round::dist` round it.
#[inline(always)]
fn dist<T: Elem>(sq: T, dot: T, csq: T) -> T {
    let v = (sq - (dot + dot)) + csq;
    let zero = T::from_f64(0.0);
    if v > zero {
        v
    } else {
        zero
    }
}

/// The row chunks of `n` rows, spread over the threads in turn.
fn for_chunks(n: usize, work: impl Fn(usize, std::ops::Range<usize>) + Sync) {
    let chunks = n.div_ceil(CHUNK);
    let threads = threads::count().min(chunks).max(1);
    let work = &work;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for c in (t..chunks).step_by(threads) {
                    work(c, c * CHUNK..((c + 1) * CHUNK).min(n));
                }
            });
        }
    });
}

/// A round's block: `dot` (n x b, contiguous) the dot products of points and
/// candidates, `sq` (n) and `csq` (b) their squared norms.
#[derive(Clone, Copy)]
pub(crate) struct Block<'a> {
    pub dot: &'a Tensor,
    pub sq: &'a Tensor,
    pub csq: &'a Tensor,
}

/// A block's width b and its three tensors' elements.
type Slices<'a, T> = (usize, &'a [T], &'a [T], &'a [T]);

impl Block<'_> {
    /// b and the three tensors' elements.
    fn slices<T: Elem>(&self) -> Result<Slices<'_, T>> {
        Ok((
            self.dot.size()[1] as usize,
            cpu_slice::<T>(self.dot)?,
            cpu_slice::<T>(self.sq)?,
            cpu_slice::<T>(self.csq)?,
        ))
    }
}

/// The potential of each candidate j: `sum_i min(d_ij, nearest_i)` over the
/// points, `nearest` (n) every point's squared distance to its nearest
/// centre so far. Float64, b values.
pub(crate) fn potentials(block: Block<'_>, nearest: &Tensor) -> Result<Vec<f64>> {
    match block.dot.kind() {
        Kind::Float => potentials_typed::<f32>(block, nearest),
        Kind::Double => potentials_typed::<f64>(block, nearest),
        k => Err(Error::invalid(
            "x",
            format!("dtype {k:?}"),
            "float32 or float64",
        )),
    }
}

fn potentials_typed<T: Elem>(block: Block<'_>, nearest: &Tensor) -> Result<Vec<f64>> {
    let (b, p, s, c) = block.slices::<T>()?;
    let d = cpu_slice::<T>(nearest)?;
    let n = d.len();
    let sums = std::sync::Mutex::new(vec![Vec::new(); n.div_ceil(CHUNK)]);
    for_chunks(n, |chunk, rows| {
        let mut acc = vec![0.0f64; b];
        for i in rows {
            let row = &p[i * b..(i + 1) * b];
            let (cap, si) = (d[i], s[i]);
            for ((a, &pv), &cv) in acc.iter_mut().zip(row).zip(c) {
                let v = dist(si, pv, cv);
                *a += (if v < cap { v } else { cap }).to_f64();
            }
        }
        sums.lock().expect("no thread panics holding it")[chunk] = acc;
    });
    let sums = sums.into_inner().expect("no thread panicked");
    let mut total = vec![0.0f64; b];
    for acc in sums {
        for (t, a) in total.iter_mut().zip(acc) {
            *t += a;
        }
    }
    Ok(total)
}

/// Every point's nearest centre (`labels`), its squared distance
/// (`nearest`) and the squared distance to its second-nearest (`second`):
/// contiguous CPU tensors that nothing else reads while they are updated.
pub(crate) struct TwoNearest<'a> {
    pub labels: &'a mut Tensor,
    pub nearest: &'a mut Tensor,
    pub second: &'a mut Tensor,
}

/// Takes in the candidates `cols` (columns of the block, in order) as
/// centres numbered from `first`, updating `state` in place (ties: the
/// earlier centre).
pub(crate) fn take_centres(
    block: Block<'_>,
    cols: &[i64],
    first: i64,
    state: TwoNearest<'_>,
) -> Result<()> {
    match block.dot.kind() {
        Kind::Float => take_typed::<f32>(block, cols, first, state),
        Kind::Double => take_typed::<f64>(block, cols, first, state),
        k => Err(Error::invalid(
            "x",
            format!("dtype {k:?}"),
            "float32 or float64",
        )),
    }
}

/// A contiguous CPU tensor's elements, writable.
fn cpu_slice_mut<T: tch::kind::Element>(t: &mut Tensor, n: usize) -> Result<&mut [T]> {
    if t.device() != Device::Cpu || !t.is_contiguous() || t.kind() != T::KIND || t.numel() != n {
        return Err(Error::invalid(
            "k-means state",
            format!("{:?} {:?}", t.device(), t.kind()),
            "a contiguous CPU tensor of the compute dtype",
        ));
    }
    // SAFETY: `t` is a contiguous CPU tensor of `n` elements of type `T`
    // (checked above), borrowed mutably for the slice's lifetime.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n) })
}

/// Raw pointers to the disjoint row ranges the threads write.
#[derive(Clone, Copy)]
struct Rows<T>(*mut T);
// SAFETY: each thread writes only its own chunks' rows (disjoint ranges).
unsafe impl<T> Send for Rows<T> {}
unsafe impl<T> Sync for Rows<T> {}

impl<T> Rows<T> {
    /// The elements `range` (within the slice this came from).
    ///
    /// SAFETY: the caller writes disjoint ranges only, within bounds.
    unsafe fn range<'a>(self, range: std::ops::Range<usize>) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(range.start), range.len())
    }
}

fn take_typed<T: Elem>(
    block: Block<'_>,
    cols: &[i64],
    first: i64,
    state: TwoNearest<'_>,
) -> Result<()> {
    let (b, p, s, c) = block.slices::<T>()?;
    let n = s.len();
    let lab = Rows(cpu_slice_mut::<i64>(state.labels, n)?.as_mut_ptr());
    let near = Rows(cpu_slice_mut::<T>(state.nearest, n)?.as_mut_ptr());
    let sec = Rows(cpu_slice_mut::<T>(state.second, n)?.as_mut_ptr());
    let picked: Vec<(usize, T)> = cols.iter().map(|&j| (j as usize, c[j as usize])).collect();
    for_chunks(n, |_, rows| {
        // SAFETY: chunks are disjoint row ranges within 0..n.
        let (l, d1s, d2s) = unsafe {
            (
                lab.range(rows.clone()),
                near.range(rows.clone()),
                sec.range(rows.clone()),
            )
        };
        for (r, i) in rows.enumerate() {
            let (row, si) = (&p[i * b..(i + 1) * b], s[i]);
            let (mut d1, mut d2, mut best) = (d1s[r], d2s[r], l[r]);
            for (t, &(j, cv)) in picked.iter().enumerate() {
                let v = dist(si, row[j], cv);
                if v < d1 {
                    d2 = d1;
                    d1 = v;
                    best = first + t as i64;
                } else if v < d2 {
                    d2 = v;
                }
            }
            (l[r], d1s[r], d2s[r]) = (best, d1, d2);
        }
    });
    Ok(())
}

/// The float32 CPU rows of `t` (2-D, contiguous) where the fused products
/// apply ([`gemm::dot_tiles`]: float32 on a CPU with its kernels).
fn dot_rows(t: &Tensor) -> Option<(&[f32], usize)> {
    if !gemm::available() || t.kind() != Kind::Float || t.dim() != 2 {
        return None;
    }
    let d = t.size()[1] as usize;
    cpu_slice::<f32>(t).ok().filter(|_| d > 0).map(|s| (s, d))
}

/// Calls `work(rows, points)` over `x`'s rows in blocks that stay in L2,
/// the rows shared out evenly over the threads (each row's result is its
/// own, whatever the split).
fn for_dot_blocks(x: &[f32], d: usize, work: impl Fn(std::ops::Range<usize>, &[f32]) + Sync) {
    let n = x.len() / d;
    let per = (DOT_ROWS_BYTES / (4 * d)).max(6) / 6 * 6;
    let threads = threads::count().min(n.div_ceil(per)).max(1);
    let share = n.div_ceil(threads);
    let work = &work;
    std::thread::scope(|s| {
        for t in 0..threads {
            let rows = t * share..((t + 1) * share).min(n);
            s.spawn(move || {
                for start in rows.clone().step_by(per) {
                    let block = start..(start + per).min(rows.end);
                    work(block.clone(), &x[block.start * d..block.end * d]);
                }
            });
        }
    });
}

/// Whether the products of `x`'s rows go through the crate's kernels
/// ([`dots`], [`Centres`]): float32 on a CPU with AVX2 and FMA.
pub(crate) fn has_product_kernels(x: &Tensor) -> bool {
    dot_rows(x).is_some()
}

/// `x @ c^T` (n x b, float32) by the fused kernels, written into `out`
/// (contiguous, n x b: reused from round to round, fresh pages cost about
/// as much as the product's writes); false, with `out` untouched, where
/// they do not apply (then libtorch's product is used).
pub(crate) fn dots(x: &Tensor, c: &Tensor, out: &mut Tensor) -> bool {
    let (Some((xs, d)), Some((cs, dc))) = (dot_rows(x), dot_rows(c)) else {
        return false;
    };
    let (n, b) = (xs.len() / d, cs.len() / d);
    if d != dc || out.size() != [n as i64, b as i64] {
        return false;
    }
    let (Some(cs), Ok(out)) = (gemm::Packed::new(cs, d), cpu_slice_mut::<f32>(out, n * b)) else {
        return false;
    };
    let rows = Rows(out.as_mut_ptr());
    for_dot_blocks(xs, d, |block, points| {
        // SAFETY: blocks are disjoint row ranges within 0..n.
        let dst = unsafe { rows.range(block.start * b..block.end * b) };
        let done = gemm::dot_tiles(points, gemm::Rhs::Packed(&cs), d, |t| {
            for r in 0..t.rows {
                let at = (t.row0 + r) * b + t.col0;
                dst[at..at + t.cols].copy_from_slice(t.row(r));
            }
        });
        assert!(done, "packed centres imply the kernels");
    });
    true
}

/// The centres of a Lloyd pass as [`Centres::nearest_two`] reads them:
/// packed once ([`gemm::Packed`]), with their squared norms.
pub(crate) struct Centres {
    packed: gemm::Packed,
    csq: Vec<f32>,
    d: usize,
}

impl Centres {
    /// `centres` (k x d) and their squared norms `csq` (k), or None where
    /// the kernels do not apply.
    pub(crate) fn new(centres: &Tensor, csq: &Tensor) -> Option<Self> {
        let (cs, d) = dot_rows(centres)?;
        let csq = cpu_slice::<f32>(csq).ok()?.to_vec();
        let packed = gemm::Packed::new(cs, d).filter(|_| csq.len() == cs.len() / d)?;
        Some(Centres { packed, csq, d })
    }

    /// Every point's nearest centre, its squared distance and the distance
    /// (not squared) to the second-nearest, without forming the points x
    /// centres distances (None where the kernels do not apply). `x` (m x d)
    /// the points, `sq` (m) their squared norms; the squared distance
    /// `(csq_j - 2 x_i . c_j) + sq_i` is clamped at 0, ties go to the
    /// earlier centre.
    pub(crate) fn nearest_two(&self, x: &Tensor, sq: &Tensor) -> Option<(Tensor, Tensor, Tensor)> {
        let (xs, d) = dot_rows(x)?;
        let own = cpu_slice::<f32>(sq).ok()?;
        let m = xs.len() / d;
        if d != self.d || own.len() != m {
            return None;
        }
        let mut labels = vec![0i64; m];
        let mut first = vec![f32::INFINITY; m];
        let mut second = vec![f32::INFINITY; m];
        let (lab, d1s, d2s) = (
            Rows(labels.as_mut_ptr()),
            Rows(first.as_mut_ptr()),
            Rows(second.as_mut_ptr()),
        );
        let csq = &self.csq;
        for_dot_blocks(xs, d, |block, points| {
            // SAFETY: blocks are disjoint row ranges within 0..m.
            let (l, d1, d2) = unsafe {
                (
                    lab.range(block.clone()),
                    d1s.range(block.clone()),
                    d2s.range(block),
                )
            };
            let done = gemm::dot_tiles(points, gemm::Rhs::Packed(&self.packed), d, |t| {
                let c = &csq[t.col0..t.col0 + t.cols];
                for r in 0..t.rows {
                    let i = t.row0 + r;
                    two_smallest(t.row(r), c, t.col0, (&mut l[i], &mut d1[i], &mut d2[i]));
                }
            });
            assert!(done, "packed centres imply the kernels");
        });
        // As libtorch rounds `(d + sq).clamp_min(0)`.
        let plus_own = |v: &[f32]| -> Vec<f32> {
            v.iter().zip(own).map(|(&v, &o)| (v + o).max(0.0)).collect()
        };
        let lower = if csq.len() > 1 {
            plus_own(&second).into_iter().map(f32::sqrt).collect()
        } else {
            vec![f32::INFINITY; m]
        };
        let nearest = plus_own(&first);
        Some((
            Tensor::from_slice(&labels),
            Tensor::from_slice(&nearest),
            Tensor::from_slice(&lower),
        ))
    }
}

/// Updates a point's (label, smallest, second smallest) of `csq_j - 2 dot_j`
/// over centres `col0..` (`dots` and `csq` theirs); strict comparisons keep
/// the earlier centre on ties. Most groups beat neither and are rejected by
/// one vectorisable test.
#[inline]
fn two_smallest(
    dots: &[f32],
    csq: &[f32],
    col0: usize,
    (l, d1, d2): (&mut i64, &mut f32, &mut f32),
) {
    let mut v = [f32::INFINITY; gemm::TILE_COLS];
    for ((v, &p), &c) in v.iter_mut().zip(dots).zip(csq) {
        *v = c - (p + p);
    }
    let mut any = false;
    for &x in &v {
        any |= x < *d2;
    }
    if !any {
        return;
    }
    for (j, &x) in v.iter().enumerate().take(dots.len()) {
        if x < *d1 {
            (*d2, *d1, *l) = (*d1, x, (col0 + j) as i64);
        } else if x < *d2 {
            *d2 = x;
        }
    }
}
