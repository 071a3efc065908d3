//! A small CNN for 28-32 px grey images (Fashion-MNIST, glyphs).

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::init::{batch_norm2d, torch_conv2d, Conv};

/// Three conv-BN-ReLU blocks (32, 64, 128 channels, the first two followed by
/// 2x2 max pooling) and global average pooling: 128 features.
#[derive(Debug)]
pub struct ConvNet {
    blocks: Vec<(nn::Conv2D, nn::BatchNorm)>,
}

/// Feature width of [`ConvNet`].
pub const CONVNET_FEATURES: i64 = 128;

impl ConvNet {
    /// Parameters under `p` (`blocks.{i}.conv`, `blocks.{i}.bn`), for images
    /// with `in_channels` channels, initialised as `torch.nn.Conv2d(...,
    /// bias=False)` and `torch.nn.BatchNorm2d(..., momentum=momentum)`.
    pub fn new(p: &nn::Path, in_channels: i64, momentum: f64) -> Self {
        let widths = [32, 64, CONVNET_FEATURES];
        let mut c_in = in_channels;
        let mut blocks = Vec::new();
        for (i, &c_out) in widths.iter().enumerate() {
            let q = p / "blocks" / i;
            let conv = torch_conv2d(&q / "conv", Conv::new(c_in, c_out, 3, 1, 1), false);
            let bn = batch_norm2d(&q / "bn", c_out, momentum);
            blocks.push((conv, bn));
            c_in = c_out;
        }
        ConvNet { blocks }
    }
}

impl ModuleT for ConvNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let last = self.blocks.len() - 1;
        let mut x = xs.shallow_clone();
        for (i, (conv, bn)) in self.blocks.iter().enumerate() {
            x = x.apply(conv).apply_t(bn, train).relu();
            if i < last {
                x = x.max_pool2d_default(2);
            }
        }
        x.mean_dim([2i64, 3].as_slice(), false, x.kind())
    }
}
