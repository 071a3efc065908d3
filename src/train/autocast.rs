//! Mixed precision as `torch.autocast("cuda", dtype=torch.bfloat16)`.
//!
//! tch's `autocast` switches CUDA autocast on at libtorch's default dtype,
//! float16, and cannot choose another: a `bf16` run would have computed in
//! float16 without the loss scaling float16 needs. The dtype is set through
//! `autocast.cpp` (built by `build.rs`) around tch's switch and restored
//! after, as the Python context manager does.

use std::ffi::c_int;

use tch::Kind;

extern "C" {
    fn gl_autocast_cuda_dtype() -> c_int;
    fn gl_autocast_set_cuda_dtype(dtype: c_int);
}

/// c10's `ScalarType` codes of the kinds autocast computes in.
const HALF: c_int = 5;
const BFLOAT16: c_int = 15;

/// The kind CUDA autocast computes in on this thread.
pub fn cuda_dtype() -> Kind {
    match unsafe { gl_autocast_cuda_dtype() } {
        HALF => Kind::Half,
        BFLOAT16 => Kind::BFloat16,
        _ => Kind::Float,
    }
}

/// Restores the thread's autocast dtype when dropped (on a panic too).
struct RestoreDtype(c_int);

impl Drop for RestoreDtype {
    fn drop(&mut self) {
        unsafe { gl_autocast_set_cuda_dtype(self.0) }
    }
}

/// Runs `f` under CUDA autocast to bfloat16 (without CUDA, `f` runs as is).
pub fn bfloat16<T>(f: impl FnOnce() -> T) -> T {
    let _restore = RestoreDtype(unsafe { gl_autocast_cuda_dtype() });
    unsafe { gl_autocast_set_cuda_dtype(BFLOAT16) };
    tch::autocast(true, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inside, autocast computes in bfloat16; after, in what it did before
    /// (libtorch's default, float16), also when `f` panics.
    #[test]
    fn bfloat16_sets_the_dtype_and_restores_it() {
        assert_eq!(cuda_dtype(), Kind::Half, "libtorch's default");
        assert_eq!(bfloat16(cuda_dtype), Kind::BFloat16);
        assert_eq!(cuda_dtype(), Kind::Half);
        let panicked = std::panic::catch_unwind(|| bfloat16(|| panic!("inside")));
        assert!(panicked.is_err());
        assert_eq!(cuda_dtype(), Kind::Half);
    }
}
