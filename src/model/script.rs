//! A user's TorchScript module, its buffers included.
//!
//! tch's `TrainableCModule` registers a module's parameters only (and renames
//! `a.b` to `a_b`), so a scripted backbone's BatchNorm running statistics
//! were in no checkpoint: the best weights reloaded with the statistics of
//! the last step, a resumed run and `load_run` with those of the file. This
//! module loads the file through a small C++ half (`script.cpp`, built by
//! `build.rs`) that also lists the buffers, and [`ScriptModule::register`]
//! puts both into a `VarStore` under PyTorch's `state_dict` names. The
//! variables share storage with the module, so loading a checkpoint into the
//! store sets the module's tensors, and the module's in-place updates of its
//! running statistics are what the store saves.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::ptr::NonNull;

use tch::nn;
use tch::{Device, Tensor};
use torch_sys::C_tensor;

use crate::error::{Error, Result};

type NamedTensor = extern "C" fn(data: *mut c_void, name: *const c_char, tensor: *mut C_tensor);

extern "C" {
    fn gl_script_free_error(error: *mut c_char);
    fn gl_script_load(path: *const c_char, device: c_int, error: *mut *mut c_char) -> *mut c_void;
    fn gl_script_free(module: *mut c_void);
    fn gl_script_named(
        module: *mut c_void,
        buffers: c_int,
        data: *mut c_void,
        f: NamedTensor,
        error: *mut *mut c_char,
    ) -> c_int;
    fn gl_script_train(module: *mut c_void, on: c_int, error: *mut *mut c_char) -> c_int;
    fn gl_script_forward(
        module: *mut c_void,
        input: *const C_tensor,
        error: *mut *mut c_char,
    ) -> *mut C_tensor;
}

/// Calls a shim function and takes the error text it left, if any; a
/// result that `failed` without a text (its copy could not be allocated)
/// is an error too.
fn checked<T>(
    call: impl FnOnce(*mut *mut c_char) -> T,
    failed: impl FnOnce(&T) -> bool,
) -> std::result::Result<T, String> {
    let mut error: *mut c_char = std::ptr::null_mut();
    let out = call(&mut error);
    if !error.is_null() {
        // SAFETY: a non-null error is a NUL-terminated copy the shim malloc'd.
        let text = unsafe { CStr::from_ptr(error) }
            .to_string_lossy()
            .into_owned();
        unsafe { gl_script_free_error(error) };
        return Err(text);
    }
    if failed(&out) {
        return Err("a C++ error (its message could not be copied)".into());
    }
    Ok(out)
}

extern "C" fn push_named(data: *mut c_void, name: *const c_char, tensor: *mut C_tensor) {
    // SAFETY: `data` is the `Vec` that `named` passed; `name` lives for the
    // call; `tensor` is a new `at::Tensor*` whose ownership passes to us.
    let out = unsafe { &mut *(data as *mut Vec<(String, Tensor)>) };
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    out.push((name, unsafe { Tensor::from_ptr(tensor) }));
}

/// A loaded `torch::jit::Module`.
#[derive(Debug)]
pub struct ScriptModule {
    module: NonNull<c_void>,
}

// SAFETY: a `torch::jit::Module` may move between threads; the backbone
// serialises calls behind a mutex.
unsafe impl Send for ScriptModule {}

impl Drop for ScriptModule {
    fn drop(&mut self) {
        unsafe { gl_script_free(self.module.as_ptr()) }
    }
}

impl ScriptModule {
    /// Loads the TorchScript file at `path` onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let unloadable = |why: String| {
            Error::format(
                path,
                None,
                format!("not a loadable TorchScript module: {why}"),
            )
        };
        let index = match device {
            Device::Cpu => -1,
            Device::Cuda(i) => i as c_int,
            other => return Err(unloadable(format!("device {other:?} is not supported"))),
        };
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| unloadable("the path holds a NUL byte".into()))?;
        let ptr = checked(
            |e| unsafe { gl_script_load(c_path.as_ptr(), index, e) },
            |p| p.is_null(),
        )
        .map_err(unloadable)?;
        let module = NonNull::new(ptr).ok_or_else(|| unloadable("no module".into()))?;
        Ok(ScriptModule { module })
    }

    fn named(&self, buffers: bool) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = Vec::new();
        let data = &mut out as *mut Vec<(String, Tensor)> as *mut c_void;
        let which = c_int::from(buffers);
        checked(
            |e| unsafe { gl_script_named(self.module.as_ptr(), which, data, push_named, e) },
            |rc| *rc != 0,
        )
        .map_err(|why| Error::Internal(format!("listing a TorchScript module's tensors: {why}")))?;
        Ok(out)
    }

    /// Parameters, named as in PyTorch's `named_parameters()`.
    pub fn named_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        self.named(false)
    }

    /// Buffers (BatchNorm's running statistics and batch counter), named as
    /// in PyTorch's `named_buffers()`.
    pub fn named_buffers(&self) -> Result<Vec<(String, Tensor)>> {
        self.named(true)
    }

    /// Adds every parameter and buffer under `root`, at its `state_dict` name
    /// (`layer1.0.bn1.running_mean` becomes `root/layer1/0/bn1/running_mean`).
    /// A parameter is trainable unless the module froze it
    /// (`requires_grad=False`); a buffer never is.
    pub fn register(&self, root: &nn::Path) -> Result<()> {
        let parameters = self.named_parameters()?.into_iter().map(|(n, t)| {
            let trainable = t.requires_grad();
            (n, t, trainable)
        });
        let buffers = self
            .named_buffers()?
            .into_iter()
            .map(|(n, t)| (n, t, false));
        for (name, tensor, trainable) in parameters.chain(buffers) {
            let mut parts: Vec<&str> = name.split('.').collect();
            let last = parts.pop().unwrap_or_default();
            let path = parts.iter().fold(root.clone(), |p, part| p.sub(part));
            let _ = path.add(last, tensor, trainable);
        }
        Ok(())
    }

    /// Switches training mode (BatchNorm, dropout) on or off.
    pub fn set_train(&mut self, on: bool) -> Result<()> {
        checked(
            |e| unsafe { gl_script_train(self.module.as_ptr(), c_int::from(on), e) },
            |rc| *rc != 0,
        )
        .map_err(|why| Error::Internal(format!("switching a TorchScript module's mode: {why}")))?;
        Ok(())
    }

    /// `forward(x)`; the error is the module's own message.
    pub fn forward(&self, x: &Tensor) -> std::result::Result<Tensor, String> {
        let out = checked(
            |e| unsafe { gl_script_forward(self.module.as_ptr(), x.as_ptr(), e) },
            |p| p.is_null(),
        )?;
        // SAFETY: a new `at::Tensor*`, ours to own.
        Ok(unsafe { Tensor::from_ptr(out) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that is not TorchScript is a format error naming the file and
    /// carrying libtorch's reason (the C++ exception does not cross the FFI).
    #[test]
    fn a_file_that_is_not_torchscript_is_named() {
        let dir = crate::data::testing::temp_dir("script");
        let path = dir.join("not-a-module.pt");
        std::fs::write(&path, b"PK\x03\x04 this is not a zip archive").unwrap();
        let err = ScriptModule::load(&path, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not-a-module.pt"), "{err}");
        assert!(err.contains("not a loadable TorchScript module: "), "{err}");
        assert!(
            err.len() > "not a loadable TorchScript module: ".len() + 20,
            "{err}"
        );
        let missing = dir.join("missing.pt");
        let err = ScriptModule::load(&missing, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pt"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
