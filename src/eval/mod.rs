//! Evaluation of embeddings: retrieval (Recall@K, Precision@K, mAP@K, MAP@R,
//! R-Precision; per query or per class, [`Average`]) and clustering (NMI of
//! k-means) at any scale, on CPU or CUDA tensors.
//!
//! Definitions (the docstrings of `grouploss.metrics` repeat them):
//!
//! * Embeddings are L2-normalised unless `normalize` is off; neighbours are
//!   ranked by inner product (cosine similarity), larger first, ties broken
//!   by the smaller gallery index.
//! * Without a query set every sample queries all the others (itself
//!   excluded); with one, the queries search the gallery (`embeddings`).
//! * Recall@K: the fraction of queries with at least one same-class item
//!   among their K nearest. A query whose class has no other item counts as
//!   a miss.
//! * MAP@R and R-Precision (Musgrave et al., "A Metric Learning Reality
//!   Check", 2020): R is the number of same-class items in the gallery;
//!   `R-Precision = (same-class items in the first R) / R` and
//!   `MAP@R = (1/R) sum_{i <= R, item i same-class} precision@i`. Queries with
//!   R = 0 are left out of both and counted in [`Metrics::left_out`].
//! * Precision@K and mAP@K (open-metric-learning's): the same-class items
//!   among the first K over min(K, R), and the sum of precision@i at the
//!   same-class places i <= K over min(K, R); queries with R = 0 are left
//!   out as above.
//! * Each retrieval metric is the mean over the queries, or with
//!   [`Average::Class`] the mean over the classes of their queries' mean.
//! * NMI: k-means ([`kmeans()`]) of the query embeddings with k = the number of
//!   their classes, then [`nmi()`] of classes and clusters.
//!
//! Embeddings are prepared in float64 for float64 inputs and in float32
//! otherwise. Similarities are found in blocks of matrix products (memory
//! O(block x n + sum of max(R, K)), never n x n) and ranked by
//! `exact::dot`, so that no result depends on the blocks.

mod exact;
pub mod index;
pub(crate) mod input;
pub mod kmeans;
mod kmeans_cpu;
pub mod knn;
pub mod nmi;
mod positives;
mod retrieval;
mod scan_cpu;
mod scan_torch;

use std::collections::BTreeSet;

use tch::Tensor;

use crate::error::{at_least, ensure, Result};
use input::{check_batch_size, check_embeddings, labels_vec, prepare, shared_compute_kind};
use positives::Own;
use retrieval::{Need, Request, Strategy};

pub use retrieval::Average;

pub use index::Index;
pub use kmeans::{kmeans, kmeans_with, KMeans, KMeansOptions};
pub use knn::{knn, KnnOptions};
pub use nmi::nmi;

/// One metric of [`evaluate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Recall@K for every K of [`EvalOptions::ks`].
    Recall,
    /// MAP@R.
    MapAtR,
    /// R-Precision.
    RPrecision,
    /// NMI of k-means clusters.
    Nmi,
    /// Precision@K (open-metric-learning's) for every K of [`EvalOptions::ks`].
    Precision,
    /// mAP@K (open-metric-learning's) for every K of [`EvalOptions::ks`].
    MapAtK,
}

impl Metric {
    /// The metrics computed unless others are asked for.
    pub const DEFAULT: [Metric; 4] = [
        Metric::Recall,
        Metric::MapAtR,
        Metric::RPrecision,
        Metric::Nmi,
    ];

    /// Every metric.
    pub const ALL: [Metric; 6] = [
        Metric::Recall,
        Metric::Precision,
        Metric::MapAtK,
        Metric::MapAtR,
        Metric::RPrecision,
        Metric::Nmi,
    ];

