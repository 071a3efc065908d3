//! The retrieval scan as libtorch ops, for tensors on any device (CUDA in
//! practice; the CPU uses the fused scan of [`super::scan_cpu`]).
//!
//! Queries go in row blocks against the whole gallery: a block of
//! similarities (b x n), same-class entries masked out, then per query the
//! count of items ranked before its best same-class item and its R best
//! other-class items by [`topk_ordered`](super::knn::topk_ordered).

use tch::{Kind, Tensor};

use super::input::{block_rows, host_vec};
use super::knn::topk_ordered;
use super::retrieval::{ScanInput, ScanOut};
use crate::error::Result;

/// The scan of `input` (any device), `rows` queries per block (`None`: from
/// the memory budget).
pub(crate) fn scan_torch(input: ScanInput<'_>, rows: Option<i64>) -> Result<ScanOut> {
    let ScanInput {
        q,
        yq,
        g,
        yg,
        pos,
        need,
    } = input;
    let device = q.device();
    let (m, n) = (yq.len() as i64, yg.len() as i64);
    let yq_t = Tensor::from_slice(yq).to_device(device);
    let yg_t = Tensor::from_slice(yg).to_device(device);
    let cols = Tensor::arange(n, (Kind::Int64, device));
    let (pstar, jstar): (Vec<f64>, Vec<i64>) = (0..yq.len())
        .map(|i| pos.first(i).unwrap_or((f64::INFINITY, i64::MAX)))
        .unzip();
    let pstar = Tensor::from_slice(&pstar)
        .to_kind(q.kind())
        .to_device(device);
    let jstar = Tensor::from_slice(&jstar).to_device(device);
    let width = (need.cap(pos.max_r()) as i64).min(n);
    let rows = block_rows(rows, n, q.kind());
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
        let s = q
            .narrow(0, start, len)
            .matmul(&gt)
            .masked_fill(&same, f64::NEG_INFINITY);
        drop(same);
        if need.count {
            let p = pstar.narrow(0, start, len).unsqueeze(1);
            let j = jstar.narrow(0, start, len).unsqueeze(1);
            let ahead = s.gt_tensor(&p).logical_or(
                &s.eq_tensor(&p)
                    .logical_and(&cols.unsqueeze(0).lt_tensor(&j)),
            );
            let before = host_vec::<i64>(&ahead.sum_dim_intlist(1, false, Kind::Int64))?;
            out.before.extend(before.into_iter().map(|c| c as u64));
        } else {
            out.before.extend(std::iter::repeat_n(0, len as usize));
        }
        if width > 0 {
            let (v, i) = topk_ordered(&s, width)?;
            let v = host_vec::<f64>(&v.to_kind(Kind::Double))?;
            let i = host_vec::<i64>(&i)?;
            for (r, (vr, ir)) in v
                .chunks(width as usize)
                .zip(i.chunks(width as usize))
                .enumerate()
            {
                let cap = need.cap(pos.r(start as usize + r));
                // Masked entries (-inf) fill rows with fewer other-class items.
                out.negatives.push(
                    vr.iter()
                        .zip(ir)
                        .take(cap)
                        .filter(|(v, _)| v.is_finite())
                        .map(|(&v, &j)| (v, j))
                        .collect(),
                );
            }
        } else if need.collects() {
            out.negatives.extend((0..len).map(|_| Vec::new()));
        }
        start += len;
    }
    Ok(out)
}
