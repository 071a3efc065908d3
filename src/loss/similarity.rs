//! The pairwise similarity W between the samples of a batch.

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Which similarity the refinement uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Similarity {
    /// Pearson correlation between samples, clipped at 0 (the release).
    Correlation,
    /// Cosine similarity, clipped at 0.
    Cosine,
    /// `exp(-|x_i - x_j|^2 / (2 sigma^2))`.
    Gaussian { sigma: f64 },
}

impl Similarity {
    /// Parses `"correlation" | "cosine" | "gaussian"`.
    pub fn parse(kind: &str, sigma: f64) -> Result<Self> {
        match kind {
            "correlation" => Ok(Similarity::Correlation),
            "cosine" => Ok(Similarity::Cosine),
            "gaussian" => {
                if !(sigma.is_finite() && sigma > 0.0) {
                    return Err(Error::invalid("sigma", sigma, "a finite number > 0"));
                }
                Ok(Similarity::Gaussian { sigma })
            }
            other => Err(Error::invalid(
                "similarity",
                format!("{other:?}"),
                "one of \"correlation\", \"cosine\", \"gaussian\"",
            )),
        }
    }

    /// The name accepted by [`Similarity::parse`].
    pub fn name(&self) -> &'static str {
        match self {
            Similarity::Correlation => "correlation",
            Similarity::Cosine => "cosine",
            Similarity::Gaussian { .. } => "gaussian",
        }
    }
}

/// Unit rows, with rows too close to zero set to exactly zero.
///
/// A row is degenerate when its norm is below `64 * eps(dtype)` times the norm
/// of the row it came from (`reference`): for correlation this catches rows of
/// equal values, whose centred residual is rounding noise; dividing by that
/// noise would turn it into a random direction (and an exactly constant row
/// would give 0/0 = NaN in the release). Degenerate rows are similar to
/// nothing but themselves.
fn unit_rows(x: &Tensor, reference: &Tensor) -> Tensor {
    let norm = x.norm_scalaropt_dim(2, [1i64].as_slice(), true);
    let ref_norm = reference.norm_scalaropt_dim(2, [1i64].as_slice(), true);
    let eps = match x.kind() {
        Kind::Double => f64::EPSILON,
        _ => f32::EPSILON as f64,
    };
    let degenerate = tch::no_grad(|| norm.le_tensor(&(&ref_norm * (64.0 * eps))));
    let tiny = match x.kind() {
        Kind::Double => 1e-300,
        _ => 1e-30,
    };
    (x / norm.clamp_min(tiny)).masked_fill(&degenerate, 0.0)
}

/// Replaces the diagonal of a square matrix with `value`, out of place so that
/// autograd never sees an in-place write.
fn with_diagonal(w: &Tensor, value: f64) -> Tensor {
    let n = w.size()[0];
    let eye = Tensor::eye(n, (Kind::Bool, w.device()));
    w.masked_fill(&eye, value)
}

/// The n x n similarity matrix of the rows of `emb` (n x d).
///
/// The diagonal is 1 (the release) or 0 (`zero_diagonal`, the paper's text).
/// Rows with zero variance (correlation) or zero norm (cosine) have zero
/// similarity to every other row instead of the release's NaN.
pub fn similarity(emb: &Tensor, kind: Similarity, zero_diagonal: bool) -> Tensor {
    let w = match kind {
        Similarity::Correlation => {
            let centred = emb - emb.mean_dim([1i64].as_slice(), true, emb.kind());
            let u = unit_rows(&centred, emb);
            u.mm(&u.transpose(0, 1)).relu()
        }
        Similarity::Cosine => {
            let u = unit_rows(emb, emb);
            u.mm(&u.transpose(0, 1)).relu()
        }
        Similarity::Gaussian { sigma } => {
            let sq = emb
                .square()
                .sum_dim_intlist([1i64].as_slice(), true, emb.kind());
            let d2 = (&sq + sq.transpose(0, 1) - emb.mm(&emb.transpose(0, 1)) * 2.0).clamp_min(0.0);
            (d2 * (-0.5 / (sigma * sigma))).exp()
        }
    };
    with_diagonal(&w, if zero_diagonal { 0.0 } else { 1.0 })
}
