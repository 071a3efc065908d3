//! torchvision's ResNet-18 and ResNet-50 without their classifier.
//!
//! Variables carry torchvision's names (`conv1`, `bn1`, `layer1.0.conv1`,
//! `layer2.0.downsample.0`, ...), so its ImageNet state dicts load as they
//! are, and start as torchvision's do: every convolution
//! `kaiming_normal_(mode="fan_out", nonlinearity="relu")` without bias, every
//! BatchNorm gamma 1 and beta 0 (`zero_init_residual=False`). ResNet-50 is
//! v1.5: the stride of a bottleneck sits on its 3x3 convolution.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::init::{batch_norm2d, torchvision_conv2d, Conv};

/// Which ResNet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Depth {
    /// BasicBlocks [2, 2, 2, 2]: 512 features.
    ResNet18,
    /// Bottlenecks [3, 4, 6, 3]: 2048 features.
    ResNet50,
}

impl Depth {
    /// Blocks of `layer1` to `layer4`.
    fn blocks(self) -> [usize; 4] {
        match self {
            Depth::ResNet18 => [2, 2, 2, 2],
            Depth::ResNet50 => [3, 4, 6, 3],
        }
    }

    /// Output channels of a block over its width.
    fn expansion(self) -> i64 {
        match self {
            Depth::ResNet18 => 1,
            Depth::ResNet50 => 4,
        }
    }

    /// Width of the pooled feature.
    pub fn features(self) -> i64 {
        512 * self.expansion()
    }

    /// The convolutions of a block (`conv1`, `conv2`, ...) from `c_in`
    /// channels, of width `w`, with `stride`.
    fn convs(self, c_in: i64, w: i64, stride: i64) -> Vec<Conv> {
        match self {
            Depth::ResNet18 => vec![Conv::new(c_in, w, 3, stride, 1), Conv::new(w, w, 3, 1, 1)],
            Depth::ResNet50 => vec![
                Conv::new(c_in, w, 1, 1, 0),
                Conv::new(w, w, 3, stride, 1),
                Conv::new(w, 4 * w, 1, 1, 0),
            ],
        }
    }
}

/// A convolution (no bias) followed by BatchNorm.
#[derive(Debug)]
struct ConvBn {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

impl ConvBn {
    /// `conv` and `bn` at the given paths.
    fn new(conv_path: nn::Path, bn_path: nn::Path, conv: Conv, momentum: f64) -> Self {
        ConvBn {
            conv: torchvision_conv2d(conv_path, conv),
            bn: batch_norm2d(bn_path, conv.c_out, momentum),
        }
    }

    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        xs.apply(&self.conv).apply_t(&self.bn, train)
    }
}

/// A BasicBlock or a Bottleneck: conv-BN pairs with ReLU between them, the
/// (downsampled) input added, then ReLU.
#[derive(Debug)]
struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    /// `conv{i}`/`bn{i}` under `p`, and `downsample.0`/`downsample.1` when
    /// the stride or the width changes.
    fn new(p: &nn::Path, depth: Depth, c_in: i64, w: i64, stride: i64, momentum: f64) -> Self {
        let convs = depth
            .convs(c_in, w, stride)
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let (conv, bn) = (format!("conv{}", i + 1), format!("bn{}", i + 1));
                ConvBn::new(p / conv, p / bn, c, momentum)
            })
            .collect();
        let c_out = w * depth.expansion();
        let downsample = (stride != 1 || c_in != c_out).then(|| {
            let d = p / "downsample";
            ConvBn::new(
                &d / "0",
                &d / "1",
                Conv::new(c_in, c_out, 1, stride, 0),
                momentum,
            )
        });
        Block { convs, downsample }
    }

    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let last = self.convs.len() - 1;
        let mut ys = xs.shallow_clone();
        for (i, cb) in self.convs.iter().enumerate() {
            ys = cb.forward(&ys, train);
            if i < last {
                ys = ys.relu();
            }
        }
        let identity = match &self.downsample {
            Some(d) => d.forward(xs, train),
            None => xs.shallow_clone(),
        };
        (identity + ys).relu()
    }
}

/// A ResNet up to its global average pooling: images (N x 3 x H x W) to
/// features (N x [`Depth::features`]).
#[derive(Debug)]
pub struct ResNet {
    stem: ConvBn,
    layers: Vec<Vec<Block>>,
}

