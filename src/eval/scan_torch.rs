//! The retrieval scan as libtorch ops, for tensors on any device (CUDA in
//! practice; the CPU uses the fused scan of [`super::scan_cpu`]).
//!
//! Queries go in row blocks against the whole gallery: a block of tile
//! values (b x n), same-class entries masked out. Per query, the items
//! clearly ranked before its best same-class item are counted on the device,
//! and those within the tile's rounding of it ([`Rows::band`]) are decided on
//! the host by their exact similarity ([`Rows::sim`]); its best other-class
//! items are the candidates that the tile values cannot rule out, ranked by
//! their exact similarity.

use tch::{Kind, Tensor};

use super::exact::{best_by_exact, for_each_exact, Rows, Sim};
use super::input::{block_rows, host_vec};
use super::retrieval::{ScanInput, ScanOut};
use crate::error::Result;

/// The scan of `input` (any device; `exact`: its rows on the host), `rows`
/// queries per block (`None`: from the memory budget).
pub(crate) fn scan_torch<T: Sim>(
    input: ScanInput<'_>,
    exact: &Rows<'_, T>,
    rows: Option<i64>,
) -> Result<ScanOut> {
    let ScanInput {
        q,
        yq,
        g,
        yg,
        pos,
        need,
    } = input;
    let (device, kind) = (q.device(), q.kind());
    let (m, n) = (yq.len() as i64, yg.len() as i64);
    let yq_t = Tensor::from_slice(yq).to_device(device);
    let yg_t = Tensor::from_slice(yg).to_device(device);
    let width = (need.cap(pos.max_r()) as i64).min(n);
    let rows = block_rows(rows, n, kind);
    let gt = g.tr();
    let mut out = ScanOut {
        before: Vec::with_capacity(yq.len()),
        negatives: Vec::with_capacity(if need.collects() { yq.len() } else { 0 }),
    };
    let mut start = 0;
    while start < m {
        let len = rows.min(m - start);
        let same = yq_t
            .narrow(0, start, len)
            .unsqueeze(1)
            .eq_tensor(&yg_t.unsqueeze(0));
        let s = q.narrow(0, start, len).matmul(&gt);
        let block = Block {
            exact,
            input,
            s: &s,
            same: &same,
            start: start as usize,
            len: len as usize,
        };
        if need.count {
            out.before.extend(block.before_best_positive()?);
        } else {
            out.before.extend(std::iter::repeat_n(0, len as usize));
        }
        if width > 0 {
            out.negatives.extend(block.best_negatives()?);
        } else if need.collects() {
            out.negatives.extend((0..len).map(|_| Vec::new()));
        }
        start += len;
    }
    Ok(out)
}

/// Queries `start..start + len`, their tile values `s` and where the
/// items are of their class (`same`).
struct Block<'a, 'r, T> {
    exact: &'a Rows<'r, T>,
    input: ScanInput<'a>,
    s: &'a Tensor,
    same: &'a Tensor,
    start: usize,
    len: usize,
}

impl<T: Sim> Block<'_, '_, T> {
    /// A column of `values` (one per query of the block) as a tensor of the
    /// tile's dtype on its device.
    fn column(&self, values: impl Iterator<Item = f64>) -> Tensor {
        let values: Vec<T> = values.map(T::from_f64).collect();
        Tensor::from_slice(&values)
            .to_device(self.s.device())
            .unsqueeze(1)
    }

    /// Per query, the other-class items ranked before its best same-class
    /// item (pstar, jstar): those whose tile value is above pstar + band,
    /// and those within the band (or not finite) whose exact similarity
    /// ranks before.
    fn before_best_positive(&self) -> Result<Vec<u64>> {
        let pos = self.input.pos;
        let range = self.start..self.start + self.len;
        let first: Vec<(f64, i64)> = range
            .clone()
            .map(|i| pos.first(i).unwrap_or((f64::INFINITY, i64::MAX)))
            .collect();
        // Queries without a best same-class item count nothing: +inf.
        let edge = |k: usize, sign: f64| {
            let (pstar, _) = first[k];
            if pstar.is_finite() {
                pstar + sign * self.exact.band(self.start + k)
            } else {
                f64::INFINITY
            }
        };
        let hi = self.column((0..self.len).map(|k| edge(k, 1.0)));
        let lo = self.column((0..self.len).map(|k| edge(k, -1.0)));
        let other = self.same.logical_not();
        let finite = self.s.isfinite();
        let above = self.s.gt_tensor(&hi);
        let certain = above
            .logical_and(&finite)
            .logical_and(&other)
            .sum_dim_intlist(1, false, Kind::Int64);
        let mut before: Vec<u64> = host_vec::<i64>(&certain)?
            .into_iter()
            .map(|c| c as u64)
            .collect();
        // Within the band, or overflowed (a tile value that tells nothing).
        let near = self
            .s
            .lt_tensor(&lo)
            .logical_or(&above)
            .logical_not()
            .logical_or(&finite.logical_not())
            .logical_and(&other);
        for_each_exact(self.exact, &near, self.start, |k, j, sim| {
            let (pstar, jstar) = first[k];
            if sim > pstar || (sim == pstar && (j as i64) < jstar) {
                before[k] += 1;
            }
        })?;
        Ok(before)
    }

    /// Per query, its [`Need::cap`](super::retrieval::Need::cap) best
    /// other-class items by exact similarity, best first.
    fn best_negatives(&self) -> Result<Vec<Vec<(f64, i64)>>> {
        let input = self.input;
        let caps: Vec<usize> = (self.start..self.start + self.len)
            .map(|i| input.need.cap(input.pos.r(i)))
            .collect();
        best_by_exact(
            self.exact,
            self.s,
            Some(self.same),
            self.start,
            &caps,
            false,
        )
    }
}
