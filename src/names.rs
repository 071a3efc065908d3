//! Devices and dtypes named as PyTorch names them (`cpu`, `cuda:0`,
//! `float32`), for messages and logs: a user reads the names they write.

use std::ffi::{c_char, c_int, CStr};

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn gl_device_name(tensor: *const C_tensor, out: *mut c_char, size: usize);
    fn gl_has_own_data(tensor: *const C_tensor) -> c_int;
}

/// `cpu`, `cuda:N`, `mps`, `vulkan`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

/// The device of `t` as PyTorch names it, the devices tch cannot tell
/// apart included (it reports `meta`, `xpu`, ... as [`Device::Mps`]).
pub fn tensor_device_name(t: &Tensor) -> String {
    match t.device() {
        Device::Cpu | Device::Cuda(_) => device_name(t.device()),
        _ => {
            let mut out: [c_char; 64] = [0; 64];
            // SAFETY: `t` is a live tensor; the function writes at most
            // `out.len()` bytes, the last a NUL.
            unsafe { gl_device_name(t.as_ptr(), out.as_mut_ptr(), out.len()) };
            // SAFETY: NUL-terminated above.
            unsafe { CStr::from_ptr(out.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        }
    }
}

/// Whether `t`'s data can be computed on here: the CPU or a CUDA device
/// (not a `meta` tensor, which holds no data, nor an `mps` or `xpu` one).
pub fn is_supported_device(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu | Device::Cuda(_))
}

/// Whether `t` holds its data itself, not torch.func's wrappers (under
/// `vmap`, `grad`, `jacrev`, `jacfwd`: no storage) nor torch.export's
/// FakeTensors and FunctionalTensors (a Python or functionalization layer).
pub fn has_own_data(t: &Tensor) -> bool {
    // SAFETY: `t` is a live tensor; the function only reads it.
    unsafe { gl_has_own_data(t.as_ptr()) == 1 }
}

/// `float32`, `int64`, `bool`, ... (`torch.<name>`).
pub fn dtype_name(kind: Kind) -> String {
    let name = match kind {
        Kind::Uint8 => "uint8",
        Kind::Int8 => "int8",
        Kind::Int16 => "int16",
        Kind::Int => "int32",
        Kind::Int64 => "int64",
        Kind::Half => "float16",
        Kind::Float => "float32",
        Kind::Double => "float64",
        Kind::ComplexHalf => "complex32",
        Kind::ComplexFloat => "complex64",
        Kind::ComplexDouble => "complex128",
        Kind::Bool => "bool",
        Kind::BFloat16 => "bfloat16",
        other => return format!("{other:?}").to_lowercase(),
    };
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_pytorch_names() {
        assert_eq!(device_name(Device::Cpu), "cpu");
        assert_eq!(device_name(Device::Cuda(1)), "cuda:1");
        assert_eq!(dtype_name(Kind::Float), "float32");
        assert_eq!(dtype_name(Kind::Int64), "int64");
        assert_eq!(dtype_name(Kind::BFloat16), "bfloat16");
    }

    #[test]
    fn a_tensors_device_is_named_as_pytorch_names_it() {
        let t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        assert_eq!(tensor_device_name(&t), "cpu");
        assert!(is_supported_device(&t) && has_own_data(&t));
    }
}