    /// Parses `"recall" | "precision" | "map" | "map@r" | "r_precision" |
    /// "nmi"` (`"map_at_r"`, the spelling of 0.x, is accepted).
    pub fn parse(name: &str) -> Result<Self> {
        let name = if name == "map_at_r" { "map@r" } else { name };
        Metric::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                let names = Metric::ALL.map(|m| m.name());
                crate::error::not_one_of("include", name, &names)
            })
    }

    /// The name accepted by [`Metric::parse`].
    pub fn name(&self) -> &'static str {
        match self {
            Metric::Recall => "recall",
            Metric::MapAtR => "map@r",
            Metric::RPrecision => "r_precision",
            Metric::Nmi => "nmi",
            Metric::Precision => "precision",
            Metric::MapAtK => "map",
        }
    }

    /// Whether it is reported at every K of [`EvalOptions::ks`]
    /// (`recall@K`) rather than once (`map@r`).
    pub fn per_k(&self) -> bool {
        matches!(self, Metric::Recall | Metric::Precision | Metric::MapAtK)
    }

    /// Its key at cut-off `k` in [`Metrics::to_pairs`] (`recall@4`).
    fn key_at(&self, k: i64) -> String {
        format!("{}@{k}", self.name())
    }

    /// Its keys in [`Metrics::to_pairs`] for the cut-offs `ks`.
    pub fn keys(&self, ks: &[i64]) -> Vec<String> {
        if self.per_k() {
            ks.iter().map(|&k| self.key_at(k)).collect()
        } else {
            vec![self.name().to_string()]
        }
    }

    /// The metric reported under `key` for the cut-offs `ks`, if any.
    pub fn reporting(key: &str, ks: &[i64]) -> Option<Metric> {
        Metric::ALL
            .into_iter()
            .find(|m| m.keys(ks).iter().any(|k| k == key))
    }
}

/// Options of [`evaluate`].
#[derive(Clone, Debug, PartialEq)]
pub struct EvalOptions {
    /// The K of Recall@K, Precision@K and mAP@K.
    pub ks: Vec<i64>,
    /// The metrics to compute.
    pub include: Vec<Metric>,
    /// L2-normalise the embeddings first (cosine similarity).
    pub normalize: bool,
    /// Rows per block of similarities (the side of a square tile on CPU) and
    /// of k-means distances; `None` picks them from a memory budget: 2048 x
    /// 2048 float32 tiles on CPU, blocks near 128 MiB elsewhere.
    pub batch_size: Option<i64>,
    /// Seed of k-means.
    pub seed: u64,
    /// k-means runs for NMI (the lowest inertia wins).
    pub kmeans_n_init: usize,
    /// Lloyd iterations for NMI at most.
    pub kmeans_max_iter: usize,
    /// Retrieval metrics averaged over the queries or over the classes.
    pub average: Average,
}

impl Default for EvalOptions {
    /// Recall@1/2/4/8, MAP@R, R-Precision and NMI of normalised embeddings,
    /// k-means with scikit-learn's defaults (1 run, 300 iterations).
    fn default() -> Self {
        EvalOptions {
            ks: vec![1, 2, 4, 8],
            include: Metric::DEFAULT.to_vec(),
            normalize: true,
            batch_size: None,
            seed: 0,
            kmeans_n_init: 1,
            kmeans_max_iter: 300,
            average: Average::Query,
        }
    }
}

impl EvalOptions {
    fn wants(&self, m: Metric) -> bool {
        self.include.contains(&m)
    }
}

/// The result of [`evaluate`]: the metrics that were asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    /// `(K, Recall@K)` in the order of [`EvalOptions::ks`].
    pub recall: Vec<(i64, f64)>,
    /// `(K, Precision@K)`, likewise.
    pub precision: Vec<(i64, f64)>,
    /// `(K, mAP@K)`, likewise.
    pub map_at_k: Vec<(i64, f64)>,
    pub map_at_r: Option<f64>,
    pub r_precision: Option<f64>,
    pub nmi: Option<f64>,
    /// Queries evaluated.
    pub num_queries: usize,
    /// Queries left out of MAP@R, R-Precision, Precision@K and mAP@K: no
    /// other item of their class in the gallery. (When all are, those
    /// metrics are NaN.)
    pub left_out: usize,
}