impl ResNet {
    /// Variables directly under `p` with torchvision's names; `momentum` is
    /// BatchNorm's, in PyTorch's convention (0.1 default).
    pub fn new(p: &nn::Path, depth: Depth, momentum: f64) -> Self {
        let stem = ConvBn::new(p / "conv1", p / "bn1", Conv::new(3, 64, 7, 2, 3), momentum);
        let mut c_in = 64;
        let mut layers = Vec::with_capacity(4);
        for (l, &n) in depth.blocks().iter().enumerate() {
            let w = 64 << l;
            let stride = if l == 0 { 1 } else { 2 };
            let q = p / format!("layer{}", l + 1);
            let mut blocks = Vec::with_capacity(n);
            for b in 0..n {
                let s = if b == 0 { stride } else { 1 };
                blocks.push(Block::new(&(&q / b), depth, c_in, w, s, momentum));
                c_in = w * depth.expansion();
            }
            layers.push(blocks);
        }
        ResNet { stem, layers }
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x =
            self.stem
                .forward(xs, train)
                .relu()
                .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for block in self.layers.iter().flatten() {
            x = block.forward(&x, train);
        }
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tch::{Device, Kind};

    fn build(depth: Depth, momentum: f64) -> (nn::VarStore, ResNet) {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = ResNet::new(&(vs.root() / "backbone"), depth, momentum);
        (vs, net)
    }

    fn parameters(vars: &HashMap<String, Tensor>) -> i64 {
        vars.iter()
            .filter(|(k, _)| !k.contains("running"))
            .map(|(_, t)| t.numel() as i64)
            .sum()
    }

    #[test]
    fn parameter_counts_are_torchvisions_without_fc() {
        for (depth, count, tensors) in [
            // 11,689,512 - (512 * 1000 + 1000); 23,508,032 likewise.
            (Depth::ResNet18, 11_176_512, 100),
            (Depth::ResNet50, 23_508_032, 265),
        ] {
            let (vs, _) = build(depth, 0.1);
            let vars = vs.variables();
            assert_eq!(parameters(&vars), count, "{depth:?}");
            // torchvision's state_dict has also one num_batches_tracked per
            // BatchNorm and the fc weight and bias.
            assert_eq!(vars.len(), tensors, "{depth:?}");
        }
    }

    #[test]
    fn names_and_shapes_are_torchvisions() {
        let (vs, _) = build(Depth::ResNet50, 0.1);
        let vars = vs.variables();
        for (name, shape) in [
            ("conv1.weight", vec![64, 3, 7, 7]),
            ("bn1.running_var", vec![64]),
            ("layer1.0.conv1.weight", vec![64, 64, 1, 1]),
            ("layer1.0.conv3.weight", vec![256, 64, 1, 1]),
            ("layer1.0.downsample.0.weight", vec![256, 64, 1, 1]),
            ("layer1.0.downsample.1.bias", vec![256]),
            ("layer2.0.conv2.weight", vec![128, 128, 3, 3]),
            ("layer3.5.bn3.weight", vec![1024]),
            ("layer4.2.conv3.weight", vec![2048, 512, 1, 1]),
        ] {
            let key = format!("backbone.{name}");
            assert_eq!(vars[&key].size(), shape, "{key}");
        }
        assert!(!vars.contains_key("backbone.layer1.1.downsample.0.weight"));
        assert!(!vars
            .keys()
            .any(|k| k.contains(".bias") && k.contains("conv")));
        let (vs, _) = build(Depth::ResNet18, 0.1);
        let vars = vs.variables();
        assert!(!vars.contains_key("backbone.layer1.0.downsample.0.weight"));
        assert_eq!(
            vars["backbone.layer2.0.downsample.0.weight"].size(),
            [128, 64, 1, 1]
        );
        assert_eq!(
            vars["backbone.layer4.1.conv2.weight"].size(),
            [512, 512, 3, 3]
        );
    }

    #[test]
    fn initialisation_is_torchvisions() {
        let (vs, _) = build(Depth::ResNet18, 0.1);
        let all = |t: &Tensor, v: f64| t.eq(v).all().int64_value(&[]) == 1;
        for (name, t) in vs.variables() {
            let t = t.to_kind(Kind::Double);
            if t.dim() == 4 {
                let s = t.size();
                let expected = (2.0 / (s[0] * s[2] * s[3]) as f64).sqrt();
                let std = t.std(true).double_value(&[]);
                let mean = t.mean(None).double_value(&[]);
                let n = t.numel() as f64;
                assert!(
                    (std / expected - 1.0).abs() < 0.1,
                    "{name} {std} {expected}"
                );
                assert!(mean.abs() < 5.0 * expected / n.sqrt(), "{name} {mean}");
            } else if name.ends_with(".weight") || name.ends_with(".running_var") {
                assert!(all(&t, 1.0), "{name}");
            } else {
                assert!(name.ends_with(".bias") || name.ends_with(".running_mean"));
                assert!(all(&t, 0.0), "{name}");
            }
        }
        let w = &vs.variables()["backbone.layer4.1.conv2.weight"];
        let std = w.std(true).double_value(&[]);
        // 2.36 M draws: the standard deviation within 0.3 %.
        assert!((std / (2.0 / 4608f64).sqrt() - 1.0).abs() < 0.003, "{std}");
    }

    #[test]
    fn features_are_pooled_and_batch_norm_uses_the_momentum() {
        let (vs, net) = build(Depth::ResNet18, 0.9);
        let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        assert_eq!(net.forward_t(&x, false).size(), [2, 512]);
        let stem = x.apply(&net.stem.conv);
        let batch_mean = stem.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float);
        let _ = net.forward_t(&x, true);
        let running = &vs.variables()["backbone.bn1.running_mean"];
        assert!(running.allclose(&(batch_mean * 0.9), 1e-4, 1e-5, false));
        let (_, net50) = build(Depth::ResNet50, 0.1);
        assert_eq!(net50.forward_t(&x, false).size(), [2, 2048]);
    }
}
