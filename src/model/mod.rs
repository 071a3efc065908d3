//! Networks: a backbone, an embedding layer and a classifier.
//!
//! Variables live in a `tch::nn::VarStore` under `backbone.*` (torchvision's
//! names, so ImageNet state dicts load as is), `embed.*` and `classifier.*`.
//! Every layer starts as its PyTorch counterpart does ([`init`]), never with
//! a tch `nn` default.

pub mod bn_inception;
pub mod convnet;
pub mod head;
pub mod init;
pub mod resnet;
pub mod script;
pub mod weights;

use std::path::PathBuf;
use std::sync::Mutex;

use tch::nn::{self, ModuleT};
use tch::{Device, Tensor};

pub use head::{l2_normalize, ClassifierKind, Head};
pub use weights::{load_into, read_safetensors, LoadReport};

use crate::error::{at_least, Error, Result};

/// Which backbone a network uses.
#[derive(Clone, Debug, PartialEq)]
pub enum BackboneSpec {
    /// Small CNN for 28-32 px grey images (128 features).
    ConvNet,
    /// torchvision's ResNet-18 (512 features).
    ResNet18,
    /// torchvision's ResNet-50 (2048 features).
    ResNet50,
    /// BN-Inception with Caffe-BGR input (1024 features), the paper's.
    BnInception,
    /// A user's TorchScript module mapping images to feature vectors.
    TorchScript(PathBuf),
}

impl BackboneSpec {
    /// Parses `convnet`, `resnet18`, `resnet50`, `bn_inception` or
    /// `torchscript:PATH`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "convnet" => Ok(BackboneSpec::ConvNet),
            "resnet18" => Ok(BackboneSpec::ResNet18),
            "resnet50" => Ok(BackboneSpec::ResNet50),
            "bn_inception" => Ok(BackboneSpec::BnInception),
            other => match other.strip_prefix("torchscript:") {
                Some(path) if !path.is_empty() => Ok(BackboneSpec::TorchScript(path.into())),
                _ => Err(Error::invalid(
                    "backbone",
                    format!("{other:?}"),
                    "one of convnet, resnet18, resnet50, bn_inception, torchscript:PATH",
                )),
            },
        }
    }

    /// The name [`BackboneSpec::parse`] accepts.
    pub fn name(&self) -> String {
        match self {
            BackboneSpec::ConvNet => "convnet".into(),
            BackboneSpec::ResNet18 => "resnet18".into(),
            BackboneSpec::ResNet50 => "resnet50".into(),
            BackboneSpec::BnInception => "bn_inception".into(),
            BackboneSpec::TorchScript(p) => format!("torchscript:{}", p.display()),
        }
    }

    /// Channels the backbone reads (grey inputs are repeated to 3 where
    /// needed).
    fn channels(&self) -> Option<i64> {
        match self {
            BackboneSpec::ConvNet => None,
            BackboneSpec::TorchScript(_) => None,
            _ => Some(3),
        }
    }
}

/// The shape of a network.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub backbone: BackboneSpec,
    /// Channels of the input images (1 grey, 3 colour).
    pub in_channels: i64,
    /// Width of the embedding; None: the backbone's features.
    pub embedding_size: Option<i64>,
    /// Training classes (classifier outputs).
    pub num_classes: i64,
    pub classifier: ClassifierKind,
    /// L2-normalise embeddings before the loss.
    pub normalize_embeddings: bool,
    /// BatchNorm momentum of every backbone's BatchNorm layers (convnet,
    /// ResNets, BN-Inception), in PyTorch's convention: `running = (1 -
    /// momentum) * running + momentum * batch_statistic`. 0.1 is PyTorch's
    /// default (the fashion-mnist and glyphs presets); the release's
    /// BN-Inception uses 0.9 (the cub200, cars196, sop and inshop presets).
    /// TorchScript backbones keep their own.
    pub bn_momentum: f64,
}

/// A TorchScript module switched between train and eval mode on demand.
struct ScriptBackbone {
    module: Mutex<(script::ScriptModule, Option<bool>)>,
}

impl std::fmt::Debug for ScriptBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScriptBackbone")
    }
}

impl ScriptBackbone {
    /// Features of a batch (flattened to N x F), or the module's error.
    fn try_forward(&self, xs: &Tensor, train: bool) -> std::result::Result<Tensor, String> {
        let mut guard = self.module.lock().unwrap_or_else(|e| e.into_inner());
        let (module, mode) = &mut *guard;
        if *mode != Some(train) {
            module.set_train(train).map_err(|e| e.to_string())?;
            *mode = Some(train);
        }
        Ok(module.forward(xs)?.flatten(1, -1))
    }
}

impl ModuleT for ScriptBackbone {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.try_forward(xs, train).unwrap_or_else(|e| {
            panic!(
                "the TorchScript backbone failed on a batch of shape {:?}: {e}",
                xs.size()
            )
        })
    }
}