impl Metrics {
    /// `(key, value)` pairs in a fixed order: `recall@K`, `precision@K`,
    /// `map@K` for every K, then `map@r`, `r_precision`, `nmi`, each if
    /// computed.
    pub fn to_pairs(&self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = Vec::new();
        for (metric, values) in [
            (Metric::Recall, &self.recall),
            (Metric::Precision, &self.precision),
            (Metric::MapAtK, &self.map_at_k),
        ] {
            out.extend(values.iter().map(|&(k, v)| (metric.key_at(k), v)));
        }
        for (metric, v) in [
            (Metric::MapAtR, self.map_at_r),
            (Metric::RPrecision, self.r_precision),
            (Metric::Nmi, self.nmi),
        ] {
            if let Some(v) = v {
                out.push((metric.name().to_string(), v));
            }
        }
        out
    }
}

/// Evaluates `embeddings` (n x d) with class `labels` (n integers). With
/// `query = Some((query_embeddings, query_labels))` the queries search the
/// rows of `embeddings` (the gallery); else every row queries the others.
/// See the module documentation for the definitions.
///
/// Errors name the argument: embeddings not 2-D, floating and finite, fewer
/// than 2 samples (1 per side with a query set), labels of another length or
/// dtype, a query set of another width or device, a K outside
/// `1..=gallery size`, an empty `ks` with Recall asked for, `batch_size < 1`.
pub fn evaluate(
    embeddings: &Tensor,
    labels: &Tensor,
    query: Option<(&Tensor, &Tensor)>,
    opts: &EvalOptions,
) -> Result<Metrics> {
    evaluate_with(embeddings, labels, query, None, opts, Strategy::Auto)
}

/// [`evaluate`] of queries that are also in the gallery: query i is gallery
/// item `own[i]` (or none where `own[i] < 0`), left out of its own ranking.
/// Errors name `query_ids` for an `own` of another length, out of range, or
/// pairing items of different labels.
pub fn evaluate_in_gallery(
    embeddings: &Tensor,
    labels: &Tensor,
    query: (&Tensor, &Tensor),
    own: &[i64],
    opts: &EvalOptions,
) -> Result<Metrics> {
    evaluate_with(
        embeddings,
        labels,
        Some(query),
        Some(own),
        opts,
        Strategy::Auto,
    )
}

/// Each query's own entry is in the gallery (`own`) and has its label.
fn check_own(own: &[i64], yq: &[i64], yg: &[i64]) -> Result<()> {
    ensure(
        own.len() == yq.len(),
        "query_ids",
        || format!("{} entries", own.len()),
        format!("one per query ({})", yq.len()),
    )?;
    for (i, &j) in own.iter().enumerate() {
        ensure(
            j < yg.len() as i64,
            "query_ids",
            || format!("gallery index {j}"),
            format!("an index below the gallery size ({})", yg.len()),
        )?;
        ensure(
            j < 0 || yg[j as usize] == yq[i],
            "query_ids",
            || {
                format!(
                    "query {i} (label {}) and gallery item {j} (label {})",
                    yq[i],
                    yg[j.max(0) as usize]
                )
            },
            "the same label for the same id",
        )?;
    }
    Ok(())
}

