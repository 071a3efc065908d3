//! Recall@K, Precision@K, mAP@K, MAP@R and R-Precision from a scan of the
//! similarities.
//!
//! Query i ranks the gallery by (-similarity, index), itself excluded when
//! the gallery is the query set. Its R positives are the gallery items of its
//! class. None of the metrics needs the full ranking:
//!
//! * Recall@K only needs the rank of the best positive, 1 + the number of
//!   other-class items ranked before it: a count over the gallery, for every
//!   K at once, however large K is.
//! * MAP@R and R-Precision only look at the first R places, Precision@K and
//!   mAP@K at the first K. The rank of the m-th positive is m + the number
//!   of other-class items before it, and those that matter are among the
//!   max(R, K) best other-class items ([`Need::cap`]).
//!
//! So a scan keeps per query one counter and a list of at most max(R, K)
//! items, and memory stays O(block x n + sum of max(R, K)), never n x n.

use tch::{Device, Kind, Tensor};

use super::input::{elt_size, BLOCK_BYTES};
use std::collections::BTreeMap;

use super::exact::{tile_kind, HostRows, Sim};
use super::positives::{positives, rank_order, Own, Positives};
use super::scan_cpu::scan_cpu;
use super::scan_torch::scan_torch;
use crate::error::{Error, Result};

/// What a scan has to collect.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Need {
    /// Other-class items before the best positive (Recall@K).
    pub count: bool,
    /// The R best other-class items (MAP@R, R-Precision).
    pub negatives: bool,
    /// The `top` best other-class items (Precision@K and mAP@K, K <= top).
    pub top: usize,
}

impl Need {
    /// How many of the best other-class items to keep for a query with `r`
    /// positives.
    pub fn cap(&self, r: usize) -> usize {
        (if self.negatives { r } else { 0 }).max(self.top)
    }

    /// Whether other-class items are kept at all.
    pub fn collects(&self) -> bool {
        self.negatives || self.top > 0
    }
}

/// How per-query values are averaged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Average {
    /// The mean over the queries.
    #[default]
    Query,
    /// The mean over the classes of the mean over their queries.
    Class,
}

impl Average {
    /// Parses `"query" | "class"`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "query" => Ok(Average::Query),
            "class" => Ok(Average::Class),
            other => Err(crate::error::not_one_of(
                "average",
                other,
                &["query", "class"],
            )),
        }
    }
}

/// What [`retrieval`] computes: Recall@K for `ks`, Precision@K and mAP@K
/// for `top_ks` (with [`Need::top`] their largest), averaged by `average`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Request<'a> {
    pub ks: &'a [i64],
    pub top_ks: &'a [i64],
    pub need: Need,
    pub average: Average,
    pub batch_size: Option<i64>,
    pub strategy: Strategy,
}

/// What a scan reads: prepared queries `q` (labels `yq`) and the prepared
/// gallery `g` (labels `yg`) on one device, the queries' positives in `g`,
/// and what to collect.
#[derive(Clone, Copy)]
pub(crate) struct ScanInput<'a> {
    pub q: &'a Tensor,
    pub yq: &'a [i64],
    pub g: &'a Tensor,
    pub yg: &'a [i64],
    pub pos: &'a Positives,
    pub need: Need,
}

/// What a scan collected, per query.
#[derive(Debug, Default)]
pub(crate) struct ScanOut {
    /// Other-class items ranked before the best positive.
    pub before: Vec<u64>,
    /// The [`Need::cap`] best other-class items (similarity, index), best
    /// first; empty unless [`Need::collects`].
    pub negatives: Vec<Vec<(f64, i64)>>,
}

/// Which scan to run; `Auto` picks by device, the others are for tests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Strategy {
    Auto,
    /// The fused CPU scan; `symmetric` only applies to the same-set case.
    Cpu {
        symmetric: bool,
    },
    /// libtorch ops (any device).
    Torch,
}

/// The retrieval metrics of one evaluation.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Retrieval {
    pub recall: Vec<(i64, f64)>,
    pub precision: Vec<(i64, f64)>,
    pub map_at_k: Vec<(i64, f64)>,
    pub map_at_r: f64,
    pub r_precision: f64,
    pub left_out: usize,
}

