//! Recall@K, MAP@R and R-Precision from a scan of the similarities.
//!
//! Query i ranks the gallery by (-similarity, index), itself excluded when
//! the gallery is the query set. Its R positives are the gallery items of its
//! class. None of the metrics needs the full ranking:
//!
//! * Recall@K only needs the rank of the best positive, 1 + the number of
//!   other-class items ranked before it: a count over the gallery, for every
//!   K at once, however large K is.
//! * MAP@R and R-Precision only look at the first R places. The rank of the
//!   m-th positive is m + the number of other-class items before it, and
//!   those that matter are among the R best other-class items.
//!
//! So a scan keeps per query one counter and a list of at most R items, and
//! memory stays O(block x n + sum of R) for any K, never n x n.

use tch::{Device, Kind, Tensor};

use super::input::{elt_size, BLOCK_BYTES};
use super::positives::{positives, rank_order, Positives};
use super::scan_cpu::scan_cpu;
use super::scan_torch::scan_torch;
use crate::error::Result;

/// What a scan has to collect.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Need {
    /// Other-class items before the best positive (Recall@K).
    pub count: bool,
    /// The R best other-class items (MAP@R, R-Precision).
    pub negatives: bool,
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
    /// The R best other-class items (similarity, index), best first; empty
    /// unless [`Need::negatives`].
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
/// prepared `gallery`, or against each other when `gallery` is `None`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn retrieval(
    q: &Tensor,
    yq: &[i64],
    gallery: Option<(&Tensor, &[i64])>,
    ks: &[i64],
    need: Need,
    batch_size: Option<i64>,
    strategy: Strategy,
) -> Result<Retrieval> {
    let same_set = gallery.is_none();
    let (g, yg) = gallery.unwrap_or((q, yq));
    let pos = positives(q, yq, g, yg, same_set, batch_size)?;
    let strategy = match strategy {
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
        need,
    };
    let scan = match strategy {
        Strategy::Cpu { symmetric } => {
            scan_cpu(input, cpu_tile(batch_size, q.kind()), symmetric && same_set)?
        }
        _ => scan_torch(input, batch_size)?,
    };
    Ok(finish(&pos, &scan, ks, need))
}

/// Averages over the queries. Recall@K counts every query (one without
/// positives is a miss); MAP@R and R-Precision leave out the queries without
/// positives and report how many.
fn finish(pos: &super::positives::Positives, scan: &ScanOut, ks: &[i64], need: Need) -> Retrieval {
    let m = pos.offsets.len() - 1;
    let mut hits = vec![0usize; ks.len()];
    let (mut map, mut rp, mut left_out) = (0.0f64, 0.0f64, 0usize);
    for i in 0..m {
        let r = pos.r(i);
        if r == 0 {
            left_out += 1;
            continue;
        }
        if need.count {
            for (h, &k) in hits.iter_mut().zip(ks) {
                if scan.before[i] < k as u64 {
                    *h += 1;
                }
            }
        }
        if need.negatives {
            let (ap, found) = average_precision(pos, i, &scan.negatives[i]);
            map += ap / r as f64;
            rp += found as f64 / r as f64;
        }
    }
    let scored = m - left_out;
    let mean = |total: f64| {
        if scored == 0 {
            f64::NAN
        } else {
            total / scored as f64
        }
    };
    Retrieval {
        recall: ks
            .iter()
            .zip(&hits)
            .map(|(&k, &h)| (k, h as f64 / m as f64))
            .collect(),
        map_at_r: mean(map),
        r_precision: mean(rp),
        left_out,
    }
}

