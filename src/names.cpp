// What tch's C API does not tell of a tensor: the name of its device as
// PyTorch prints it (`cpu`, `cuda:0`, `meta`, `xpu:1`, `mps:0`; tch reports
// every device other than the CPU, CUDA and Vulkan as MPS), and whether its
// data can be read (not by torch.func's wrappers, which have no storage, nor
// through the FakeTensors and FunctionalTensors of torch.export's tracing).
// Nothing here throws into Rust (noexcept).
#include <ATen/core/Tensor.h>

#include <cstring>
#include <string>

extern "C" {

// Writes the name, cut to `size - 1` bytes and NUL-terminated, into `out`.
void gl_device_name(const at::Tensor *tensor, char *out,
                    size_t size) noexcept {
  if (size == 0) {
    return;
  }
  std::string name;
  try {
    name = tensor->device().str();
  } catch (...) {
    name = "unknown";
  }
  size_t n = std::min(name.size(), size - 1);
  std::memcpy(out, name.data(), n);
  out[n] = '\0';
}

// 1 when `tensor` has a storage of its own and no Python or
// functionalization layer in front of it (a meta tensor's has no data:
// its device tells).
int gl_has_own_data(const at::Tensor *tensor) noexcept {
  try {
    auto keys = tensor->key_set();
    bool wrapped = keys.has(c10::DispatchKey::Python) ||
                   keys.has(c10::DispatchKey::Functionalize);
    return tensor->has_storage() && !wrapped ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

} // extern "C"