/// Tile side of the CPU scan: tiles of [`BLOCK_BYTES`] / 8 (2048 x 2048 in
/// float32) are large enough for the matrix product to run at full speed
/// and small enough to stay in cache between the passes that read them.
fn cpu_tile(batch_size: Option<i64>, kind: Kind) -> i64 {
    batch_size.unwrap_or_else(|| ((BLOCK_BYTES / 8 / elt_size(kind)) as f64).sqrt() as i64)
}

/// The retrieval metrics of prepared queries `q` (labels `yq`) against the
/// prepared `gallery`, or against each other when `gallery` is `None`; each
/// query's `own` entry in the gallery (see [`Own`]) is left out.
pub(crate) fn retrieval(
    q: &Tensor,
    yq: &[i64],
    gallery: Option<(&Tensor, &[i64])>,
    own: Own<'_>,
    req: Request<'_>,
) -> Result<Retrieval> {
    let same_set = gallery.is_none();
    let own = if same_set { Own::Itself } else { own };
    let (g, yg) = gallery.unwrap_or((q, yq));
    let kind = tile_kind(q.kind(), q.device());
    let (q, g) = (q.to_kind(kind), g.to_kind(kind));
    let sets = Sets {
        q: &q,
        yq,
        g: &g,
        yg,
        same_set,
        own,
    };
    match kind {
        Kind::Float => retrieval_typed::<f32>(sets, req),
        Kind::Double => retrieval_typed::<f64>(sets, req),
        k => Err(Error::invalid(
            "embeddings",
            format!("dtype {k:?}"),
            "float32 or float64 after preparation",
        )),
    }
}

/// Prepared queries and gallery (of one dtype, on one device) with their
/// labels, and each query's own entry in the gallery.
#[derive(Clone, Copy)]
struct Sets<'a> {
    q: &'a Tensor,
    yq: &'a [i64],
    g: &'a Tensor,
    yg: &'a [i64],
    same_set: bool,
    own: Own<'a>,
}

fn retrieval_typed<T: Sim>(sets: Sets<'_>, req: Request<'_>) -> Result<Retrieval> {
    let Sets {
        q,
        yq,
        g,
        yg,
        same_set,
        own,
    } = sets;
    let host = HostRows::new(q, g);
    let exact = host.rows::<T>()?;
    let pos = positives(&exact, yq, yg, own);
    let strategy = match req.strategy {
        Strategy::Auto if q.device() == Device::Cpu => Strategy::Cpu { symmetric: true },
        Strategy::Auto => Strategy::Torch,
        s => s,
    };
    let input = ScanInput {
        q,
        yq,
        g,
        yg,
        pos: &pos,
        need: req.need,
    };
    let scan = match strategy {
        Strategy::Cpu { symmetric } => scan_cpu(
            input,
            &exact,
            cpu_tile(req.batch_size, q.kind()),
            symmetric && same_set,
        )?,
        _ => scan_torch(input, &exact, req.batch_size)?,
    };
    Ok(finish(&pos, &scan, yq, req))
}

/// A mean over queries, or over classes of the mean over their queries.
struct Mean {
    average: Average,
    classes: BTreeMap<i64, (f64, usize)>,
}

impl Mean {
    fn new(average: Average) -> Self {
        Mean {
            average,
            classes: BTreeMap::new(),
        }
    }

    fn add(&mut self, class: i64, value: f64) {
        let key = if self.average == Average::Class {
            class
        } else {
            0
        };
        let e = self.classes.entry(key).or_insert((0.0, 0));
        e.0 += value;
        e.1 += 1;
    }

    /// NaN when nothing was added.
    fn get(&self) -> f64 {
        if self.classes.is_empty() {
            return f64::NAN;
        }
        let sum: f64 = self.classes.values().map(|&(s, c)| s / c as f64).sum();
        sum / self.classes.len() as f64
    }
}

