//! The same-class references of every query and their similarities.
//!
//! They are few per query (R, the class size in the gallery), so they are
//! computed class by class with one small matrix product each, and sorted in
//! the ranking order (-similarity, index). The scans over the whole gallery
//! then only need, per query, the best of them and its index.

use std::collections::BTreeMap;

use std::cmp::Ordering;

use tch::{Kind, Tensor};

use super::input::{block_rows, elt_size, host_vec, BLOCK_BYTES};
use crate::error::Result;

/// For query `i`, `index[offsets[i]..offsets[i + 1]]` are the gallery items
/// of its class (its own entry excluded, see [`Own`]), best
/// first, and `sim` their similarities (exact values of the compute dtype).
#[derive(Debug, Default)]
pub(crate) struct Positives {
    pub offsets: Vec<usize>,
    pub index: Vec<i64>,
    pub sim: Vec<f64>,
}

impl Positives {
    /// R of query `i`: how many gallery items share its class.
    pub fn r(&self, i: usize) -> usize {
        self.offsets[i + 1] - self.offsets[i]
    }

    /// The best same-class item of query `i`, if any.
    pub fn first(&self, i: usize) -> Option<(f64, i64)> {
        let o = self.offsets[i];
        (self.r(i) > 0).then(|| (self.sim[o], self.index[o]))
    }

    /// The same-class items of query `i`, best first.
    pub fn of(&self, i: usize) -> impl Iterator<Item = (f64, i64)> + '_ {
        let range = self.offsets[i]..self.offsets[i + 1];
        self.sim[range.clone()]
            .iter()
            .copied()
            .zip(self.index[range].iter().copied())
    }

    /// The largest R.
    pub fn max_r(&self) -> usize {
        (0..self.offsets.len().saturating_sub(1))
            .map(|i| self.r(i))
            .max()
            .unwrap_or(0)
    }
}

/// The ranking order of (similarity, index) pairs: larger similarity first,
/// then smaller index. Similarities compare as IEEE numbers (-0 == +0), like
/// the comparisons of the scans.
pub(crate) fn rank_order(a: &(f64, i64), b: &(f64, i64)) -> Ordering {
    b.0.partial_cmp(&a.0)
        .unwrap_or(Ordering::Equal)
        .then(a.1.cmp(&b.1))
}

/// Each query's own entry in the gallery, left out of its ranking.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Own<'a> {
    /// The gallery holds no query.
    Nothing,
    /// The gallery is the query set: query i is gallery item i.
    Itself,
    /// Query i is gallery item `at[i]`, or none where `at[i] < 0`.
    At(&'a [i64]),
}

impl Own<'_> {
    /// The gallery index of query `i`'s own entry, if any.
    pub fn of(&self, i: i64) -> Option<i64> {
        match *self {
            Own::Nothing => None,
            Own::Itself => Some(i),
            Own::At(at) => Some(at[i as usize]).filter(|&j| j >= 0),
        }
    }

    /// Whether some query has its own entry in the gallery.
    pub fn any(&self) -> bool {
        match *self {
            Own::Nothing => false,
            Own::Itself => true,
            Own::At(at) => at.iter().any(|&j| j >= 0),
        }
    }
}

/// Rows of a class: `label -> ascending row indices`.
fn by_class(labels: &[i64]) -> BTreeMap<i64, Vec<i64>> {
    let mut map: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for (i, &y) in labels.iter().enumerate() {
        map.entry(y).or_default().push(i as i64);
    }
    map
}

/// The query rows and the gallery rows of one class.
type ClassRows<'a> = (Vec<i64>, &'a Vec<i64>);

/// The [`Positives`] of queries `q` (labels `yq`) in gallery `g` (labels
/// `yg`), each query's `own` entry left out. `q` and `g` are prepared
/// (compute dtype, contiguous) and on one device.
///
/// Classes with the same numbers of queries and gallery items go together
/// through one batched matrix product: thousands of small classes (SOP has
/// 11,316 of 2 to 12 images) cost a few libtorch calls instead of thousands.
pub(crate) fn positives(
    q: &Tensor,
    yq: &[i64],
    g: &Tensor,
    yg: &[i64],
    own: Own<'_>,
    batch_size: Option<i64>,
) -> Result<Positives> {
    let gallery = by_class(yg);
    // (queries, gallery items) of a class -> the classes of that shape.
    let mut shapes: BTreeMap<(usize, usize), Vec<ClassRows>> = BTreeMap::new();
    for (label, queries) in by_class(yq) {
        if let Some(members) = gallery.get(&label) {
            shapes
                .entry((queries.len(), members.len()))
                .or_default()
                .push((queries, members));
        }
    }
    let mut per_query: Vec<Vec<(f64, i64)>> = vec![Vec::new(); yq.len()];
    let (device, d) = (q.device(), q.size()[1]);
    for ((nq, ng), classes) in shapes {
        // Classes per product: inputs and output within one block budget,
        // and query rows of a large class in blocks of their own.
        let per_class = ((nq + ng) as i64 * d + (nq * ng) as i64) * elt_size(q.kind());
        let batch = (BLOCK_BYTES / per_class.max(1)).max(1) as usize;
        let rows = block_rows(batch_size, ng as i64, q.kind()) as usize;
        for group in classes.chunks(batch) {
            let c = group.len() as i64;
            let members: Vec<i64> = group.iter().flat_map(|(_, m)| m.iter().copied()).collect();
            let gm = g
                .index_select(0, &Tensor::from_slice(&members).to_device(device))
                .reshape([c, ng as i64, d]);
            for start in (0..nq).step_by(rows) {
                let len = rows.min(nq - start);
                let queries: Vec<i64> = group
                    .iter()
                    .flat_map(|(qs, _)| qs[start..start + len].iter().copied())
                    .collect();
                let qm = q
                    .index_select(0, &Tensor::from_slice(&queries).to_device(device))
                    .reshape([c, len as i64, d]);
                let s = host_vec::<f64>(&qm.bmm(&gm.transpose(1, 2)).to_kind(Kind::Double))?;
                let mut sims = s.chunks(ng);
                for (qs, members) in group {
                    for &i in &qs[start..start + len] {
                        let row = sims.next().unwrap_or(&[]);
                        per_query[i as usize].extend(
                            row.iter()
                                .zip(members.iter())
                                .filter(|&(_, &j)| own.of(i) != Some(j))
                                .map(|(&v, &j)| (v, j)),
                        );
                    }
                }
            }
        }
    }
    let mut out = Positives {
        offsets: Vec::with_capacity(yq.len() + 1),
        ..Default::default()
    };
    out.offsets.push(0);
    for mut list in per_query {
        list.sort_by(rank_order);
        for (v, j) in list {
            out.sim.push(v);
            out.index.push(j);
        }
        out.offsets.push(out.index.len());
    }
    Ok(out)
}
