//! Nearest neighbours by similarity, in row blocks, ties broken by index.
//!
//! Neighbours are ordered by (-similarity, index): of two equally similar
//! items the one with the smaller index comes first. The similarity is the
//! exact one of `eval::exact` rounded to the compute dtype, so that equal
//! rows tie whatever the blocks; the blocks' matrix products only pick the
//! candidates. `topk_ordered` orders a tensor's own values the same way
//! (libtorch's `topk` picks among equal values in an unspecified way, which
//! differs between CPU and CUDA).

use tch::{Kind, Tensor};

use super::exact::{best_by_exact, tile_kind, HostRows, Sim};
use super::input::{
    block_rows, check_batch_size, check_embeddings, check_k, prepare, shared_compute_kind,
};
use crate::error::{ensure, Result};
use crate::loss::checks::check_same_device;

/// The `k` largest entries of every row of `s` (b x n, `k <= n`) and their
/// column indices, ordered by (-value, column). Exact under ties: a row whose
/// k-th value also occurs outside the set `topk` returned gets the tied
/// columns with the smallest indices.
pub(crate) fn topk_ordered(s: &Tensor, k: i64) -> Result<(Tensor, Tensor)> {
    let (mut vals, mut idx) = s.f_topk(k, 1, true, true)?;
    let kth = vals.narrow(1, k - 1, 1);
    // Rows with more entries >= the k-th value than k: the tie at the k-th
    // place extends beyond the set, whose tied members may be the wrong ones.
    let at_least = s.ge_tensor(&kth).sum_dim_intlist(1, false, Kind::Int64);
    let rows = at_least.gt(k).nonzero().reshape([-1]);
    if rows.size()[0] > 0 {
        let sr = s.index_select(0, &rows);
        let kr = kth.index_select(0, &rows);
        let above = sr.gt_tensor(&kr);
        let tied = sr.eq_tensor(&kr);
        let room = above
            .sum_dim_intlist(1, true, Kind::Int64)
            .neg()
            .g_add_scalar(k);
        // Everything above the k-th value, then the first `room` tied columns.
        let keep =
            above.logical_or(&tied.logical_and(&tied.cumsum(1, Kind::Int64).le_tensor(&room)));
        let cols = keep.nonzero().select(1, 1).reshape([-1, k]);
        let v = sr.gather(1, &cols, false);
        vals = vals.index_copy(0, &rows, &v);
        idx = idx.index_copy(0, &rows, &cols);
    }
    // Order by (-value, index): by index first, then a stable sort by value.
    let (idx, perm) = idx.sort(1, false);
    let vals = vals.gather(1, &perm, false);
    let (vals, perm) = vals.sort_stable(true, 1, true);
    let idx = idx.gather(1, &perm, false);
    Ok((vals, idx))
}

/// Options of [`knn`].
#[derive(Clone, Debug, PartialEq)]
pub struct KnnOptions {
    /// L2-normalise the rows first (cosine similarity).
    pub normalize: bool,
    /// Query rows per block; `None` keeps a block of similarities near 128 MiB.
    pub batch_size: Option<i64>,
}

impl Default for KnnOptions {
    fn default() -> Self {
        KnnOptions {
            normalize: true,
            batch_size: None,
        }
    }
}

/// The `k` nearest neighbours of every query among the rows of `embeddings`
/// (the gallery) by inner product (cosine with `normalize`), ordered by
/// (-similarity, index). Without `query`, every row of `embeddings` searches
/// the other rows (itself excluded). Returns the similarities (m x k, float32
/// or float64) and the gallery indices (m x k, int64) on the embeddings'
/// device. Memory is O(batch_size x n + m x k).
pub fn knn(
    embeddings: &Tensor,
    query: Option<&Tensor>,
    k: i64,
    opts: &KnnOptions,
) -> Result<(Tensor, Tensor)> {
    let _guard = tch::no_grad_guard();
    let same_set = query.is_none();
    check_embeddings(embeddings, "embeddings", if same_set { 2 } else { 1 })?;
    if let Some(q) = query {
        check_query_like(q, "query_embeddings", embeddings, "embeddings", 1)?;
    }
    check_batch_size(opts.batch_size)?;
    let kind = shared_compute_kind(embeddings, query);
    let g = prepare(embeddings, kind, opts.normalize);
    let q = match query {
        Some(q) => prepare(q, kind, opts.normalize),
        None => g.shallow_clone(),
    };
    let n = g.size()[0];
    let available = if same_set { n - 1 } else { n };
    check_k(k, available, "the number of gallery items per query")?;
    let rows = block_rows(opts.batch_size, n, q.kind());
    let tiles = tile_kind(kind, q.device());
    let (qt, gt) = (q.to_kind(tiles), g.to_kind(tiles));
    let (v, i) = match tiles {
        Kind::Float => knn_typed::<f32>(&qt, &gt, same_set, k, rows, kind)?,
        _ => knn_typed::<f64>(&qt, &gt, same_set, k, rows, kind)?,
    };
    Ok((v.to_kind(kind), i))
}

