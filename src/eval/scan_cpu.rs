//! The retrieval scan on CPU: similarity tiles from libtorch's matrix
//! product, read by one fused pass in Rust.
//!
//! Per query the scan keeps two things (see [`super::retrieval`]): the number
//! of other-class items ranked before its best same-class item, and its R
//! best other-class items (a bounded heap). Most similarities can do neither,
//! being below the best same-class similarity and below the worst kept item;
//! a single comparison against that threshold rejects them, checked 16 at a
//! time so that the compiler can vectorise it. As a sequence of libtorch ops
//! (mask, compare, count, top-k) the same work reads every tile five times
//! and costs as much as the matrix product itself.
//!
//! When the queries are the gallery the similarity matrix is symmetric: only
//! the tiles on and above the diagonal are computed, and each off-diagonal
//! tile is read twice, by rows for its row queries and by columns for its
//! column queries. That halves the matrix products, the bulk of the time.
//! Work is split over `tch::get_num_threads()` threads by disjoint queries,
//! so the result does not depend on the thread count.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use tch::{Device, Kind, Tensor};

use super::retrieval::{ScanInput, ScanOut};
use crate::error::{Error, Result};
use crate::names::{device_name, dtype_name};

/// Similarities are compared in the compute dtype.
pub(crate) trait Sim:
    tch::kind::Element + Copy + PartialOrd + Send + Sync + 'static
{
    const INF: Self;
    const NEG_INF: Self;
    fn to_f64(self) -> f64;
    /// Exact for values that came from `to_f64`.
    fn from_f64(v: f64) -> Self;
}

impl Sim for f32 {
    const INF: Self = f32::INFINITY;
    const NEG_INF: Self = f32::NEG_INFINITY;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Sim for f64 {
    const INF: Self = f64::INFINITY;
    const NEG_INF: Self = f64::NEG_INFINITY;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// An other-class item of a query's heap. `Ord` puts the item ranked last
/// (smaller similarity, then larger index) greatest, so a max-heap keeps the
/// worst kept item on top.
#[derive(Clone, Copy, Debug)]
struct Neg<T> {
    s: T,
    j: i64,
}

impl<T: Sim> Ord for Neg<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .s
            .partial_cmp(&self.s)
            .unwrap_or(Ordering::Equal)
            .then(self.j.cmp(&other.j))
    }
}

impl<T: Sim> PartialOrd for Neg<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T: Sim> PartialEq for Neg<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl<T: Sim> Eq for Neg<T> {}

/// What the scan keeps for one query.
struct RowState<T> {
    label: i64,
    /// The best same-class similarity and its index; `INF` when not counted.
    pstar: T,
    jstar: i64,
    /// Other-class items ranked before (pstar, jstar).
    before: u64,
    /// Heap capacity: R, or 0 when MAP@R and R-Precision are not wanted.
    cap: usize,
    heap: BinaryHeap<Neg<T>>,
}

impl<T: Sim> RowState<T> {
    /// Below this similarity an item can neither be counted nor kept.
    fn lo(&self) -> T {
        let heap = if self.cap == 0 {
            T::INF
        } else if self.heap.len() < self.cap {
            T::NEG_INF
        } else {
            self.heap.peek().map_or(T::NEG_INF, |w| w.s)
        };
        if self.pstar < heap {
            self.pstar
        } else {
            heap
        }
    }

    /// An other-class item `j` with similarity `s`.
    #[inline]
    fn offer(&mut self, s: T, j: i64) {
        if s > self.pstar || (s == self.pstar && j < self.jstar) {
            self.before += 1;
        }
        if self.cap == 0 {
            return;
        }
        let item = Neg { s, j };
        if self.heap.len() < self.cap {
            self.heap.push(item);
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if item < *worst {
                *worst = item;
            }
        }
    }
}

/// Width of the groups of similarities rejected by one vectorised test.
pub(crate) const GROUP: usize = 16;

