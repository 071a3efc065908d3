//! Link flags for binaries that load libtorch without Python (tests, examples).
//!
//! torch-sys publishes the directory of the libtorch it linked (`links = "tch"`
//! gives us `DEP_TCH_LIBTORCH_LIB`). Test binaries need an rpath to it, and
//! `--no-as-needed` before the torch libraries so that `libtorch_cuda` stays a
//! dependency even though no symbol of it is referenced directly: without it
//! a test binary on a GPU machine would see no CUDA device.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = Path::new(&lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for name in ["torch_cuda", "torch"] {
        if lib.join(format!("lib{name}.so")).exists() {
            println!("cargo:rustc-link-arg=-l{name}");
        }
    }
}