/// Averages over the queries (or classes). Recall@K counts every query (one
/// without positives is a miss); the other metrics leave out the queries
/// without positives and report how many.
fn finish(pos: &Positives, scan: &ScanOut, yq: &[i64], req: Request<'_>) -> Retrieval {
    let (need, avg) = (req.need, req.average);
    let mut recall: Vec<Mean> = req.ks.iter().map(|_| Mean::new(avg)).collect();
    let mut precision: Vec<Mean> = req.top_ks.iter().map(|_| Mean::new(avg)).collect();
    let mut map_k: Vec<Mean> = req.top_ks.iter().map(|_| Mean::new(avg)).collect();
    let (mut map, mut rp) = (Mean::new(avg), Mean::new(avg));
    let mut left_out = 0usize;
    for (i, &y) in yq.iter().enumerate() {
        let r = pos.r(i);
        if need.count {
            for (mean, &k) in recall.iter_mut().zip(req.ks) {
                let hit = r > 0 && scan.before[i] < k as u64;
                mean.add(y, if hit { 1.0 } else { 0.0 });
            }
        }
        if r == 0 {
            left_out += 1;
            continue;
        }
        let negs: &[(f64, i64)] = if need.collects() {
            &scan.negatives[i]
        } else {
            &[]
        };
        let ranks = positive_ranks(pos, i, negs, need.cap(r));
        if need.negatives {
            let (ap, found) = average_precision(&ranks, r);
            map.add(y, ap / r as f64);
            rp.add(y, found as f64 / r as f64);
        }
        for ((p, mk), &k) in precision.iter_mut().zip(map_k.iter_mut()).zip(req.top_ks) {
            let (ap, found) = average_precision(&ranks, k as usize);
            let scale = (k as usize).min(r) as f64;
            p.add(y, found as f64 / scale);
            mk.add(y, ap / scale);
        }
    }
    let values = |ks: &[i64], means: &[Mean]| -> Vec<(i64, f64)> {
        ks.iter().zip(means).map(|(&k, m)| (k, m.get())).collect()
    };
    Retrieval {
        recall: values(req.ks, &recall),
        precision: values(req.top_ks, &precision),
        map_at_k: values(req.top_ks, &map_k),
        map_at_r: map.get(),
        r_precision: rp.get(),
        left_out,
    }
}

/// The ranks (1-based) of query `i`'s positives, in order, up to `limit`,
/// the number of other-class items kept for it (`negs`, best first): a rank
/// up to `limit` is exact, and with all kept items ahead the true rank is
/// beyond it.
fn positive_ranks(pos: &Positives, i: usize, negs: &[(f64, i64)], limit: usize) -> Vec<usize> {
    let mut ranks = Vec::new();
    let mut before = 0usize;
    for (m, p) in pos.of(i).enumerate() {
        while before < negs.len() && rank_order(&negs[before], &p).is_lt() {
            before += 1;
        }
        let rank = m + 1 + before;
        if rank > limit {
            break;
        }
        ranks.push(rank);
    }
    ranks
}

