//! Devices and dtypes named as PyTorch names them (`cpu`, `cuda:0`,
//! `float32`), for messages and logs: a user reads the names they write.

use tch::{Device, Kind};

/// `cpu`, `cuda:N`, `mps`, `vulkan`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
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
}