/// [`knn`] of prepared `q` and `g` of `T`'s dtype, `rows` queries a block,
/// similarities in `kind` (the compute dtype; `T` is float64 when float32
/// products would be in reduced precision).
fn knn_typed<T: Sim>(
    q: &Tensor,
    g: &Tensor,
    same_set: bool,
    k: i64,
    rows: i64,
    kind: Kind,
) -> Result<(Tensor, Tensor)> {
    let host = HostRows::new(q, g);
    let exact = host.rows::<T>()?;
    let m = q.size()[0];
    let (mut vals, mut idx) = (Vec::with_capacity((m * k) as usize), Vec::new());
    let mut start = 0;
    while start < m {
        let len = rows.min(m - start);
        let s = q.narrow(0, start, len).matmul(&g.tr());
        // Query r of the block is gallery item start + r: never itself.
        let itself = same_set.then(|| {
            let mask = Tensor::zeros(s.size(), (Kind::Bool, s.device()));
            let _ = mask.diagonal(start, 0, 1).fill_(1);
            mask
        });
        let caps = vec![k as usize; len as usize];
        let round_f32 = kind == Kind::Float;
        for row in best_by_exact(
            &exact,
            &s,
            itself.as_ref(),
            start as usize,
            &caps,
            round_f32,
        )? {
            for (v, j) in row {
                vals.push(T::from_f64(v));
                idx.push(j);
            }
        }
        start += len;
    }
    let device = q.device();
    Ok((
        Tensor::from_slice(&vals).reshape([m, k]).to_device(device),
        Tensor::from_slice(&idx).reshape([m, k]).to_device(device),
    ))
}

/// A query set `q` (argument `arg`) matches the gallery `g` (argument
/// `g_arg`) in width and device, and has at least `min_rows` rows.
pub(crate) fn check_query_like(
    q: &Tensor,
    arg: &str,
    g: &Tensor,
    g_arg: &str,
    min_rows: i64,
) -> Result<()> {
    check_embeddings(q, arg, min_rows)?;
    ensure(
        q.size()[1] == g.size()[1],
        arg,
        || format!("{} columns", q.size()[1]),
        format!("as many columns as {g_arg} ({})", g.size()[1]),
    )?;
    check_same_device(g_arg, g, &[(arg, q)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::input::host_vec;
    use crate::rng::Rng;

    /// Top-k of each row by sorting all of it by (-value, index).
    fn brute(s: &[f64], n: usize, k: usize) -> Vec<(f64, i64)> {
        s.chunks(n)
            .flat_map(|row| {
                let mut v: Vec<(f64, i64)> = row
                    .iter()
                    .enumerate()
                    .map(|(j, &x)| (x, j as i64))
                    .collect();
                v.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
                v.truncate(k);
                v
            })
            .collect()
    }

    #[test]
    fn topk_breaks_ties_by_index() {
        let mut rng = Rng::new(5);
        let (b, n) = (40usize, 30usize);
        // Few distinct values: many ties, also across the k-th place.
        let s: Vec<f64> = (0..b * n).map(|_| rng.below(4) as f64).collect();
        let t = Tensor::from_slice(&s).reshape([b as i64, n as i64]);
        for k in [1usize, 3, 7, 30] {
            let (v, i) = topk_ordered(&t, k as i64).unwrap();
            let got: Vec<(f64, i64)> = host_vec::<f64>(&v)
                .unwrap()
                .into_iter()
                .zip(host_vec::<i64>(&i).unwrap())
                .collect();
            assert_eq!(got, brute(&s, n, k), "k = {k}");
        }
    }

    #[test]
    fn knn_matches_brute_force_in_both_modes() {
        let mut rng = Rng::new(9);
        let (n, m, d) = (23i64, 9i64, 3i64);
        let x: Vec<f64> = (0..n * d).map(|_| rng.below(3) as f64 - 1.0).collect();
        let qv: Vec<f64> = (0..m * d).map(|_| rng.below(3) as f64 - 1.0).collect();
        let g = Tensor::from_slice(&x).reshape([n, d]);
        let q = Tensor::from_slice(&qv).reshape([m, d]);
        let opts = KnnOptions {
            normalize: false,
            batch_size: Some(4),
        };
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        // `knn` of the rows `queries` (`query`; the gallery itself, self
        // excluded, when None) against the brute force.
        let check = |query: Option<&Tensor>, queries: &[f64], k: i64| {
            let (v, i) = knn(&g, query, k, &opts).unwrap();
            let mut s = Vec::new();
            for (r, a) in queries.chunks(d as usize).enumerate() {
                for (c, b) in x.chunks(d as usize).enumerate() {
                    let self_pair = query.is_none() && r == c;
                    s.push(if self_pair {
                        f64::NEG_INFINITY
                    } else {
                        dot(a, b)
                    });
                }
            }
            let want = brute(&s, n as usize, k as usize);
            let got: Vec<(f64, i64)> = host_vec::<f64>(&v)
                .unwrap()
                .into_iter()
                .zip(host_vec::<i64>(&i).unwrap())
                .collect();
            assert_eq!(got, want);
        };
        check(Some(&q), &qv, 5);
        check(None, &x, 4);
        let e = knn(&g, None, 23, &opts).unwrap_err().to_string();
        assert!(e.starts_with("k: expected 1 <= k <= 22"), "{e}");
    }
}
