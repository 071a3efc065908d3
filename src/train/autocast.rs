//! Mixed precision as `torch.autocast("cuda", dtype=torch.bfloat16)`.
//!
//! tch's `autocast` switches CUDA autocast on at libtorch's default dtype,
//! float16, and cannot choose another: a `bf16` run would have computed in
//! float16 without the loss scaling float16 needs. It also leaves autocast
//! on when its closure panics. Here `autocast.cpp` (built by `build.rs`)
//! enters and leaves the region, and a guard leaves it on a panic too, as
//! the Python context manager's `__exit__` does.

use std::ffi::c_int;

use tch::Kind;

extern "C" {
    fn gl_autocast_cuda_enabled() -> c_int;
    fn gl_autocast_cuda_dtype() -> c_int;
    fn gl_autocast_enter(dtype: c_int, enabled: *mut c_int, dtype_before: *mut c_int);
    fn gl_autocast_exit(enabled: c_int, dtype_before: c_int);
}

/// c10's `ScalarType` codes of the kinds autocast computes in.
const HALF: c_int = 5;
const BFLOAT16: c_int = 15;

/// Whether CUDA autocast is on in this thread.
pub fn cuda_enabled() -> bool {
    unsafe { gl_autocast_cuda_enabled() != 0 }
}

/// The kind CUDA autocast computes in on this thread.
pub fn cuda_dtype() -> Kind {
    match unsafe { gl_autocast_cuda_dtype() } {
        HALF => Kind::Half,
        BFLOAT16 => Kind::BFloat16,
        _ => Kind::Float,
    }
}

/// An autocast region; dropping it (on a panic too) restores what was.
struct Region {
    enabled: c_int,
    dtype_before: c_int,
}

impl Region {
    fn enter(dtype: c_int) -> Self {
        let (mut enabled, mut dtype_before) = (0, 0);
        unsafe { gl_autocast_enter(dtype, &mut enabled, &mut dtype_before) };
        Region {
            enabled,
            dtype_before,
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        unsafe { gl_autocast_exit(self.enabled, self.dtype_before) }
    }
}

/// Runs `f` under CUDA autocast to bfloat16 (operations on the CPU are not
/// affected).
pub fn bfloat16<T>(f: impl FnOnce() -> T) -> T {
    let _region = Region::enter(BFLOAT16);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inside, autocast is on and computes in bfloat16; after, it is off
    /// and at libtorch's default dtype again, also when `f` panics.
    #[test]
    fn bfloat16_enters_and_leaves_the_region() {
        assert!(!cuda_enabled());
        assert_eq!(cuda_dtype(), Kind::Half, "libtorch's default");
        assert_eq!(
            bfloat16(|| (cuda_enabled(), cuda_dtype())),
            (true, Kind::BFloat16)
        );
        // Nested regions restore the outer one.
        let nested = bfloat16(|| {
            let inner = bfloat16(cuda_enabled);
            (inner, cuda_enabled(), cuda_dtype())
        });
        assert_eq!(nested, (true, true, Kind::BFloat16));
        assert_eq!((cuda_enabled(), cuda_dtype()), (false, Kind::Half));
        let panicked = std::panic::catch_unwind(|| bfloat16(|| panic!("inside")));
        assert!(panicked.is_err());
        assert_eq!((cuda_enabled(), cuda_dtype()), (false, Kind::Half));
    }
}
