//! The embedding layer and the classifier on top of a backbone.

use tch::nn::{self, Module};
use tch::Tensor;

use super::init::{torch_default_uniform, torch_linear};
use crate::error::Result;

/// The classifier whose logits feed the Group Loss prior and the CE term.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClassifierKind {
    /// `W e + b` (the release).
    Linear,
    /// `scale * cos(e, w_c)`: a normalised-softmax classifier.
    Cosine { scale: f64 },
}

impl ClassifierKind {
    /// Parses `"linear"` or `"cosine"` (with `scale`).
    pub fn parse(kind: &str, scale: f64) -> Result<Self> {
        match kind {
            "linear" => Ok(ClassifierKind::Linear),
            "cosine" => {
                crate::error::positive("classifier_scale", scale)?;
                Ok(ClassifierKind::Cosine { scale })
            }
            other => Err(crate::error::not_one_of(
                "classifier",
                other,
                &["linear", "cosine"],
            )),
        }
    }
}

/// Embedding layer (absent when the embedding is the backbone's feature)
/// and classifier.
#[derive(Debug)]
pub struct Head {
    embed: Option<nn::Linear>,
    classifier_weight: Tensor,
    classifier_bias: Option<Tensor>,
    kind: ClassifierKind,
    normalize: bool,
}

impl Head {
    /// `embed` (features -> embedding_size) under `p / "embed"` unless
    /// `embedding_size` is None or equal to `features`; the classifier under
    /// `p / "classifier"` (`weight`, and `bias` for the linear one).
    pub fn new(
        p: &nn::Path,
        features: i64,
        embedding_size: Option<i64>,
        num_classes: i64,
        kind: ClassifierKind,
        normalize: bool,
    ) -> Self {
        let dim = embedding_size.unwrap_or(features);
        // As PyTorch's `nn.Linear(features, dim)` (the release's embedding
        // layer) and `nn.Linear(dim, num_classes, bias=...)`: weights and
        // biases U(+-1/sqrt(fan_in)). tch's default weight, Kaiming with the
        // ReLU gain, is 2.45 times wider.
        let embed = (dim != features).then(|| torch_linear(p / "embed", features, dim, true));
        let c = p / "classifier";
        let init = torch_default_uniform(dim);
        let classifier_weight = c.var("weight", &[num_classes, dim], init);
        let classifier_bias =
            matches!(kind, ClassifierKind::Linear).then(|| c.var("bias", &[num_classes], init));
        Head {
            embed,
            classifier_weight,
            classifier_bias,
            kind,
            normalize,
        }
    }

    /// The embedding of backbone features.
    pub fn embed(&self, features: &Tensor) -> Tensor {
        let e = match &self.embed {
            Some(l) => l.forward(features),
            None => features.shallow_clone(),
        };
        if self.normalize {
            l2_normalize(&e)
        } else {
            e
        }
    }

    /// Logits of embeddings.
    pub fn logits(&self, emb: &Tensor) -> Tensor {
        let w = &self.classifier_weight;
        match self.kind {
            ClassifierKind::Linear => emb.linear(w, self.classifier_bias.as_ref()),
            ClassifierKind::Cosine { scale } => {
                l2_normalize(emb).linear::<Tensor>(&l2_normalize(w), None) * scale
            }
        }
    }
}

/// Rows divided by their norm (at least 1e-12).
pub fn l2_normalize(x: &Tensor) -> Tensor {
    x / x
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(1e-12)
}
