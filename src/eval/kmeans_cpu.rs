//! The per-round passes of k-means' seeding in rounds on the CPU, fused.
//!
//! A round computes the dot products `x_i . c_j` of every point i and
//! candidate j by one matrix product (libtorch); the squared distance is
//! `(|x_i|^2 - 2 x_i . c_j) + |c_j|^2`, clamped at 0. As libtorch ops, the potentials of the
//! candidates and the update of every point's two nearest centres read and
//! write the n x candidates block about eight times; on SOP's shape (60,502
//! points, 88 candidates a round, 257 rounds) that is 20 MiB a pass, out of
//! cache, and cost a third of the seeding. Here each is one pass, in row
//! chunks of [`CHUNK`] over the threads. The potentials are summed in
//! float64 per chunk, then the chunks in order, so that the result does not
//! depend on the thread count.

use tch::{Device, Kind, Tensor};

use super::scan_cpu::{cpu_slice, Sim};
use crate::error::{Error, Result};

/// Rows per unit of work.
const CHUNK: usize = 4096;

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
    let threads = (tch::get_num_threads().max(1) as usize).min(chunks).max(1);
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
