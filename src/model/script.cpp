// A TorchScript module with its buffers: tch's `TrainableCModule` registers
// a module's parameters only, so BatchNorm's running statistics never reached
// the trainer's checkpoints. Tensors cross as `at::Tensor*`, tch's `C_tensor`;
// every function catches C++ exceptions and returns their text in `*error`
// (free it with gl_script_free_error).
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace {

char *copy_error(const char *what) {
  size_t n = std::strlen(what) + 1;
  char *out = static_cast<char *>(std::malloc(n));
  if (out != nullptr) {
    std::memcpy(out, what, n);
  }
  return out;
}

torch::jit::Module *as_module(void *m) {
  return static_cast<torch::jit::Module *>(m);
}

} // namespace

// Runs the statements after `on_error` and returns what they return; a C++
// exception becomes `*error` and `on_error`. (Variadic: a comma in the
// statements does not split them.)
#define GL_TRY(on_error, ...)                                                  \
  try {                                                                        \
    __VA_ARGS__                                                                \
  } catch (const c10::Error &e) {                                              \
    *error = copy_error(e.what_without_backtrace());                           \
    return on_error;                                                           \
  } catch (const std::exception &e) {                                          \
    *error = copy_error(e.what());                                             \
    return on_error;                                                           \
  } catch (...) {                                                              \
    *error = copy_error("unknown C++ exception");                              \
    return on_error;                                                           \
  }

extern "C" {

typedef void (*gl_named_tensor)(void *data, const char *name,
                                at::Tensor *tensor);

void gl_script_free_error(char *error) { std::free(error); }

// `device`: -1 for the CPU, else the CUDA device's index.
void *gl_script_load(const char *path, int device, char **error) {
  GL_TRY(nullptr, {
    c10::Device dev = device < 0 ? c10::Device(c10::kCPU)
                                 : c10::Device(c10::kCUDA, device);
    return new torch::jit::Module(torch::jit::load(path, dev));
  })
}

void gl_script_free(void *module) { delete as_module(module); }

// Calls `f` with every parameter (`buffers` = 0) or buffer (`buffers` = 1)
// of the module and its submodules, named as in PyTorch's state_dict.
int gl_script_named(void *module, int buffers, void *data, gl_named_tensor f,
                    char **error) {
  GL_TRY(-1, {
    if (buffers != 0) {
      for (const auto &b : as_module(module)->named_buffers(true)) {
        f(data, b.name.c_str(), new at::Tensor(b.value));
      }
    } else {
      for (const auto &p : as_module(module)->named_parameters(true)) {
        f(data, p.name.c_str(), new at::Tensor(p.value));
      }
    }
    return 0;
  })
}

int gl_script_train(void *module, int on, char **error) {
  GL_TRY(-1, {
    as_module(module)->train(on != 0);
    return 0;
  })
}

at::Tensor *gl_script_forward(void *module, const at::Tensor *input,
                              char **error) {
  GL_TRY(nullptr, {
    c10::IValue out = as_module(module)->forward({*input});
    if (!out.isTensor()) {
      throw std::runtime_error(std::string("forward returned a ") +
                               out.tagKind() + ", not a tensor");
    }
    return new at::Tensor(out.toTensor());
  })
}

} // extern "C"
