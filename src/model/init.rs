//! Layer builders whose variables start exactly as PyTorch's do.
//!
//! tch's `nn` defaults differ from PyTorch's: its convolutions and linear
//! layers draw Kaiming-uniform weights with the ReLU gain (bound
//! `sqrt(6 / fan_in)`, 2.45 times PyTorch's) and its BatchNorm draws gamma
//! from U(0, 1). Every layer of this crate is built here instead, with every
//! initialisation spelled out (`nn::Init::Uniform`, `Randn`, `Const`), so that
//! nothing depends on a tch default.

use std::borrow::Borrow;

use tch::nn;

/// `1 / sqrt(fan_in)`: the bound of PyTorch's default weights and biases of
/// `nn.Linear` and `nn.Conv2d`.
///
/// `reset_parameters` calls `kaiming_uniform_(w, a=sqrt(5))`: gain
/// `sqrt(2 / (1 + a^2)) = sqrt(1/3)`, bound `gain * sqrt(3 / fan_in) =
/// 1 / sqrt(fan_in)`; the bias is drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
pub fn torch_default_bound(fan_in: i64) -> f64 {
    1.0 / (fan_in as f64).sqrt()
}

/// U(-bound, bound) with `bound` = [`torch_default_bound`]`(fan_in)`.
pub fn torch_default_uniform(fan_in: i64) -> nn::Init {
    let bound = torch_default_bound(fan_in);
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// The shape of a square 2-d convolution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conv {
    pub c_in: i64,
    pub c_out: i64,
    /// Kernel size (k x k).
    pub k: i64,
    pub stride: i64,
    pub padding: i64,
}

impl Conv {
    /// A k x k convolution from `c_in` to `c_out` channels.
    pub fn new(c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64) -> Self {
        Conv {
            c_in,
            c_out,
            k,
            stride,
            padding,
        }
    }

    /// `c_in * k * k`, as `torch.nn.init._calculate_fan_in_and_fan_out`.
    pub fn fan_in(&self) -> i64 {
        self.c_in * self.k * self.k
    }

    /// `c_out * k * k`, as `torch.nn.init._calculate_fan_in_and_fan_out`.
    pub fn fan_out(&self) -> i64 {
        self.c_out * self.k * self.k
    }

    fn build<'a, T: Borrow<nn::Path<'a>>>(
        &self,
        p: T,
        bias: bool,
        ws_init: nn::Init,
        bs_init: nn::Init,
    ) -> nn::Conv2D {
        let cfg = nn::ConvConfig {
            stride: self.stride,
            padding: self.padding,
            dilation: 1,
            groups: 1,
            bias,
            ws_init,
            bs_init,
            padding_mode: nn::PaddingMode::Zeros,
        };
        nn::conv2d(p, self.c_in, self.c_out, self.k, cfg)
    }
}

/// `torch.nn.Conv2d(c_in, c_out, k, stride, padding, bias=bias)` as
/// constructed: weight and bias both U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
/// `fan_in = c_in * k * k` (see [`torch_default_bound`]).
pub fn torch_conv2d<'a, T: Borrow<nn::Path<'a>>>(p: T, conv: Conv, bias: bool) -> nn::Conv2D {
    let init = torch_default_uniform(conv.fan_in());
    conv.build(p, bias, init, init)
}

/// A convolution of torchvision's ResNets: no bias, weight from
/// `kaiming_normal_(w, mode="fan_out", nonlinearity="relu")`, i.e.
/// N(0, sqrt(2 / fan_out)) with `fan_out = c_out * k * k`.
pub fn torchvision_conv2d<'a, T: Borrow<nn::Path<'a>>>(p: T, conv: Conv) -> nn::Conv2D {
    let stdev = (2.0 / conv.fan_out() as f64).sqrt();
    let init = nn::Init::Randn { mean: 0.0, stdev };
    conv.build(p, false, init, nn::Init::Const(0.0))
}

/// `torch.nn.BatchNorm2d(channels, eps=1e-5, momentum=momentum)` as
/// constructed: weight (gamma) 1, bias (beta) 0, running_mean 0,
/// running_var 1. `momentum` is PyTorch's: `running = (1 - momentum) *
/// running + momentum * batch_statistic` (0.1 is PyTorch's default). tch
/// keeps no `num_batches_tracked`, which only matters for `momentum=None`.
pub fn batch_norm2d<'a, T: Borrow<nn::Path<'a>>>(
    p: T,
    channels: i64,
    momentum: f64,
) -> nn::BatchNorm {
    let cfg = nn::BatchNormConfig {
        cudnn_enabled: true,
        eps: 1e-5,
        momentum,
        affine: true,
        ws_init: nn::Init::Const(1.0),
        bs_init: nn::Init::Const(0.0),
    };
    nn::batch_norm2d(p, channels, cfg)
}

