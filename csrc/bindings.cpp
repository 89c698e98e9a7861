// Python module b2fast._C.  The ops are registered with the dispatcher by TORCH_LIBRARY_* in
// each csrc/<op>.cpp and reached as torch.ops.b2fast.<op>; this module only reports how the
// extension was built.  It includes pybind11 alone (not torch/extension.h) to keep compiles short.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#define B2FAST_STR_(x) #x
#define B2FAST_STR(x) B2FAST_STR_(x)

namespace {

bool has_cuda() {
#ifdef B2FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "b2fast compiled ops (C++/CUDA); use them through b2fast.ops";
#ifdef B2FAST_VERSION
  m.attr("__version__") = B2FAST_STR(B2FAST_VERSION);
#else
  m.attr("__version__") = "unknown";
#endif
  // The torch this extension was compiled against; the ABI must match the torch it runs with.
  m.attr("torch_version") = TORCH_VERSION;
  m.def("has_cuda", &has_cuda, "True when the extension was built with its CUDA kernels");
}