/// Backbone, embedding layer and classifier.
#[derive(Debug)]
pub struct EmbeddingNet {
    backbone: Box<dyn ModuleT + Send>,
    /// Repeat grey input to this many channels before the backbone.
    repeat_to: Option<i64>,
    pub head: Head,
    pub features: i64,
    pub config: ModelConfig,
}

impl EmbeddingNet {
    /// Builds the network's variables in `vs` (seed torch first for a
    /// deterministic initialisation).
    pub fn new(vs: &nn::VarStore, config: &ModelConfig) -> Result<Self> {
        at_least("num_classes", config.num_classes, 1)?;
        at_least("in_channels", config.in_channels, 1)?;
        if let Some(e) = config.embedding_size {
            at_least("embedding_size", e, 1)?;
        }
        let root = vs.root();
        let p = &root / "backbone";
        let (backbone, features): (Box<dyn ModuleT + Send>, i64) = match &config.backbone {
            BackboneSpec::ConvNet => (
                Box::new(convnet::ConvNet::new(
                    &p,
                    config.in_channels,
                    config.bn_momentum,
                )),
                convnet::CONVNET_FEATURES,
            ),
            BackboneSpec::ResNet18 | BackboneSpec::ResNet50 => {
                let depth = if config.backbone == BackboneSpec::ResNet18 {
                    resnet::Depth::ResNet18
                } else {
                    resnet::Depth::ResNet50
                };
                let net = resnet::ResNet::new(&p, depth, config.bn_momentum);
                (Box::new(net), depth.features())
            }
            BackboneSpec::BnInception => (
                Box::new(bn_inception::BnInception::new(&p, config.bn_momentum)),
                bn_inception::BN_INCEPTION_FEATURES,
            ),
            BackboneSpec::TorchScript(path) => {
                if !path.exists() {
                    return Err(Error::io(
                        path,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "no such TorchScript file",
                        ),
                    ));
                }
                let module = script::ScriptModule::load(path, vs.device())?;
                module.register(&p)?;
                let script = ScriptBackbone {
                    module: Mutex::new((module, None)),
                };
                let features = probe_features(&script, config.in_channels, vs.device(), path)?;
                (Box::new(script), features)
            }
        };
        let repeat_to = config
            .backbone
            .channels()
            .filter(|&c| c != config.in_channels && config.in_channels == 1);
        let head = Head::new(
            &root,
            features,
            config.embedding_size,
            config.num_classes,
            config.classifier,
            config.normalize_embeddings,
        );
        Ok(EmbeddingNet {
            backbone,
            repeat_to,
            head,
            features,
            config: config.clone(),
        })
    }

    /// Backbone features of a batch of images (N x C x H x W).
    pub fn features(&self, images: &Tensor, train: bool) -> Tensor {
        let x = match self.repeat_to {
            Some(c) => images.expand([-1, c, -1, -1], false),
            None => images.shallow_clone(),
        };
        self.backbone.forward_t(&x, train)
    }

    /// Embeddings and logits of a batch.
    pub fn forward_t(&self, images: &Tensor, train: bool) -> (Tensor, Tensor) {
        let emb = self.head.embed(&self.features(images, train));
        let logits = self.head.logits(&emb);
        (emb, logits)
    }

    /// Embeddings of a batch in evaluation mode, without gradients.
    pub fn embed(&self, images: &Tensor) -> Tensor {
        tch::no_grad(|| self.head.embed(&self.features(images, false)))
    }

    /// The width of the embeddings.
    pub fn embedding_size(&self) -> i64 {
        self.config.embedding_size.unwrap_or(self.features)
    }
}

