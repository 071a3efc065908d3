//! Builds the C++ halves of `model::script` and `train::autocast` (what
//! tch's C API does not reach) and sets the link flags for
//! binaries that load libtorch without Python (tests, examples).
//!
//! torch-sys publishes the directory of the libtorch it linked (`links = "tch"`
//! gives us `DEP_TCH_LIBTORCH_LIB`); its headers are in `../include` beside it,
//! in pip's torch as in a libtorch download. Test binaries need an rpath to
//! it, and `--no-as-needed` before the torch libraries so that `libtorch_cuda`
//! stays a dependency even though no symbol of it is referenced directly:
//! without it a test binary on a GPU machine would see no CUDA device.
use std::path::Path;

const CPP_FILES: [&str; 2] = ["src/model/script.cpp", "src/train/autocast.cpp"];

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    for file in CPP_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not publish its libtorch directory (DEP_TCH_LIBTORCH_LIB)");
    let lib = Path::new(&lib);
    compile_cpp(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for name in ["torch_cuda", "torch"] {
        if lib.join(format!("lib{name}.so")).exists() {
            println!("cargo:rustc-link-arg=-l{name}");
        }
    }
}

/// Compiles `CPP_FILES` with the flags torch-sys compiles its own C++ with
/// (C++17, the C++11 ABI unless `LIBTORCH_CXX11_ABI=0`, as torch-sys reads it).
fn compile_cpp(lib: &Path) {
    let include = lib
        .parent()
        .expect("libtorch's lib has a parent")
        .join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .files(CPP_FILES)
        .compile("grouploss_cxx");
}
