//! The retrieval scan on CPU: similarity tiles from libtorch's matrix
//! product, read by one fused pass in Rust.
//!
//! Per query the scan keeps two things (see [`super::retrieval`]): the number
//! of other-class items ranked before its best same-class item, and its R
//! best other-class items (a bounded heap). Most similarities can do neither,
//! being below the best same-class similarity and below the worst kept item
//! by more than the tile's rounding ([`Rows::band`]); a single comparison
//! against that threshold rejects them, checked 16 at a time so that the
//! compiler can vectorise it. The few others are counted or kept by their
//! exact similarity ([`Rows::sim`]), so that no decision depends on how the
//! tiles were cut. As a sequence of libtorch ops (mask, compare, count,
//! top-k) the same work reads every tile five times and costs as much as the
//! matrix product itself.
//!
//! When the queries are the gallery the similarity matrix is symmetric: only
//! the tiles on and above the diagonal are computed, and each off-diagonal
//! tile is read twice, by rows for its row queries and by columns for its
//! column queries. That halves the matrix products, the bulk of the time.
//! Work is split over `tch::get_num_threads()` threads by disjoint queries,
//! so the result does not depend on the thread count.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::exact::{cpu_slice, not_below, Memo, Rows, Sim};
use super::retrieval::{ScanInput, ScanOut};
use crate::error::{Error, Result};

/// An other-class item of a query's heap, by its [`Rows::sim`]. `Ord` puts
/// the item ranked last (smaller similarity, then larger index) greatest, so
/// a max-heap keeps the worst kept item on top.
#[derive(Clone, Copy, Debug)]
struct Neg {
    s: f64,
    j: i64,
}

impl Ord for Neg {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .s
            .partial_cmp(&self.s)
            .unwrap_or(Ordering::Equal)
            .then(self.j.cmp(&other.j))
    }
}

impl PartialOrd for Neg {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Neg {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Neg {}

/// What the scan keeps for one query: exact similarities ([`Rows::sim`]),
/// and the tile values (`T`) at which they must be looked at.
struct RowState<T> {
    label: i64,
    /// The best same-class similarity and its index; `INF` when not counted.
    pstar: f64,
    jstar: i64,
    /// Other-class items ranked before (pstar, jstar).
    before: u64,
    /// Heap capacity: R, or 0 when MAP@R and R-Precision are not wanted.
    cap: usize,
    heap: BinaryHeap<Neg>,
    /// [`Rows::band`] of the query.
    band: f64,
    memo: Memo,
    /// An item whose tile value is above `ahead` ranks before (pstar,
    /// jstar) whatever its exact similarity; from `near` to `ahead` that
    /// decides.
    ahead: T,
    near: T,
    /// From this tile value up an item may enter the heap.
    heap_lo: T,
}

impl<T: Sim> RowState<T> {
    /// Query `i` (label `label`, best same-class item `first` if counted,
    /// heap capacity `cap`) of `rows`.
    fn new(
        rows: &Rows<'_, T>,
        i: usize,
        label: i64,
        first: Option<(f64, i64)>,
        cap: usize,
    ) -> Self {
        let band = rows.band(i);
        let (pstar, jstar) = first.unwrap_or((f64::INFINITY, i64::MAX));
        let inf = T::from_f64(f64::INFINITY);
        let (ahead, near) = if first.is_some() {
            (T::from_f64(pstar + band), T::from_f64(pstar - band))
        } else {
            (inf, inf)
        };
        RowState {
            label,
            pstar,
            jstar,
            before: 0,
            cap,
            heap: BinaryHeap::new(),
            band,
            memo: Memo::default(),
            ahead,
            near,
            heap_lo: if cap == 0 {
                inf
            } else {
                T::from_f64(f64::NEG_INFINITY)
            },
        }
    }

    /// Below this tile value an item is neither counted nor kept.
    #[inline(always)]
    fn threshold(&self) -> T {
        if self.near < self.heap_lo {
            self.near
        } else {
            self.heap_lo
        }
    }

