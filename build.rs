//! Builds the C++ halves of `model::script`, `train::autocast`, `names` and
//! `eval::exact` (what tch's C API does not reach) and sets the link flags for
//! binaries that load libtorch without Python (tests, examples).
//!
//! torch-sys publishes the directory of the libtorch it linked (`links = "tch"`
//! gives us `DEP_TCH_LIBTORCH_LIB`); its headers are in `../include` beside it,
//! in pip's torch as in a libtorch download. Test binaries need an rpath to
//! it, and `--no-as-needed` before the torch libraries so that `libtorch_cuda`
//! stays a dependency even though no symbol of it is referenced directly:
//! without it a test binary on a GPU machine would see no CUDA device.
use std::path::Path;

const CPP_FILES: [&str; 4] = [
    "src/model/script.cpp",
    "src/train/autocast.cpp",
    "src/names.cpp",
    "src/eval/precision.cpp",
];

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
    write_option_docs();
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for name in ["torch_cuda", "torch"] {
        if lib.join(format!("lib{name}.so")).exists() {
            println!("cargo:rustc-link-arg=-l{name}");
        }
    }
}

/// Compiles `CPP_FILES` with the flags torch-sys compiles its own C++ with:
/// C++17 and the C++11 ABI, the only one of torch >= 2.7 (pinned at 2.13;
/// `LIBTORCH_CXX11_ABI=0` for an older libtorch, which torch-sys would have
/// read from Python under `LIBTORCH_USE_PYTORCH`).
fn compile_cpp(lib: &Path) {
    // A torch upgraded in place keeps its folder: rebuild on its library.
    println!(
        "cargo:rerun-if-changed={}",
        lib.join("libtorch_cpu.so").display()
    );
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

/// The structs whose fields are a run's options, and their files.
const OPTION_STRUCTS: [(&str, &str); 2] = [
    ("src/train/config.rs", "TrainConfig"),
    ("src/loss/options.rs", "GroupLossSettings"),
];

/// Writes `OPTION_DOCS`, each option's doc comment, for `--help`: the
/// comments on the fields are the options' one description.
fn write_option_docs() {
    let mut docs = Vec::new();
    for (file, name) in OPTION_STRUCTS {
        println!("cargo:rerun-if-changed={file}");
        let source = std::fs::read_to_string(file).expect("an option struct's file");
        docs.extend(field_docs(&source, name));
    }
    let entries: String = docs
        .iter()
        .map(|(field, doc)| format!("    ({field:?}, {doc:?}),\n"))
        .collect();
    let out = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("option_docs.rs");
    let code = format!("/// Each option and its description.\npub const OPTION_DOCS: &[(&str, &str)] = &[\n{entries}];\n");
    std::fs::write(out, code).expect("writing option_docs.rs");
}

/// `(field, doc comment)` of each serialised field of `pub struct NAME`
/// (fields marked `#[serde(skip)]` or `#[serde(flatten)]` left out). Every
/// field line (`name: Type,`, public or not) ends the comment before it.
fn field_docs(source: &str, name: &str) -> Vec<(String, String)> {
    let start = source
        .find(&format!("pub struct {name} {{"))
        .unwrap_or_else(|| panic!("pub struct {name} not found"));
    let mut out = Vec::new();
    let (mut doc, mut skipped) = (Vec::<String>::new(), false);
    for line in source[start..].lines().skip(1) {
        let line = line.trim();
        if line == "}" {
            break;
        }
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim().to_string());
        } else if line == "#[serde(skip)]" || line == "#[serde(flatten)]" {
            skipped = true;
        } else if line.starts_with("#[serde") {
            panic!("{name}: `{line}` is not understood by build.rs's field_docs");
        } else if !line.starts_with("//") && line.ends_with(',') && line.contains(':') {
            let field = line.split(':').next().unwrap_or_default();
            if let (Some(field), false) = (field.strip_prefix("pub "), skipped) {
                let text: Vec<&str> = doc
                    .iter()
                    .map(String::as_str)
                    .filter(|t| !t.is_empty())
                    .collect();
                out.push((field.trim().to_string(), text.join(" ")));
            }
            doc.clear();
            skipped = false;
        }
    }
    out
}
