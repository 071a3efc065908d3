//! Normalised mutual information between two labellings of the same samples.
//!
//! `NMI(U, V) = I(U; V) / ((H(U) + H(V)) / 2)` with natural logarithms, the
//! arithmetic-mean normalisation of scikit-learn's
//! `normalized_mutual_info_score` (its default), including its limit cases:
//! two labellings with one class each score 1, and independent labellings
//! (I = 0) score 0.

use std::collections::HashMap;

use crate::error::{ensure, Result};

/// Dense ids `0..c` for the distinct values of `values`, and `c`.
fn dense(values: &[i64]) -> (Vec<usize>, usize) {
    let mut ids: HashMap<i64, usize> = HashMap::new();
    let out = values
        .iter()
        .map(|v| {
            let next = ids.len();
            *ids.entry(*v).or_insert(next)
        })
        .collect();
    (out, ids.len())
}

/// Entropy (nats) of the distribution of counts `counts` summing to `n`.
fn entropy(counts: &[u64], n: f64) -> f64 {
    -counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let c = c as f64;
            (c / n) * (c.ln() - n.ln())
        })
        .sum::<f64>()
}

/// NMI of class `labels` and cluster `assignments` (any integer values, one
/// of each per sample, at least one sample).
pub fn nmi(labels: &[i64], assignments: &[i64]) -> Result<f64> {
    ensure(
        !labels.is_empty(),
        "labels",
        || "0 labels".to_string(),
        "at least one label",
    )?;
    ensure(
        assignments.len() == labels.len(),
        "assignments",
        || format!("{} assignments", assignments.len()),
        format!("one per label ({})", labels.len()),
    )?;
    let (u, nu) = dense(labels);
    let (v, nv) = dense(assignments);
    if nu == 1 && nv == 1 {
        return Ok(1.0);
    }
    let n = labels.len() as f64;
    let mut a = vec![0u64; nu];
    let mut b = vec![0u64; nv];
    let mut joint: HashMap<(usize, usize), u64> = HashMap::new();
    for (&i, &j) in u.iter().zip(&v) {
        a[i] += 1;
        b[j] += 1;
        *joint.entry((i, j)).or_insert(0) += 1;
    }
    let mi = if nu == 1 || nv == 1 {
        0.0
    } else {
        let mut cells: Vec<((usize, usize), u64)> = joint.into_iter().collect();
        // A fixed summation order: the result must not depend on hashing.
        cells.sort_unstable();
        let total: f64 = cells
            .iter()
            .map(|&((i, j), c)| {
                let p = c as f64 / n;
                let outer = a[i] as f64 * b[j] as f64;
                let term = p * ((c as f64).ln() - n.ln()) + p * (-outer.ln() + 2.0 * n.ln());
                if term.abs() < f64::EPSILON {
                    0.0
                } else {
                    term
                }
            })
            .sum();
        total.max(0.0)
    };
    if mi == 0.0 {
        return Ok(0.0);
    }
    let norm = (entropy(&a, n) + entropy(&b, n)) / 2.0;
    Ok(mi / norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(nmi(&[0, 0, 1, 1], &[5, 5, 9, 9]).unwrap(), 1.0);
        assert_eq!(nmi(&[0, 0, 1, 1], &[0, 1, 0, 1]).unwrap(), 0.0);
        assert_eq!(nmi(&[3, 3, 3], &[1, 1, 1]).unwrap(), 1.0);
        assert_eq!(nmi(&[3, 3, 3], &[1, 2, 1]).unwrap(), 0.0);
        // sklearn.metrics.normalized_mutual_info_score([0,0,0,1,1,1], [0,0,1,1,2,2])
        let v = nmi(&[0, 0, 0, 1, 1, 1], &[0, 0, 1, 1, 2, 2]).unwrap();
        assert!((v - 0.5158037429793889).abs() < 1e-12, "{v}");
    }

    #[test]
    fn lengths_must_agree() {
        let e = nmi(&[0, 1], &[0]).unwrap_err().to_string();
        assert_eq!(
            e,
            "assignments: expected one per label (2), got 1 assignments"
        );
        let e = nmi(&[], &[]).unwrap_err().to_string();
        assert_eq!(e, "labels: expected at least one label, got 0 labels");
    }
}