/// Sum over the positives in the first R places of (positives up to it) /
/// (its rank), and how many positives are there. `negs` are the R best
/// other-class items, best first.
fn average_precision(
    pos: &super::positives::Positives,
    i: usize,
    negs: &[(f64, i64)],
) -> (f64, usize) {
    let r = pos.r(i);
    let (mut sum, mut found, mut before) = (0.0, 0usize, 0usize);
    for (m, p) in pos.of(i).enumerate() {
        while before < negs.len() && rank_order(&negs[before], &p).is_lt() {
            before += 1;
        }
        // With all R kept items ahead the true count is >= R: out of reach.
        let rank = m + 1 + before;
        if rank > r {
            break;
        }
        found += 1;
        sum += found as f64 / rank as f64;
    }
    (sum, found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The definitions, on a full similarity matrix.
    fn brute(
        q: &[f64],
        yq: &[i64],
        g: &[f64],
        yg: &[i64],
        d: usize,
        same: bool,
        ks: &[i64],
    ) -> Retrieval {
        let m = yq.len();
        let mut recall = vec![0.0; ks.len()];
        let (mut map, mut rp, mut left) = (0.0, 0.0, 0);
        for i in 0..m {
            let a = &q[i * d..(i + 1) * d];
            let mut order: Vec<(f64, i64)> = (0..yg.len())
                .filter(|&j| !(same && j == i))
                .map(|j| {
                    let b = &g[j * d..(j + 1) * d];
                    (a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>(), j as i64)
                })
                .collect();
            order.sort_by(rank_order);
            let rel: Vec<bool> = order
                .iter()
                .map(|&(_, j)| yg[j as usize] == yq[i])
                .collect();
            for (slot, &k) in recall.iter_mut().zip(ks) {
                if rel[..k as usize].iter().any(|&x| x) {
                    *slot += 1.0 / m as f64;
                }
            }
            let r = rel.iter().filter(|&&x| x).count();
            if r == 0 {
                left += 1;
                continue;
            }
            let (mut hits, mut ap) = (0usize, 0.0);
            for (t, &x) in rel[..r].iter().enumerate() {
                if x {
                    hits += 1;
                    ap += hits as f64 / (t + 1) as f64;
                }
            }
            map += ap / r as f64;
            rp += hits as f64 / r as f64;
        }
        let scored = (m - left) as f64;
        Retrieval {
            recall: ks.iter().copied().zip(recall).collect(),
            map_at_r: map / scored,
            r_precision: rp / scored,
            left_out: left,
        }
    }

    fn close(a: &Retrieval, b: &Retrieval) {
        assert_eq!(a.left_out, b.left_out);
        assert_eq!(a.recall.len(), b.recall.len());
        for ((k1, x), (k2, y)) in a.recall.iter().zip(&b.recall) {
            assert_eq!(k1, k2);
            assert!((x - y).abs() < 1e-12, "recall@{k1}: {x} vs {y}");
        }
        assert!((a.map_at_r - b.map_at_r).abs() < 1e-12, "{a:?} vs {b:?}");
        assert!(
            (a.r_precision - b.r_precision).abs() < 1e-12,
            "{a:?} vs {b:?}"
        );
    }

    /// Small integer vectors: many exact ties. Classes of 1 to 6 items.
    fn data(rng: &mut Rng, n: usize, d: usize, classes: u64) -> (Vec<f64>, Vec<i64>) {
        let x = (0..n * d).map(|_| rng.below(3) as f64 - 1.0).collect();
        let y = (0..n).map(|_| rng.below(classes) as i64 * 3 - 7).collect();
        (x, y)
    }

    const ALL: Need = Need {
        count: true,
        negatives: true,
    };

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
            let want = brute(&x, &y, &x, &y, d, true, &ks);
            let qks = [1, 3, n as i64];
            let want_q = brute(&qx, &qy, &x, &y, d, false, &qks);
            for s in strategies {
                for batch in [Some(1), Some(4), Some(13), None] {
                    let got = retrieval(&xt, &y, None, &ks, ALL, batch, s).unwrap();
                    close(&got, &want);
                    let got = retrieval(&qt, &qy, Some((&xt, &y)), &qks, ALL, batch, s).unwrap();
                    close(&got, &want_q);
                }
            }
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
        let a = retrieval(
            &xt,
            &y,
            None,
            &ks,
            ALL,
            Some(64),
            Strategy::Cpu { symmetric: true },
        )
        .unwrap();
        let b = retrieval(&xt, &y, None, &ks, ALL, Some(50), Strategy::Torch).unwrap();
        close(&a, &b);
    }

    #[test]
    fn only_what_is_needed_is_collected() {
        let mut rng = Rng::new(8);
        let (x, y) = data(&mut rng, 40, 3, 12);
        let xt = Tensor::from_slice(&x).reshape([40, 3]);
        let want = brute(&x, &y, &x, &y, 3, true, &[1, 3]);
        for s in [Strategy::Cpu { symmetric: true }, Strategy::Torch] {
            let only_recall = Need {
                count: true,
                negatives: false,
            };
            let got = retrieval(&xt, &y, None, &[1, 3], only_recall, Some(8), s).unwrap();
            for ((k1, a), (k2, b)) in got.recall.iter().zip(&want.recall) {
                assert_eq!(k1, k2);
                assert!((a - b).abs() < 1e-12);
            }
            let only_map = Need {
                count: false,
                negatives: true,
            };
            let got = retrieval(&xt, &y, None, &[], only_map, Some(8), s).unwrap();
            assert!((got.map_at_r - want.map_at_r).abs() < 1e-12);
        }
    }
}
