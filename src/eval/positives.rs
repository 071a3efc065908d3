//! The same-class references of every query and their similarities.
//!
//! They are few per query (R, the class size in the gallery), so their
//! similarities are [`dot`](super::exact::dot)s, computed directly, and
//! sorted in the ranking order (-similarity, index). The scans over the
//! whole gallery then only need, per query, the best of them and its index.

use std::collections::BTreeMap;

use std::cmp::Ordering;

use super::exact::{Memo, Rows, Sim};
use crate::loss::threads::par_rows;

/// For query `i`, `index[offsets[i]..offsets[i + 1]]` are the gallery items
/// of its class (its own entry excluded, see [`Own`]), best
/// first, and `sim` their similarities ([`Rows::sim`]).
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

/// The [`Positives`] of the queries of `rows` (labels `yq`) in its gallery
/// (labels `yg`), each query's `own` entry left out; queries run in
/// parallel when there is enough work (the result does not depend on it).
pub(crate) fn positives<T: Sim>(
    rows: &Rows<'_, T>,
    yq: &[i64],
    yg: &[i64],
    own: Own<'_>,
) -> Positives {
    let gallery = by_class(yg);
    let pairs: usize = yq.iter().map(|y| gallery.get(y).map_or(0, Vec::len)).sum();
    let per_query = par_rows(yq.len(), pairs * rows.dim(), |i| {
        let Some(members) = gallery.get(&yq[i]) else {
            return Vec::new();
        };
        let own = own.of(i as i64);
        let mut memo = Memo::default();
        let mut list: Vec<(f64, i64)> = members
            .iter()
            .filter(|&&j| own != Some(j))
            .map(|&j| (rows.sim_memo(i, j as usize, &mut memo), j))
            .collect();
        list.sort_unstable_by(rank_order);
        list
    });
    let mut out = Positives {
        offsets: Vec::with_capacity(yq.len() + 1),
        ..Default::default()
    };
    out.offsets.push(0);
    for list in per_query {
        for (v, j) in list {
            out.sim.push(v);
            out.index.push(j);
        }
        out.offsets.push(out.index.len());
    }
    out
}
