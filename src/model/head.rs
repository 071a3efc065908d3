//! The embedding layer and the classifier on top of a backbone.

use tch::nn::{self, Module};
use tch::Tensor;

use crate::error::{Error, Result};

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
                if !(scale.is_finite() && scale > 0.0) {
                    return Err(Error::invalid(
                        "classifier_scale",
                        scale,
                        "a finite number > 0",
                    ));
                }
                Ok(ClassifierKind::Cosine { scale })
            }
            other => Err(Error::invalid(
                "classifier",
                format!("{other:?}"),
                "\"linear\" or \"cosine\"",
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
        // PyTorch's `nn.Linear` default (the release's embedding layer):
        // weights and bias uniform in +-1/sqrt(fan_in); tch's default,
        // Kaiming with the ReLU gain, is 2.45 times wider.
        let fan_in = 1.0 / (features as f64).sqrt();
        let embed = (dim != features).then(|| {
            let init = nn::Init::Uniform {
                lo: -fan_in,
                up: fan_in,
            };
            let cfg = nn::LinearConfig {
                ws_init: init,
                bs_init: Some(init),
                bias: true,
            };
            nn::linear(p / "embed", features, dim, cfg)
        });
        let c = p / "classifier";
        let bound = 1.0 / (dim as f64).sqrt();
        let classifier_weight = c.var(
            "weight",
            &[num_classes, dim],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let classifier_bias = matches!(kind, ClassifierKind::Linear).then(|| {
            c.var(
                "bias",
                &[num_classes],
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )
        });
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