/// Is any `x >= t`? (A branch-free reduction the compiler vectorises.)
#[inline]
pub(crate) fn any_at_least<T: Sim>(xs: &[T], t: T) -> bool {
    match <&[T; GROUP]>::try_from(xs) {
        Ok(xs) => {
            let mut any = false;
            for &x in xs {
                any |= x >= t;
            }
            any
        }
        Err(_) => xs.iter().any(|&x| x >= t),
    }
}

/// Is any `xs[i] >= ts[i]`?
#[inline]
fn any_at_least_each<T: Sim>(xs: &[T], ts: &[T]) -> bool {
    match (<&[T; GROUP]>::try_from(xs), <&[T; GROUP]>::try_from(ts)) {
        (Ok(xs), Ok(ts)) => {
            let mut any = false;
            for i in 0..GROUP {
                any |= xs[i] >= ts[i];
            }
            any
        }
        _ => xs.iter().zip(ts).any(|(&x, &t)| x >= t),
    }
}

/// One query against a row of similarities to gallery items `col0..`.
fn scan_row<T: Sim>(st: &mut RowState<T>, lo: &mut T, row: &[T], col0: usize, labels: &[i64]) {
    let mut l = *lo;
    for (g, group) in row.chunks(GROUP).enumerate() {
        if !any_at_least(group, l) {
            continue;
        }
        let base = g * GROUP;
        for (t, &s) in group.iter().enumerate() {
            if s >= l && labels[base + t] != st.label {
                st.offer(s, (col0 + base + t) as i64);
                l = st.lo();
            }
        }
    }
    *lo = l;
}

/// Queries `states` (columns of a tile) against gallery item `g` (label
/// `gl`), whose similarities to them are `seg`.
fn scan_segment<T: Sim>(states: &mut [RowState<T>], los: &mut [T], seg: &[T], g: i64, gl: i64) {
    for (k, (group, lo)) in seg.chunks(GROUP).zip(los.chunks_mut(GROUP)).enumerate() {
        if !any_at_least_each(group, lo) {
            continue;
        }
        let base = k * GROUP;
        for (t, &s) in group.iter().enumerate() {
            let st = &mut states[base + t];
            if s >= lo[t] && st.label != gl {
                st.offer(s, g);
                lo[t] = st.lo();
            }
        }
    }
}

/// Threads for a tile of `elements`: one for small tiles, where starting
/// threads would cost more than the scan.
fn threads_for(elements: usize, threads: usize) -> usize {
    if elements < 1 << 16 {
        1
    } else {
        threads.max(1)
    }
}

/// A tile of similarities, `rows` x `cols` in row-major order: queries
/// `row0..` against gallery items `col0..`.
#[derive(Clone, Copy)]
struct Tile<'a, T> {
    s: &'a [T],
    rows: usize,
    cols: usize,
    row0: usize,
    col0: usize,
}

/// The rows of `tile` for their queries (of all `states` and `los`; `labels`:
/// the gallery's), split over `threads`.
fn rows_pass<T: Sim>(
    tile: Tile<'_, T>,
    states: &mut [RowState<T>],
    los: &mut [T],
    labels: &[i64],
    threads: usize,
) {
    let rows = tile.row0..tile.row0 + tile.rows;
    let (states, los) = (&mut states[rows.clone()], &mut los[rows]);
    let labels = &labels[tile.col0..tile.col0 + tile.cols];
    let (s, width) = (tile.s, tile.cols);
    let per = states.len().div_ceil(threads_for(s.len(), threads)).max(1);
    split_queries(states, los, per, |base, st, lo| {
        for (r, (q, l)) in st.iter_mut().zip(lo.iter_mut()).enumerate() {
            let row = &s[(base + r) * width..(base + r + 1) * width];
            scan_row(q, l, row, tile.col0, labels);
        }
    });
}

