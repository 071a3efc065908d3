// CUDA autocast with a dtype, which tch cannot choose: its `autocast`
// enables CUDA autocast at libtorch's default dtype, float16. The switch,
// the dtype and the nesting count are thread-local. ScalarTypes cross as
// c10's integer codes. Nothing here throws into Rust (noexcept).
#include <ATen/autocast_mode.h>

extern "C" {

int gl_autocast_cuda_enabled() noexcept {
  return at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0;
}

int gl_autocast_cuda_dtype() noexcept {
  return static_cast<int>(at::autocast::get_autocast_dtype(at::kCUDA));
}

// Switches CUDA autocast on at `dtype`; `*enabled` and `*dtype_before`
// receive what gl_autocast_exit restores.
void gl_autocast_enter(int dtype, int *enabled, int *dtype_before) noexcept {
  *enabled = gl_autocast_cuda_enabled();
  *dtype_before = gl_autocast_cuda_dtype();
  at::autocast::set_autocast_dtype(at::kCUDA,
                                   static_cast<at::ScalarType>(dtype));
  at::autocast::set_autocast_enabled(at::kCUDA, true);
  at::autocast::increment_nesting();
}

// Undoes gl_autocast_enter (clearing the cast cache when the outermost
// autocast region ends, as torch.autocast's __exit__ does).
void gl_autocast_exit(int enabled, int dtype_before) noexcept {
  if (at::autocast::decrement_nesting() == 0) {
    at::autocast::clear_cache();
  }
  at::autocast::set_autocast_enabled(at::kCUDA, enabled != 0);
  at::autocast::set_autocast_dtype(at::kCUDA,
                                   static_cast<at::ScalarType>(dtype_before));
}

} // extern "C"