/// Runs a TorchScript backbone on one dummy image to learn its feature width.
fn probe_features(
    m: &ScriptBackbone,
    channels: i64,
    device: Device,
    path: &std::path::Path,
) -> Result<i64> {
    let x = Tensor::zeros([2, channels, 64, 64], (tch::Kind::Float, device));
    let out = tch::no_grad(|| m.try_forward(&x, false)).map_err(|e| {
        Error::format(
            path,
            None,
            format!("the TorchScript module failed on a [2, C, 64, 64] input: {e}"),
        )
    })?;
    if out.dim() != 2 {
        return Err(Error::format(
            path,
            None,
            format!(
                "expected a (batch, features) output, got shape {:?}",
                out.size()
            ),
        ));
    }
    Ok(out.size()[1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn config(backbone: BackboneSpec, in_channels: i64) -> ModelConfig {
        ModelConfig {
            backbone,
            in_channels,
            embedding_size: Some(16),
            num_classes: 7,
            classifier: ClassifierKind::Linear,
            normalize_embeddings: false,
            bn_momentum: 0.1,
        }
    }

    #[test]
    fn every_backbone_gives_embeddings_and_logits() {
        for (spec, c, hw, feats) in [
            (BackboneSpec::ConvNet, 1, 28, 128),
            (BackboneSpec::ResNet18, 1, 32, 512),
            (BackboneSpec::ResNet18, 3, 32, 512),
            (BackboneSpec::BnInception, 3, 64, 1024),
        ] {
            tch::manual_seed(0);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = EmbeddingNet::new(&vs, &config(spec.clone(), c)).unwrap();
            assert_eq!(net.features, feats, "{spec:?}");
            let x = Tensor::randn([2, c, hw, hw], (Kind::Float, Device::Cpu));
            let (e, l) = net.forward_t(&x, true);
            assert_eq!(e.size(), [2, 16], "{spec:?}");
            assert_eq!(l.size(), [2, 7], "{spec:?}");
            assert_eq!(net.embed(&x).size(), [2, 16]);
        }
    }

    #[test]
    fn bn_inception_has_the_caffe_port_names() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = EmbeddingNet::new(&vs, &config(BackboneSpec::BnInception, 3)).unwrap();
        let vars = vs.variables();
        for key in [
            "backbone.conv1_7x7_s2.weight",
            "backbone.conv1_7x7_s2_bn.running_var",
            "backbone.inception_3a_double_3x3_2_bn.bias",
            "backbone.inception_3c_3x3.weight",
            "backbone.inception_5b_pool_proj.weight",
        ] {
            assert!(vars.contains_key(key), "{key}");
        }
        assert_eq!(
            vars["backbone.inception_5b_pool_proj.weight"].size(),
            [128, 1024, 1, 1]
        );
        let params: i64 = vars
            .iter()
            .filter(|(k, _)| k.starts_with("backbone.") && !k.contains("running"))
            .map(|(_, t)| t.numel() as i64)
            .sum();
        // The Caffe BN-Inception has about 10.2 M parameters without its classifier.
        assert!((10_000_000..10_500_000).contains(&params), "{params}");
    }

    #[test]
    fn state_dicts_load_and_mismatches_are_listed() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = EmbeddingNet::new(&vs, &config(BackboneSpec::ResNet18, 3)).unwrap();
        let src = nn::VarStore::new(Device::Cpu);
        tch::manual_seed(5);
        let _ = EmbeddingNet::new(&src, &config(BackboneSpec::ResNet18, 3)).unwrap();
        let mut dict: Vec<(String, Tensor)> = src
            .variables()
            .into_iter()
            .filter_map(|(k, t)| k.strip_prefix("backbone.").map(|k| (k.to_string(), t)))
            .collect();
        dict.push((
            "fc.weight".into(),
            Tensor::zeros([1000, 512], (Kind::Float, Device::Cpu)),
        ));
        dict.push(("bn1.num_batches_tracked".into(), Tensor::from(3i64)));
        let report = load_into(&vs, "backbone.", dict, "test").unwrap();
        assert_eq!(report.ignored, vec!["bn1.num_batches_tracked", "fc.weight"]);
        let (a, b) = (vs.variables(), src.variables());
        for (k, t) in &a {
            if k.starts_with("backbone.") {
                assert!(t.equal(&b[k]), "{k}");
            }
        }
        let bad = vec![(
            "conv1.wieght".to_string(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        )];
        let err = load_into(&vs, "backbone.", bad, "bad.safetensors")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unexpected keys [conv1.wieght]"), "{err}");
        assert!(err.contains("missing keys [bn1.bias"), "{err}");
    }

    #[test]
    fn every_backbone_uses_the_configured_batch_norm_momentum() {
        for (spec, conv, bn, stride, pad) in [
            (BackboneSpec::ConvNet, "blocks.0.conv", "blocks.0.bn", 1, 1),
            (BackboneSpec::ResNet18, "conv1", "bn1", 2, 3),
            (BackboneSpec::ResNet50, "conv1", "bn1", 2, 3),
            (
                BackboneSpec::BnInception,
                "conv1_7x7_s2",
                "conv1_7x7_s2_bn",
                2,
                3,
            ),
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let cfg = ModelConfig {
                bn_momentum: 0.7,
                ..config(spec.clone(), 3)
            };
            let net = EmbeddingNet::new(&vs, &cfg).unwrap();
            let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu)) + 1.0;
            let vars = vs.variables();
            let (w, b) = (
                &vars[&format!("backbone.{conv}.weight")],
                vars.get(&format!("backbone.{conv}.bias")),
            );
            let y = x.conv2d(w, b, [stride; 2], [pad; 2], [1, 1], 1);
            let batch_mean = y.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float);
            let _ = net.forward_t(&x, true);
            let running = &vars[&format!("backbone.{bn}.running_mean")];
            assert!(
                running.allclose(&(batch_mean * 0.7), 1e-4, 1e-5, false),
                "{spec:?}"
            );
        }
    }

    #[test]
    fn bad_shapes_are_rejected() {
        let vs = nn::VarStore::new(Device::Cpu);
        let e = EmbeddingNet::new(&vs, &config(BackboneSpec::ConvNet, 0)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("in_channels: expected an integer >= 1"),
            "{e}"
        );
    }

    #[test]
    fn bad_backbone_names_are_rejected() {
        let e = BackboneSpec::parse("vgg").unwrap_err().to_string();
        assert!(e.starts_with("backbone: expected one of"), "{e}");
        assert_eq!(
            BackboneSpec::parse("torchscript:/m.pt").unwrap(),
            BackboneSpec::TorchScript("/m.pt".into())
        );
    }
}