/// The columns of `tile` for their queries (the gallery being the queries:
/// of all `states` and `los`; `labels`: the queries'), split over `threads`.
fn cols_pass<T: Sim>(
    tile: Tile<'_, T>,
    states: &mut [RowState<T>],
    los: &mut [T],
    labels: &[i64],
    threads: usize,
) {
    let cols = tile.col0..tile.col0 + tile.cols;
    let (states, los) = (&mut states[cols.clone()], &mut los[cols]);
    let labels = &labels[tile.row0..tile.row0 + tile.rows];
    let (s, width) = (tile.s, tile.cols);
    let per = width.div_ceil(threads_for(s.len(), threads)).max(1);
    split_queries(states, los, per, |base, st, lo| {
        for (r, &label) in labels.iter().enumerate().take(tile.rows) {
            let start = r * width + base;
            let seg = &s[start..start + st.len()];
            scan_segment(st, lo, seg, (tile.row0 + r) as i64, label);
        }
    });
}

/// `work(base, states, los)` over chunks of `per` queries (`base`: the
/// first one's index), each chunk on its own thread when there are several.
fn split_queries<T: Sim>(
    states: &mut [RowState<T>],
    los: &mut [T],
    per: usize,
    work: impl Fn(usize, &mut [RowState<T>], &mut [T]) + Sync,
) {
    if per >= states.len() {
        return work(0, states, los);
    }
    let work = &work;
    std::thread::scope(|scope| {
        for (k, (st, lo)) in states.chunks_mut(per).zip(los.chunks_mut(per)).enumerate() {
            scope.spawn(move || work(k * per, st, lo));
        }
    });
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

/// The scan of `input`, queries and gallery on the CPU, in `tile` x `tile`
/// tiles. `symmetric` (only when the gallery is the queries) computes the
/// tiles on and above the diagonal only.
pub(crate) fn scan_cpu(input: ScanInput<'_>, tile: i64, symmetric: bool) -> Result<ScanOut> {
    match input.q.kind() {
        Kind::Float => scan_typed::<f32>(input, tile, symmetric),
        Kind::Double => scan_typed::<f64>(input, tile, symmetric),
        k => Err(Error::invalid(
            "embeddings",
            format!("dtype {k:?}"),
            "float32 or float64 after preparation",
        )),
    }
}

fn scan_typed<T: Sim>(input: ScanInput<'_>, tile: i64, symmetric: bool) -> Result<ScanOut> {
    let (yq, yg, pos, need) = (input.yq, input.yg, input.pos, input.need);
    let (m, n) = (yq.len(), yg.len());
    let mut states: Vec<RowState<T>> = (0..m)
        .map(|i| {
            let first = if need.count { pos.first(i) } else { None };
            let (pstar, jstar) = first.map_or((T::INF, i64::MAX), |(s, j)| (T::from_f64(s), j));
            RowState {
                label: yq[i],
                pstar,
                jstar,
                before: 0,
                cap: need.cap(pos.r(i)),
                heap: BinaryHeap::new(),
            }
        })
        .collect();
    let mut los: Vec<T> = states.iter().map(RowState::lo).collect();
    let threads = tch::get_num_threads().max(1) as usize;
    let t = tile.max(1) as usize;
    let gt = input.g.tr();
    for r0 in (0..m).step_by(t) {
        let rl = t.min(m - r0);
        let qi = input.q.narrow(0, r0 as i64, rl as i64);
        let first_col = if symmetric { r0 } else { 0 };
        for c0 in (first_col..n).step_by(t) {
            let cl = t.min(n - c0);
            let s = qi.matmul(&gt.narrow(1, c0 as i64, cl as i64)).contiguous();
            let tile = Tile {
                s: cpu_slice::<T>(&s)?,
                rows: rl,
                cols: cl,
                row0: r0,
                col0: c0,
            };
            rows_pass(tile, &mut states, &mut los, yg, threads);
            if symmetric && c0 > r0 {
                cols_pass(tile, &mut states, &mut los, yq, threads);
            }
        }
    }
    Ok(ScanOut {
        before: states.iter().map(|s| s.before).collect(),
        negatives: states
            .into_iter()
            .map(|s| {
                s.heap
                    .into_sorted_vec()
                    .into_iter()
                    .map(|w| (w.s.to_f64(), w.j))
                    .collect()
            })
            .collect(),
    })
}
