//! The pairwise similarity W between the samples of a batch.

use tch::{Kind, Tensor};

use crate::error::Result;

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
    /// The gaussian's bandwidth unless one is given.
    pub const DEFAULT_SIGMA: f64 = 1.0;

    /// Parses `"correlation" | "cosine" | "gaussian"`.
    pub fn parse(kind: &str, sigma: f64) -> Result<Self> {
        match kind {
            "correlation" => Ok(Similarity::Correlation),
            "cosine" => Ok(Similarity::Cosine),
            "gaussian" => {
                crate::error::positive("sigma", sigma)?;
                Ok(Similarity::Gaussian { sigma })
            }
            other => Err(crate::error::not_one_of(
                "similarity",
                other,
                &["correlation", "cosine", "gaussian"],
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

/// The similarity and power the computation uses for `kind` sharpened by
/// `power`: a gaussian kernel to a power is the gaussian of bandwidth
/// `sigma / sqrt(power)`, so its power folds into sigma (and its backward
/// needs no extra factor); correlation and cosine keep the power.
pub fn effective_power(kind: Similarity, power: f64) -> (Similarity, f64) {
    match kind {
        Similarity::Gaussian { sigma } if power != 1.0 => (
            Similarity::Gaussian {
                sigma: sigma / power.sqrt(),
            },
            1.0,
        ),
        other => (other, power),
    }
}

/// `w` with every entry raised to `power` (>= 1), out of place. The diagonal
/// (1 or 0) and the clipped zeros are unchanged; near pairs keep most of
/// their weight while far ones fade, which sharpens the propagation.
pub fn sharpen(w: &Tensor, power: f64) -> Tensor {
    if power == 1.0 {
        w.shallow_clone()
    } else {
        w.pow_tensor_scalar(power)
    }
}

/// [`similarity`] sharpened by `power` (see [`sharpen`]): the W of the loss.
pub fn similarity_with_power(
    emb: &Tensor,
    kind: Similarity,
    zero_diagonal: bool,
    power: f64,
) -> Tensor {
    let (kind, power) = effective_power(kind, power);
    sharpen(&similarity(emb, kind, zero_diagonal), power)
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
    let (norm, degenerate) = row_norms(x, reference);
    (x / norm).masked_fill(&degenerate, 0.0)
}

/// Each row's norm (clamped away from 0) and whether the row is degenerate:
/// a norm within rounding of 0 next to the same row of `reference` (the
/// rows before centring), the release's NaN row.
fn row_norms(x: &Tensor, reference: &Tensor) -> (Tensor, Tensor) {
    let norm = x.norm_scalaropt_dim(2, [1i64].as_slice(), true);
    let ref_norm = reference.norm_scalaropt_dim(2, [1i64].as_slice(), true);
    let (eps, tiny) = match x.kind() {
        Kind::Double => (f64::EPSILON, 1e-300),
        _ => (f32::EPSILON as f64, 1e-30),
    };
    let degenerate = tch::no_grad(|| norm.le_tensor(&(&ref_norm * (64.0 * eps))));
    (norm.clamp_min(tiny), degenerate)
}

/// Correlation and cosine's rows before normalising: centred (correlation)
/// or as they are.
fn centred(x: &Tensor, kind: Similarity) -> Tensor {
    if kind == Similarity::Correlation {
        x - x.mean_dim([1i64].as_slice(), true, x.kind())
    } else {
        x.shallow_clone()
    }
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
    let w = pairwise(emb, None, kind);
    with_diagonal(&w, if zero_diagonal { 0.0 } else { 1.0 })
}

/// The n x M similarity of the rows of `a` (n x d) to the rows of `b`
/// (M x d), other samples than those of `a` (no diagonal), entry for entry
/// as [`similarity_with_power`] computes it within one matrix.
pub fn cross_similarity_with_power(a: &Tensor, b: &Tensor, kind: Similarity, power: f64) -> Tensor {
    let (kind, power) = effective_power(kind, power);
    sharpen(&pairwise(a, Some(b), kind), power)
}

/// The similarity of every row of `a` to every row of `b` (None: of `a`),
/// before the diagonal is set.
fn pairwise(a: &Tensor, b: Option<&Tensor>, kind: Similarity) -> Tensor {
    match kind {
        Similarity::Correlation | Similarity::Cosine => {
            let ua = unit_rows(&centred(a, kind), a);
            match b {
                None => ua.mm(&ua.transpose(0, 1)),
                // The other side's norms divide the n x M products rather
                // than its M x d rows (M is a memory, often thousands).
                Some(b) => {
                    let cb = centred(b, kind);
                    let (norm, degenerate) = row_norms(&cb, b);
                    let scale = norm.reciprocal().masked_fill(&degenerate, 0.0);
                    ua.mm(&cb.transpose(0, 1)) * scale.transpose(0, 1)
                }
            }
            .relu()
        }
        Similarity::Gaussian { sigma } => {
            let sq = |x: &Tensor| {
                x.square()
                    .sum_dim_intlist([1i64].as_slice(), true, x.kind())
            };
            let b = b.unwrap_or(a);
            let d2 =
                (sq(a) + sq(b).transpose(0, 1) - a.mm(&b.transpose(0, 1)) * 2.0).clamp_min(0.0);
            (d2 * (-0.5 / (sigma * sigma))).exp()
        }
    }
}

/// The similarity's forward pass with what its analytic backward needs.
pub(crate) struct SimilarityPass {
    kind: Similarity,
    /// Unit rows (correlation, cosine) or the embeddings (gaussian).
    rows: Tensor,
    /// Row norms before normalisation, clamped (correlation, cosine).
    norms: Option<Tensor>,
    /// Rows treated as degenerate (correlation, cosine).
    degenerate: Option<Tensor>,
    /// Where the pre-clip similarity is positive, off the diagonal.
    active: Tensor,
    /// `power * base^(power - 1)`, the derivative of the sharpening, when
    /// `power != 1` (correlation, cosine).
    dpower: Option<Tensor>,
    /// W.
    pub w: Tensor,
}

impl SimilarityPass {
    /// W (sharpened by `power`, see [`sharpen`]) and saved state. `emb` must
    /// not require grad (use a detached view).
    pub(crate) fn forward(emb: &Tensor, kind: Similarity, zero_diagonal: bool, power: f64) -> Self {
        let (kind, power) = effective_power(kind, power);
        let n = emb.size()[0];
        let eye = Tensor::eye(n, (Kind::Bool, emb.device()));
        let diag = if zero_diagonal { 0.0 } else { 1.0 };
        match kind {
            Similarity::Correlation | Similarity::Cosine => {
                let x = centred(emb, kind);
                let (norm, degenerate) = row_norms(&x, emb);
                let u = (&x / &norm).masked_fill(&degenerate, 0.0);
                let c = u.mm(&u.transpose(0, 1));
                let active = c.gt(0.0).logical_and(&eye.logical_not());
                let base = c.relu().masked_fill(&eye, diag);
                let (w, dpower) = if power == 1.0 {
                    (base, None)
                } else {
                    let d = base.pow_tensor_scalar(power - 1.0) * power;
                    (sharpen(&base, power), Some(d))
                };
                SimilarityPass {
                    kind,
                    rows: u,
                    norms: Some(norm),
                    degenerate: Some(degenerate),
                    active,
                    dpower,
                    w,
                }
            }
            Similarity::Gaussian { .. } => {
                let w = similarity(emb, kind, zero_diagonal);
                let active = eye.logical_not();
                SimilarityPass {
                    kind,
                    rows: emb.shallow_clone(),
                    norms: None,
                    degenerate: None,
                    active,
                    dpower: None,
                    w,
                }
            }
        }
    }

    /// The gradient of the embeddings given the gradient of W (any n x n
    /// matrix; W is symmetric, so only its symmetric part matters).
    pub(crate) fn backward(&self, dw: &Tensor) -> Tensor {
        let dw = dw.where_scalarother(&self.active, 0.0);
        let dw = match &self.dpower {
            Some(d) => dw * d,
            None => dw,
        };
        let sym = &dw + dw.transpose(0, 1);
        match self.kind {
            Similarity::Correlation | Similarity::Cosine => {
                let u = &self.rows;
                let du = sym.mm(u);
                let radial = (&du * u).sum_dim_intlist([1i64].as_slice(), true, u.kind());
                let norms = self.norms.as_ref().expect("set for correlation and cosine");
                let degenerate = self
                    .degenerate
                    .as_ref()
                    .expect("set for correlation and cosine");
                let dx = ((du - u * radial) / norms).masked_fill(degenerate, 0.0);
                if self.kind == Similarity::Correlation {
                    &dx - dx.mean_dim([1i64].as_slice(), true, dx.kind())
                } else {
                    dx
                }
            }
            Similarity::Gaussian { sigma } => {
                // W = exp(-D / (2 sigma^2)), D_ij = |x_i|^2 + |x_j|^2 - 2 x_i.x_j
                let d_d = &sym * &self.w * (-0.5 / (sigma * sigma));
                let x = &self.rows;
                let rowsum = d_d.sum_dim_intlist([1i64].as_slice(), true, x.kind());
                (x * rowsum - d_d.mm(x)) * 2.0
            }
        }
    }
}
