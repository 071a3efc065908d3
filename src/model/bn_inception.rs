//! BN-Inception (Ioffe & Szegedy 2015), the Group Loss paper's backbone.
//!
//! Layer names follow the widely used PyTorch port of the Caffe model
//! (`bn_inception-52deb4733.pth`: `conv1_7x7_s2`, `conv1_7x7_s2_bn`,
//! `inception_3a_1x1`, ...), so its state dict loads as is. It expects
//! Caffe-style input: BGR, 0-255, mean [104, 117, 128] subtracted. The
//! output is the 1024-d globally average-pooled feature.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::init::{batch_norm2d, torch_conv2d, Conv};

/// Feature width of [`BnInception`].
pub const BN_INCEPTION_FEATURES: i64 = 1024;

/// A convolution (with bias, as in the Caffe model) followed by BatchNorm and
/// ReLU, initialised as the PyTorch port's `nn.Conv2d` and `nn.BatchNorm2d`.
#[derive(Debug)]
struct ConvBn {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        p: &nn::Path,
        name: &str,
        c_in: i64,
        c_out: i64,
        k: i64,
        stride: i64,
        pad: i64,
        momentum: f64,
    ) -> Self {
        let conv = torch_conv2d(p / name, Conv::new(c_in, c_out, k, stride, pad), true);
        let bn = batch_norm2d(p / format!("{name}_bn"), c_out, momentum);
        ConvBn { conv, bn }
    }

    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        xs.apply(&self.conv).apply_t(&self.bn, train).relu()
    }
}

/// What an inception block does with its pooling branch.
#[derive(Debug, Clone, Copy)]
enum Pool {
    /// 3x3 average pooling, stride 1, then a 1x1 projection.
    AvgProj(i64),
    /// 3x3 max pooling, stride 1, then a 1x1 projection (5b).
    MaxProj(i64),
    /// 3x3 max pooling with stride 2, no projection (3c, 4e).
    MaxStride2,
}

#[derive(Debug)]
struct Inception {
    one: Option<ConvBn>,
    reduce3: ConvBn,
    conv3: ConvBn,
    dreduce: ConvBn,
    dconv1: ConvBn,
    dconv2: ConvBn,
    pool: Pool,
    proj: Option<ConvBn>,
}

impl Inception {
    /// Widths: (1x1 or 0, 3x3 reduce, 3x3, double reduce, double 3x3, pool).
    fn new(p: &nn::Path, name: &str, c_in: i64, w: [i64; 5], pool: Pool, momentum: f64) -> Self {
        let n = |s: &str| format!("{name}_{s}");
        let stride = if matches!(pool, Pool::MaxStride2) {
            2
        } else {
            1
        };
        let [w1, r3, c3, dr, dc] = w;
        let one = (w1 > 0).then(|| ConvBn::new(p, &n("1x1"), c_in, w1, 1, 1, 0, momentum));
        let proj = match pool {
            Pool::AvgProj(c) | Pool::MaxProj(c) => {
                Some(ConvBn::new(p, &n("pool_proj"), c_in, c, 1, 1, 0, momentum))
            }
            Pool::MaxStride2 => None,
        };
        Inception {
            one,
            reduce3: ConvBn::new(p, &n("3x3_reduce"), c_in, r3, 1, 1, 0, momentum),
            conv3: ConvBn::new(p, &n("3x3"), r3, c3, 3, stride, 1, momentum),
            dreduce: ConvBn::new(p, &n("double_3x3_reduce"), c_in, dr, 1, 1, 0, momentum),
            dconv1: ConvBn::new(p, &n("double_3x3_1"), dr, dc, 3, 1, 1, momentum),
            dconv2: ConvBn::new(p, &n("double_3x3_2"), dc, dc, 3, stride, 1, momentum),
            pool,
            proj,
        }
    }

    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut outs = Vec::with_capacity(4);
        if let Some(one) = &self.one {
            outs.push(one.forward(xs, train));
        }
        outs.push(self.conv3.forward(&self.reduce3.forward(xs, train), train));
        let d = self.dreduce.forward(xs, train);
        outs.push(self.dconv2.forward(&self.dconv1.forward(&d, train), train));
        let pooled = match self.pool {
            Pool::AvgProj(_) => xs.avg_pool2d([3, 3], [1, 1], [1, 1], true, true, None::<i64>),
            Pool::MaxProj(_) => xs.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], true),
            Pool::MaxStride2 => xs.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], true),
        };
        outs.push(match &self.proj {
            Some(proj) => proj.forward(&pooled, train),
            None => pooled,
        });
        Tensor::cat(&outs, 1)
    }
}

/// BN-Inception up to the global average pooling.
#[derive(Debug)]
pub struct BnInception {
    conv1: ConvBn,
    conv2_reduce: ConvBn,
    conv2: ConvBn,
    blocks: Vec<Inception>,
}

impl BnInception {
    /// Parameters directly under `p` with the Caffe port's names, started as
    /// the port's plain `nn.Conv2d` (weights and biases U(+-1/sqrt(fan_in)))
    /// and `nn.BatchNorm2d` (gamma 1, beta 0). `momentum` is BatchNorm's, in
    /// PyTorch's convention (0.1 default; the port uses 0.9).
    pub fn new(p: &nn::Path, momentum: f64) -> Self {
        use Pool::*;
        let specs: [(&str, i64, [i64; 5], Pool); 10] = [
            ("inception_3a", 192, [64, 64, 64, 64, 96], AvgProj(32)),
            ("inception_3b", 256, [64, 64, 96, 64, 96], AvgProj(64)),
            ("inception_3c", 320, [0, 128, 160, 64, 96], MaxStride2),
            ("inception_4a", 576, [224, 64, 96, 96, 128], AvgProj(128)),
            ("inception_4b", 576, [192, 96, 128, 96, 128], AvgProj(128)),
            ("inception_4c", 576, [160, 128, 160, 128, 160], AvgProj(128)),
            ("inception_4d", 608, [96, 128, 192, 160, 192], AvgProj(128)),
            ("inception_4e", 608, [0, 128, 192, 192, 256], MaxStride2),
            (
                "inception_5a",
                1056,
                [352, 192, 320, 160, 224],
                AvgProj(128),
            ),
            (
                "inception_5b",
                1024,
                [352, 192, 320, 192, 224],
                MaxProj(128),
            ),
        ];
        BnInception {
            conv1: ConvBn::new(p, "conv1_7x7_s2", 3, 64, 7, 2, 3, momentum),
            conv2_reduce: ConvBn::new(p, "conv2_3x3_reduce", 64, 64, 1, 1, 0, momentum),
            conv2: ConvBn::new(p, "conv2_3x3", 64, 192, 3, 1, 1, momentum),
            blocks: specs
                .iter()
                .map(|&(name, c_in, w, pool)| Inception::new(p, name, c_in, w, pool, momentum))
                .collect(),
        }
    }
}

impl ModuleT for BnInception {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let x = self.conv1.forward(xs, train);
        let x = x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], true);
        let x = self.conv2_reduce.forward(&x, train);
        let x = self.conv2.forward(&x, train);
        let mut x = x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], true);
        for block in &self.blocks {
            x = block.forward(&x, train);
        }
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }
}