pub(crate) fn evaluate_with(
    embeddings: &Tensor,
    labels: &Tensor,
    query: Option<(&Tensor, &Tensor)>,
    own: Option<&[i64]>,
    opts: &EvalOptions,
    strategy: Strategy,
) -> Result<Metrics> {
    let _guard = tch::no_grad_guard();
    let (yg, yq) = checked_labels(embeddings, labels, query, own, opts)?;
    let n = embeddings.size()[0];
    let own = own.map_or(Own::Nothing, Own::At);
    let gallery_size = if query.is_none() || own.any() {
        n - 1
    } else {
        n
    };
    let need = needs(opts, gallery_size)?;

    let kind = shared_compute_kind(embeddings, query.map(|(qe, _)| qe));
    let g = prepare(embeddings, kind, opts.normalize);
    let (q, yq) = match (query, yq) {
        (Some((qe, _)), Some(yq)) => (prepare(qe, kind, opts.normalize), yq),
        _ => (g.shallow_clone(), yg.clone()),
    };
    let mut out = Metrics {
        recall: Vec::new(),
        precision: Vec::new(),
        map_at_k: Vec::new(),
        map_at_r: None,
        r_precision: None,
        nmi: None,
        num_queries: yq.len(),
        left_out: 0,
    };
    if need.count || need.collects() {
        let gallery = query.is_some().then_some((&g, yg.as_slice()));
        let top_k = need.top > 0;
        let request = Request {
            ks: if need.count { opts.ks.as_slice() } else { &[] },
            top_ks: if top_k { opts.ks.as_slice() } else { &[] },
            need,
            average: opts.average,
            batch_size: opts.batch_size,
            strategy,
        };
        let r = retrieval::retrieval(&q, &yq, gallery, own, request)?;
        out.recall = r.recall;
        if opts.wants(Metric::Precision) {
            out.precision = r.precision;
        }
        if opts.wants(Metric::MapAtK) {
            out.map_at_k = r.map_at_k;
        }
        out.left_out = r.left_out;
        out.map_at_r = opts.wants(Metric::MapAtR).then_some(r.map_at_r);
        out.r_precision = opts.wants(Metric::RPrecision).then_some(r.r_precision);
    }
    if opts.wants(Metric::Nmi) {
        out.nmi = Some(kmeans_nmi(&q, &yq, opts)?);
    }
    Ok(out)
}

/// The gallery's labels and the queries' (with a query set), after checking
/// the embeddings, labels, `own` and `batch_size`.
fn checked_labels(
    embeddings: &Tensor,
    labels: &Tensor,
    query: Option<(&Tensor, &Tensor)>,
    own: Option<&[i64]>,
    opts: &EvalOptions,
) -> Result<(Vec<i64>, Option<Vec<i64>>)> {
    check_embeddings(
        embeddings,
        "embeddings",
        if query.is_none() { 2 } else { 1 },
    )?;
    let n = embeddings.size()[0];
    let yg = labels_vec(labels, "labels", Some((n, "embeddings")))?;
    let yq = match query {
        Some((qe, ql)) => {
            knn::check_query_like(qe, "query_embeddings", embeddings, "embeddings", 1)?;
            let m = qe.size()[0];
            Some(labels_vec(
                ql,
                "query_labels",
                Some((m, "query_embeddings")),
            )?)
        }
        None => None,
    };
    check_batch_size(opts.batch_size)?;
    if opts.wants(Metric::Nmi) {
        at_least("kmeans_n_init", opts.kmeans_n_init, 1)?;
        at_least("kmeans_max_iter", opts.kmeans_max_iter, 1)?;
    }
    if let (Some(own), Some(yq)) = (own, &yq) {
        check_own(own, yq, &yg)?;
    }
    Ok((yg, yq))
}

/// What the retrieval metrics asked for need, after checking that every K
/// is in `1..=gallery_size` (`ks` not empty) where one is used.
fn needs(opts: &EvalOptions, gallery_size: i64) -> Result<Need> {
    let top_k = opts.wants(Metric::Precision) || opts.wants(Metric::MapAtK);
    let need = Need {
        count: opts.wants(Metric::Recall),
        negatives: opts.wants(Metric::MapAtR) || opts.wants(Metric::RPrecision),
        top: if top_k {
            opts.ks.iter().copied().max().unwrap_or(0).max(0) as usize
        } else {
            0
        },
    };
    if need.count || top_k {
        ensure(
            !opts.ks.is_empty(),
            "ks",
            || "no K".to_string(),
            "at least one K for Recall@K, Precision@K or mAP@K",
        )?;
        for &k in &opts.ks {
            ensure(
                k >= 1 && k <= gallery_size,
                "ks",
                || format!("K = {k}"),
                format!("1 <= K <= {gallery_size}, the number of gallery items per query"),
            )?;
        }
    }
    Ok(need)
}

