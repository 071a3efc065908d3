// Whether libtorch may run float32 matrix products in reduced precision
// (TF32 or bfloat16): set by torch.set_float32_matmul_precision("high" or
// "medium"), torch.backends.cuda.matmul.allow_tf32, or the backends'
// fp32_precision. The evaluation's error bounds hold for IEEE float32
// products only. Nothing here throws into Rust (noexcept).
#include <ATen/Context.h>

extern "C" {

// 1 when reduced precision is allowed for CUDA (`cuda` != 0) or CPU
// (oneDNN) float32 products, or the setting cannot be read.
int gl_float32_matmul_is_reduced(int cuda) noexcept {
  try {
    auto &ctx = at::globalContext();
    auto backend = cuda ? at::Float32Backend::CUDA : at::Float32Backend::MKLDNN;
    auto p = ctx.float32Precision(backend, at::Float32Op::MATMUL);
    bool reduced =
        p == at::Float32Precision::TF32 || p == at::Float32Precision::BF16;
    if (cuda) {
      reduced = reduced || ctx.allowTF32CuBLAS();
    }
    return reduced ? 1 : 0;
  } catch (...) {
    return 1;
  }
}

} // extern "C"
