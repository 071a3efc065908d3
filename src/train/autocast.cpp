// CUDA autocast's dtype, which tch cannot set: its `autocast` enables CUDA
// autocast at libtorch's default dtype, float16. The dtype is thread-local,
// as is autocast's switch. ScalarTypes cross as c10's integer codes.
#include <ATen/autocast_mode.h>

extern "C" {

int gl_autocast_cuda_dtype() {
  return static_cast<int>(at::autocast::get_autocast_dtype(at::kCUDA));
}

void gl_autocast_set_cuda_dtype(int dtype) {
  at::autocast::set_autocast_dtype(at::kCUDA,
                                   static_cast<at::ScalarType>(dtype));
}

} // extern "C"