/// `torch.nn.Linear(c_in, c_out, bias=bias)` as constructed: weight and
/// bias U(-1/sqrt(c_in), 1/sqrt(c_in)) (see [`torch_default_bound`]).
pub fn torch_linear<'a, T: Borrow<nn::Path<'a>>>(
    p: T,
    c_in: i64,
    c_out: i64,
    bias: bool,
) -> nn::Linear {
    let init = torch_default_uniform(c_in);
    let cfg = nn::LinearConfig {
        ws_init: init,
        bs_init: Some(init),
        bias,
    };
    nn::linear(p, c_in, c_out, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    fn f(t: &Tensor) -> f64 {
        t.double_value(&[])
    }

    /// Max |x|, mean and standard deviation.
    fn stats(t: &Tensor) -> (f64, f64, f64) {
        let t = t.to_kind(Kind::Double);
        (f(&t.abs().max()), f(&t.mean(None)), f(&t.std(true)))
    }

    #[test]
    fn torch_conv2d_is_uniform_in_one_over_sqrt_fan_in() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let conv = Conv::new(64, 128, 3, 2, 1);
        let c = torch_conv2d(vs.root() / "c", conv, true);
        assert_eq!(c.ws.size(), [128, 64, 3, 3]);
        let bound = 1.0 / 576f64.sqrt();
        let (max, mean, std) = stats(&c.ws);
        assert!(max <= bound && max > 0.999 * bound, "{max} {bound}");
        assert!(mean.abs() < 5.0 * bound / (3.0 * 73728f64).sqrt(), "{mean}");
        // U(-b, b) has standard deviation b / sqrt(3).
        assert!((std / (bound / 3f64.sqrt()) - 1.0).abs() < 0.01, "{std}");
        let b = c.bs.as_ref().unwrap();
        assert_eq!(b.size(), [128]);
        assert!(stats(b).0 <= bound);
        let plain = torch_conv2d(vs.root() / "d", conv, false);
        assert!(plain.bs.is_none());
        let names: Vec<String> = vs.variables().into_keys().collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn torchvision_conv2d_is_normal_with_fan_out() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let c = torchvision_conv2d(vs.root() / "c", Conv::new(64, 128, 3, 1, 1));
        assert!(c.bs.is_none());
        let (max, mean, std) = stats(&c.ws);
        let expected = (2.0 / (128.0 * 9.0f64)).sqrt();
        assert!((std / expected - 1.0).abs() < 0.01, "{std} {expected}");
        assert!(mean.abs() < 5.0 * expected / 73728f64.sqrt(), "{mean}");
        // A normal sample of 73,728 reaches about 4.4 standard deviations.
        assert!(max > 3.5 * expected, "{max}");
    }

    #[test]
    fn batch_norm_starts_at_identity_and_uses_its_momentum() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let bn = batch_norm2d(vs.root() / "bn", 8, 0.9);
        let ones = Tensor::ones([8], (Kind::Float, Device::Cpu));
        assert!(bn.ws.as_ref().unwrap().equal(&ones));
        assert!(bn.bs.as_ref().unwrap().equal(&ones.zeros_like()));
        assert!(bn.running_mean.equal(&ones.zeros_like()));
        assert!(bn.running_var.equal(&ones));
        let x = Tensor::randn([4, 8, 5, 5], (Kind::Float, Device::Cpu)) + 3.0;
        let _ = nn::ModuleT::forward_t(&bn, &x, true);
        let batch_mean = x.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float);
        // running = (1 - m) * 0 + m * batch mean, PyTorch's convention.
        assert!(bn
            .running_mean
            .allclose(&(batch_mean * 0.9), 1e-5, 1e-6, false));
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        assert_eq!(
            names,
            ["bn.bias", "bn.running_mean", "bn.running_var", "bn.weight"]
        );
    }

    #[test]
    fn torch_linear_is_uniform_in_one_over_sqrt_fan_in() {
        tch::manual_seed(4);
        let vs = nn::VarStore::new(Device::Cpu);
        let l = torch_linear(vs.root() / "l", 400, 300, true);
        assert_eq!(l.ws.size(), [300, 400]);
        let bound = 0.05;
        let (max, _, std) = stats(&l.ws);
        assert!(max <= bound && max > 0.999 * bound, "{max}");
        assert!((std / (bound / 3f64.sqrt()) - 1.0).abs() < 0.01, "{std}");
        let (bmax, _, _) = stats(l.bs.as_ref().unwrap());
        assert!(bmax <= bound && bmax > 0.9 * bound, "{bmax}");
        assert!(torch_linear(vs.root() / "n", 4, 3, false).bs.is_none());
    }
}