    /// Other-class item `j` of tile value `s` for query `i` of `rows`. The
    /// exact similarity is computed only where the tile value cannot decide,
    /// which a tile value that overflowed ([`not_below`]) never does.
    #[inline(always)]
    fn offer(&mut self, rows: &Rows<'_, T>, i: usize, s: T, j: usize) {
        let mut exact = None;
        if (s > self.ahead) & s.is_finite() {
            self.before += 1;
        } else if not_below(s, self.near) {
            let sim = *exact.get_or_insert_with(|| rows.sim_memo(i, j, &mut self.memo));
            if sim > self.pstar || (sim == self.pstar && (j as i64) < self.jstar) {
                self.before += 1;
            }
        }
        if self.cap == 0 || !not_below(s, self.heap_lo) {
            return;
        }
        let sim = exact.unwrap_or_else(|| rows.sim_memo(i, j, &mut self.memo));
        let item = Neg {
            s: sim,
            j: j as i64,
        };
        if self.heap.len() < self.cap {
            self.heap.push(item);
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if item < *worst {
                *worst = item;
            }
        }
        if self.heap.len() == self.cap {
            let worst = self.heap.peek().map_or(f64::NEG_INFINITY, |w| w.s);
            self.heap_lo = T::from_f64(worst - self.band);
        }
    }
}

/// Width of the groups of similarities rejected by one vectorised test.
pub(crate) const GROUP: usize = 16;

/// Is any `x` not below `t` (`x >= t`, or NaN)? (A branch-free reduction
/// the compiler vectorises.)
#[inline]
pub(crate) fn any_not_below<T: Sim>(xs: &[T], t: T) -> bool {
    match <&[T; GROUP]>::try_from(xs) {
        Ok(xs) => {
            let mut any = false;
            for &x in xs {
                any |= not_below(x, t);
            }
            any
        }
        Err(_) => xs.iter().any(|&x| not_below(x, t)),
    }
}

/// Is any `xs[i]` not below `ts[i]`?
#[inline]
fn any_not_below_each<T: Sim>(xs: &[T], ts: &[T]) -> bool {
    match (<&[T; GROUP]>::try_from(xs), <&[T; GROUP]>::try_from(ts)) {
        (Ok(xs), Ok(ts)) => {
            let mut any = false;
            for i in 0..GROUP {
                any |= not_below(xs[i], ts[i]);
            }
            any
        }
        _ => xs.iter().zip(ts).any(|(&x, &t)| not_below(x, t)),
    }
}

/// Query `i` (state `st`, threshold `lo`) against a row of tile values for
/// gallery items `col0..` (labels `labels`).
#[allow(clippy::too_many_arguments)]
fn scan_row<T: Sim>(
    rows: &Rows<'_, T>,
    i: usize,
    st: &mut RowState<T>,
    lo: &mut T,
    row: &[T],
    col0: usize,
    labels: &[i64],
) {
    let mut l = *lo;
    for (g, group) in row.chunks(GROUP).enumerate() {
        if !any_not_below(group, l) {
            continue;
        }
        let base = g * GROUP;
        for (t, &s) in group.iter().enumerate() {
            if not_below(s, l) && labels[base + t] != st.label {
                st.offer(rows, i, s, col0 + base + t);
                l = st.threshold();
            }
        }
    }
    *lo = l;
}

/// Queries `q0..` (`states`, thresholds `los`; columns of a tile) against
/// gallery item `g` (label `gl`), whose tile values for them are `seg`.
fn scan_segment<T: Sim>(
    rows: &Rows<'_, T>,
    q0: usize,
    states: &mut [RowState<T>],
    los: &mut [T],
    seg: &[T],
    g: usize,
    gl: i64,
) {
    for (k, (group, lo)) in seg.chunks(GROUP).zip(los.chunks_mut(GROUP)).enumerate() {
        if !any_not_below_each(group, lo) {
            continue;
        }
        let base = k * GROUP;
        for (t, &s) in group.iter().enumerate() {
            let st = &mut states[base + t];
            if not_below(s, lo[t]) && st.label != gl {
                st.offer(rows, q0 + base + t, s, g);
                lo[t] = st.threshold();
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
    exact: &Rows<'_, T>,
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
            scan_row(exact, tile.row0 + base + r, q, l, row, tile.col0, labels);
        }
    });
}

/// The columns of `tile` for their queries (the gallery being the queries:
/// of all `states` and `los`; `labels`: the queries'), split over `threads`.
fn cols_pass<T: Sim>(
    exact: &Rows<'_, T>,
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
            let q0 = tile.col0 + base;
            scan_segment(exact, q0, st, lo, seg, tile.row0 + r, label);
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

/// The scan of `input` (queries and gallery on the CPU, `exact` their
/// rows) in `tile` x `tile` tiles. `symmetric` (only when the gallery is the
/// queries) computes the tiles on and above the diagonal only.
pub(crate) fn scan_cpu<T: Sim>(
    input: ScanInput<'_>,
    exact: &Rows<'_, T>,
    tile: i64,
    symmetric: bool,
) -> Result<ScanOut> {
    if input.q.kind() != T::KIND {
        return Err(Error::invalid(
            "embeddings",
            format!("dtype {:?}", input.q.kind()),
            format!("{:?} after preparation", T::KIND),
        ));
    }
    let (yq, yg, pos, need) = (input.yq, input.yg, input.pos, input.need);
    let (m, n) = (yq.len(), yg.len());
    let mut states: Vec<RowState<T>> = (0..m)
        .map(|i| {
            let first = if need.count { pos.first(i) } else { None };
            RowState::new(exact, i, yq[i], first, need.cap(pos.r(i)))
        })
        .collect();
    let mut los: Vec<T> = states.iter().map(RowState::threshold).collect();
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
            rows_pass(exact, tile, &mut states, &mut los, yg, threads);
            if symmetric && c0 > r0 {
                cols_pass(exact, tile, &mut states, &mut los, yq, threads);
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
                    .map(|w| (w.s, w.j))
                    .collect()
            })
            .collect(),
    })
}