/// The NMI of the queries' labels and k-means' clusters of the queries,
/// k the number of classes.
fn kmeans_nmi(q: &Tensor, yq: &[i64], opts: &EvalOptions) -> Result<f64> {
    let k = yq.iter().collect::<BTreeSet<_>>().len() as i64;
    let clusters = kmeans_with(
        q,
        k,
        &KMeansOptions {
            n_init: opts.kmeans_n_init,
            max_iter: opts.kmeans_max_iter,
            seed: opts.seed,
            batch_size: opts.batch_size,
            ..Default::default()
        },
    )?;
    let assigned = input::host_vec::<i64>(&clusters.assignments)?;
    nmi(yq, &assigned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> (Tensor, Tensor) {
        let x = Tensor::from_slice(&[1.0f32, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9, 0.7, 0.7])
            .reshape([5, 2]);
        let y = Tensor::from_slice(&[0i64, 0, 1, 1, 2]);
        (x, y)
    }

    #[test]
    fn evaluate_reports_in_a_fixed_order() {
        let (x, y) = toy();
        let opts = EvalOptions {
            ks: vec![1, 2],
            ..Default::default()
        };
        let m = evaluate(&x, &y, None, &opts).unwrap();
        let keys: Vec<String> = m.to_pairs().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            ["recall@1", "recall@2", "map@r", "r_precision", "nmi"]
        );
        // Four queries find their pair first; the singleton is a miss.
        assert_eq!(m.recall, vec![(1, 0.8), (2, 0.8)]);
        assert_eq!(m.map_at_r, Some(1.0));
        assert_eq!(m.left_out, 1);
        assert_eq!(m.nmi, Some(1.0));
    }

    #[test]
    fn device_scan_gives_the_same_metrics() {
        let (x, y) = toy();
        let q = x.narrow(0, 1, 3) * 2.0;
        let ql = Tensor::from_slice(&[0i64, 1, 7]);
        let opts = EvalOptions {
            ks: vec![1, 3],
            include: vec![Metric::Recall, Metric::MapAtR, Metric::RPrecision],
            ..Default::default()
        };
        for query in [None, Some((&q, &ql))] {
            let auto = evaluate(&x, &y, query, &opts).unwrap();
            let torch = evaluate_with(&x, &y, query, None, &opts, Strategy::Torch).unwrap();
            assert_eq!(auto, torch);
        }
    }

    #[test]
    fn bad_arguments_are_named() {
        let (x, y) = toy();
        let o = EvalOptions {
            ks: vec![5],
            ..Default::default()
        };
        let e = evaluate(&x, &y, None, &o).unwrap_err().to_string();
        assert_eq!(
            e,
            "ks: expected 1 <= K <= 4, the number of gallery items per query, got K = 5"
        );
        let e = evaluate(&x, &y.narrow(0, 0, 4), None, &EvalOptions::default())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "labels: expected one label per row of embeddings (5), got 4 labels"
        );
        let q = Tensor::from_slice(&[1.0f32, 0.0, 0.0]).reshape([1, 3]);
        let ql = Tensor::from_slice(&[0i64]);
        let e = evaluate(&x, &y, Some((&q, &ql)), &EvalOptions::default())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "query_embeddings: expected as many columns as embeddings (2), got 3 columns"
        );
        let e = evaluate(&x.narrow(0, 0, 1), &y.narrow(0, 0, 1), None, &o)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "embeddings: expected at least 2 samples, got 1 sample(s)"
        );
        assert!(Metric::parse("recall@1").is_err());
    }
}