/// Over the positives in the first `k` places: the sum of (positives up to
/// it) / (its rank), and how many there are.
fn average_precision(ranks: &[usize], k: usize) -> (f64, usize) {
    let mut sum = 0.0;
    let mut found = 0usize;
    for &rank in ranks.iter().take_while(|&&rank| rank <= k) {
        found += 1;
        sum += found as f64 / rank as f64;
    }
    (sum, found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::exact::dot;
    use crate::rng::Rng;

    /// The definitions, on a full similarity matrix of [`dot`]s: each query
    /// ranks the gallery but its own entry, by (-similarity, index).
    #[allow(clippy::too_many_arguments)]
    fn brute(
        q: &[f64],
        yq: &[i64],
        g: &[f64],
        yg: &[i64],
        d: usize,
        own: Own<'_>,
        ks: &[i64],
        average: Average,
    ) -> Retrieval {
        let mut recall: Vec<Mean> = ks.iter().map(|_| Mean::new(average)).collect();
        let mut prec: Vec<Mean> = ks.iter().map(|_| Mean::new(average)).collect();
        let mut mapk: Vec<Mean> = ks.iter().map(|_| Mean::new(average)).collect();
        let (mut map, mut rp, mut left) = (Mean::new(average), Mean::new(average), 0);
        for (i, &y) in yq.iter().enumerate() {
            let a = &q[i * d..(i + 1) * d];
            let mut order: Vec<(f64, i64)> = (0..yg.len() as i64)
                .filter(|&j| own.of(i as i64) != Some(j))
                .map(|j| {
                    let b = &g[j as usize * d..(j as usize + 1) * d];
                    (dot(a, b), j)
                })
                .collect();
            order.sort_by(rank_order);
            let rel: Vec<bool> = order.iter().map(|&(_, j)| yg[j as usize] == y).collect();
            for (slot, &k) in recall.iter_mut().zip(ks) {
                let hit = rel[..k as usize].iter().any(|&x| x);
                slot.add(y, if hit { 1.0 } else { 0.0 });
            }
            let r = rel.iter().filter(|&&x| x).count();
            if r == 0 {
                left += 1;
                continue;
            }
            // AP over the first `k` places, and the positives there.
            let ap = |k: usize| {
                let (mut hits, mut sum) = (0usize, 0.0);
                for (t, &x) in rel[..k].iter().enumerate() {
                    if x {
                        hits += 1;
                        sum += hits as f64 / (t + 1) as f64;
                    }
                }
                (sum, hits)
            };
            let (sum, hits) = ap(r);
            map.add(y, sum / r as f64);
            rp.add(y, hits as f64 / r as f64);
            for ((p, mk), &k) in prec.iter_mut().zip(mapk.iter_mut()).zip(ks) {
                let (sum, hits) = ap(k as usize);
                let scale = (k as usize).min(r) as f64;
                p.add(y, hits as f64 / scale);
                mk.add(y, sum / scale);
            }
        }
        let values = |means: &[Mean]| -> Vec<(i64, f64)> {
            ks.iter().zip(means).map(|(&k, m)| (k, m.get())).collect()
        };
        Retrieval {
            recall: values(&recall),
            precision: values(&prec),
            map_at_k: values(&mapk),
            map_at_r: map.get(),
            r_precision: rp.get(),
            left_out: left,
        }
    }

    fn close(a: &Retrieval, b: &Retrieval) {
        assert_eq!(a.left_out, b.left_out);
        for (x, y) in [
            (&a.recall, &b.recall),
            (&a.precision, &b.precision),
            (&a.map_at_k, &b.map_at_k),
        ] {
            assert_eq!(x.len(), y.len());
            for ((k1, u), (k2, v)) in x.iter().zip(y) {
                assert_eq!(k1, k2);
                assert!((u - v).abs() < 1e-12, "@{k1}: {u} vs {v}");
            }
        }
        assert!((a.map_at_r - b.map_at_r).abs() < 1e-12, "{a:?} vs {b:?}");
        assert!(
            (a.r_precision - b.r_precision).abs() < 1e-12,
            "{a:?} vs {b:?}"
        );
    }

    /// A request for everything at `ks`.
    fn all(ks: &[i64], average: Average, batch: Option<i64>, strategy: Strategy) -> Request<'_> {
        Request {
            ks,
            top_ks: ks,
            need: Need {
                count: true,
                negatives: true,
                top: ks.iter().copied().max().unwrap_or(0) as usize,
            },
            average,
            batch_size: batch,
            strategy,
        }
    }

    /// Small integer vectors: many exact ties. Classes of 1 to 6 items.
    fn data(rng: &mut Rng, n: usize, d: usize, classes: u64) -> (Vec<f64>, Vec<i64>) {
        let x = (0..n * d).map(|_| rng.below(3) as f64 - 1.0).collect();
        let y = (0..n).map(|_| rng.below(classes) as i64 * 3 - 7).collect();
        (x, y)
    }

    #[test]
    fn every_scan_matches_the_definitions_under_ties() {
        let strategies = [
            Strategy::Cpu { symmetric: true },
            Strategy::Cpu { symmetric: false },
            Strategy::Torch,
        ];
        let mut rng = Rng::new(17);
        for trial in 0..6 {
            let (n, d) = (30 + 7 * trial, 2 + trial % 3);
            let (x, y) = data(&mut rng, n, d, 1 + n as u64 / 3);
            let (qx, qy) = data(&mut rng, 11, d, 1 + n as u64 / 3);
            let xt = Tensor::from_slice(&x).reshape([n as i64, d as i64]);
            let qt = Tensor::from_slice(&qx).reshape([11, d as i64]);
            let ks = [1, 2, 5, (n - 1) as i64];
            let qks = [1, 3, n as i64];
            for average in [Average::Query, Average::Class] {
                let want = brute(&x, &y, &x, &y, d, Own::Itself, &ks, average);
                let want_q = brute(&qx, &qy, &x, &y, d, Own::Nothing, &qks, average);
                for s in strategies {
                    for batch in [Some(1), Some(4), Some(13), None] {
                        let req = all(&ks, average, batch, s);
                        let got = retrieval(&xt, &y, None, Own::Nothing, req).unwrap();
                        close(&got, &want);
                        let req = all(&qks, average, batch, s);
                        let got = retrieval(&qt, &qy, Some((&xt, &y)), Own::Nothing, req).unwrap();
                        close(&got, &want_q);
                    }
                }
            }
        }
    }

    /// Queries that are gallery items (some of them) leave their own entry
    /// out; the gallery given twice equals the same-set evaluation.
    #[test]
    fn own_entries_are_left_out_of_the_ranking() {
        let mut rng = Rng::new(29);
        let (n, d) = (41, 3);
        let (x, y) = data(&mut rng, n, d, 9);
        let xt = Tensor::from_slice(&x).reshape([n as i64, d as i64]);
        let ks = [1, 2, 7, (n - 1) as i64];
        let at: Vec<i64> = (0..n as i64).collect();
        let same = retrieval(
            &xt,
            &y,
            None,
            Own::Nothing,
            all(&ks, Average::Query, None, Strategy::Auto),
        )
        .unwrap();
        for s in [Strategy::Cpu { symmetric: false }, Strategy::Torch] {
            let req = all(&ks, Average::Query, Some(8), s);
            let got = retrieval(&xt, &y, Some((&xt, &y)), Own::At(&at), req).unwrap();
            close(&got, &same);
        }
        // Every third query is in the gallery, at a shuffled place.
        let rows: Vec<usize> = (0..n).step_by(3).collect();
        let qx: Vec<f64> = rows
            .iter()
            .flat_map(|&i| x[i * d..(i + 1) * d].to_vec())
            .collect();
        let qy: Vec<i64> = rows.iter().map(|&i| y[i]).collect();
        let qt = Tensor::from_slice(&qx).reshape([rows.len() as i64, d as i64]);
        let at: Vec<i64> = rows
            .iter()
            .enumerate()
            .map(|(k, &i)| if k % 2 == 0 { i as i64 } else { -1 })
            .collect();
        let want = brute(&qx, &qy, &x, &y, d, Own::At(&at), &ks, Average::Class);
        for s in [Strategy::Cpu { symmetric: false }, Strategy::Torch] {
            let req = all(&ks, Average::Class, Some(5), s);
            let got = retrieval(&qt, &qy, Some((&xt, &y)), Own::At(&at), req).unwrap();
            close(&got, &want);
        }
    }

    #[test]
    fn float32_scans_agree_with_each_other() {
        let mut rng = Rng::new(3);
        let (n, d) = (300, 8);
        let x: Vec<f32> = (0..n * d).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let y: Vec<i64> = (0..n).map(|_| rng.below(40) as i64).collect();
        let xt = Tensor::from_slice(&x).reshape([n as i64, d as i64]);
        let ks = [1, 4, 16, 299];
        let cpu = all(
            &ks,
            Average::Query,
            Some(64),
            Strategy::Cpu { symmetric: true },
        );
        let a = retrieval(&xt, &y, None, Own::Nothing, cpu).unwrap();
        let torch = all(&ks, Average::Query, Some(50), Strategy::Torch);
        let b = retrieval(&xt, &y, None, Own::Nothing, torch).unwrap();
        close(&a, &b);
    }

    /// Equal rows of different classes are equal similarities, ranked by
    /// index, whatever the tiles: every scan at every block size gives the
    /// definitions' metrics.
    #[test]
    fn equal_float32_rows_tie_by_index_in_every_scan() {
        let mut rng = Rng::new(41);
        let (distinct, n, d) = (9usize, 80usize, 21usize);
        let rows: Vec<f32> = (0..distinct * d)
            .map(|_| rng.uniform(-1.0, 1.0) as f32)
            .collect();
        let pick = |rng: &mut Rng, count: usize| -> (Vec<f32>, Vec<i64>) {
            let mut x = Vec::with_capacity(count * d);
            for _ in 0..count {
                let r = rng.below(distinct as u64) as usize;
                x.extend_from_slice(&rows[r * d..(r + 1) * d]);
            }
            (x, (0..count).map(|_| rng.below(7) as i64).collect())
        };
        let (x, y) = pick(&mut rng, n);
        let (qx, qy) = pick(&mut rng, 23);
        let every = [Some(1), Some(3), Some(7), Some(16), Some(33), None];
        let ks = [1, 2, 8, (n - 1) as i64];
        every_scan_ranks_by_dot((&x, &y), (&qx, &qy), d, &ks, &every);
    }

    /// Every scan at every block size in `batches` gives the definitions'
    /// metrics (ranked by [`dot`]) for gallery `x` (labels `y`), in the
    /// same-set protocol and for queries `q`.
    fn every_scan_ranks_by_dot(
        (x, y): (&[f32], &[i64]),
        (q, qy): (&[f32], &[i64]),
        d: usize,
        ks: &[i64],
        batches: &[Option<i64>],
    ) {
        let wide = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| a as f64).collect() };
        let rows = |v: &[f32]| Tensor::from_slice(v).reshape([(v.len() / d) as i64, d as i64]);
        let (xt, qt) = (rows(x), rows(q));
        let (xw, qw) = (wide(x), wide(q));
        let want = brute(&xw, y, &xw, y, d, Own::Itself, ks, Average::Query);
        let want_q = brute(&qw, qy, &xw, y, d, Own::Nothing, ks, Average::Query);
        let strategies = [
            Strategy::Cpu { symmetric: true },
            Strategy::Cpu { symmetric: false },
            Strategy::Torch,
        ];
        for s in strategies {
            for &batch in batches {
                let req = all(ks, Average::Query, batch, s);
                let got = retrieval(&xt, y, None, Own::Nothing, req).unwrap();
                close(&got, &want);
                let got = retrieval(&qt, qy, Some((&xt, y)), Own::Nothing, req).unwrap();
                close(&got, &want_q);
            }
        }
    }

    /// float32 tiles of rows of norm 1e20 overflow (inf, and inf - inf =
    /// NaN); rows of norm 2^-69 against 2^-80 give subnormal products. Every
    /// scan still ranks by the exact similarities.
    #[test]
    fn tiles_beyond_float32s_range_rank_as_the_exact_similarities() {
        let mut rng = Rng::new(77);
        for scale in [1e20f64, 1e19, 2f64.powi(-72)] {
            let (n, d) = (40usize, 3usize);
            let x: Vec<f32> = (0..n * d)
                .map(|_| (rng.uniform(-1.0, 1.0) * scale) as f32)
                .collect();
            let y: Vec<i64> = (0..n).map(|_| rng.below(6) as i64).collect();
            let qx: Vec<f32> = (0..5 * d)
                .map(|_| (rng.uniform(-1.0, 1.0) * scale.max(2f64.powi(-8))) as f32)
                .collect();
            let qy: Vec<i64> = (0..5).map(|_| rng.below(6) as i64).collect();
            let ks = [1, 3, (n - 1) as i64];
            every_scan_ranks_by_dot((&x, &y), (&qx, &qy), d, &ks, &[Some(4), None]);
        }
    }

    #[test]
    fn only_what_is_needed_is_collected() {
        let mut rng = Rng::new(8);
        let (x, y) = data(&mut rng, 40, 3, 12);
        let xt = Tensor::from_slice(&x).reshape([40, 3]);
        let want = brute(&x, &y, &x, &y, 3, Own::Itself, &[1, 3], Average::Query);
        for s in [Strategy::Cpu { symmetric: true }, Strategy::Torch] {
            let only = |count: bool, negatives: bool, top: usize| Request {
                ks: if count { &[1, 3] } else { &[] },
                top_ks: if top > 0 { &[1, 3] } else { &[] },
                need: Need {
                    count,
                    negatives,
                    top,
                },
                average: Average::Query,
                batch_size: Some(8),
                strategy: s,
            };
            let got = retrieval(&xt, &y, None, Own::Nothing, only(true, false, 0)).unwrap();
            assert_eq!(got.recall, want.recall);
            let got = retrieval(&xt, &y, None, Own::Nothing, only(false, true, 0)).unwrap();
            assert!((got.map_at_r - want.map_at_r).abs() < 1e-12);
            let got = retrieval(&xt, &y, None, Own::Nothing, only(false, false, 3)).unwrap();
            for (a, b) in [
                (&got.precision, &want.precision),
                (&got.map_at_k, &want.map_at_k),
            ] {
                for ((_, u), (_, v)) in a.iter().zip(b) {
                    assert!((u - v).abs() < 1e-12, "{u} vs {v}");
                }
            }
        }
    }
}
