// C++ test of the CPU fork_index_out kernel, run by ctest (CMakeLists.txt): out against
// latents.index_select(0, index).to(dtype) for several dtype pairs and index patterns (repeats,
// permutations, M != P, M = 0), the range check, and registration.
// Exit status: 0 on success, 1 on any mismatch.
#include <cstdio>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "../fork_index.h"
#include "test_common.h"

namespace {

using b2fast_test::expect;

void check_case(const char* what, int64_t trunks, const at::Tensor& index, at::ScalarType in,
                at::ScalarType out_dtype) {
  // non-contiguous latents: the kernel reads a contiguous copy
  const at::Tensor latents = at::randn({trunks, 3, 5, 4}).to(in).transpose(2, 3);
  at::Tensor out = at::full({index.size(0), 3, 4, 5}, NAN, at::TensorOptions(out_dtype));
  b2fast::fork_index_out_cpu(latents, index, out);
  const at::Tensor want = latents.index_select(0, index).to(out_dtype);
  const std::string name = c10::str(in, " -> ", out_dtype, ", P=", trunks, " M=", index.size(0),
                                    " (", what, ")");
  expect(at::equal(out, want), name + ": out is latents[index] cast");
}

bool raises_out_of_range(int64_t bad) {
  const at::Tensor latents = at::randn({3, 4});
  at::Tensor out = at::zeros({2, 4});
  try {
    b2fast::fork_index_out_cpu(latents, at::tensor({int64_t{0}, bad}), out);
  } catch (const c10::Error& e) {
    const bool named = std::string(e.what()).find("index[1] = ") != std::string::npos;
    return named && at::equal(out, at::zeros({2, 4}));  // nothing written
  }
  return false;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto idx = [](std::vector<int64_t> v) { return at::tensor(v, at::kLong); };
  check_case("branch fork", 3, idx({0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2}), at::kFloat,
             at::kBFloat16);
  check_case("permutation", 4, idx({2, 0, 3, 1}), at::kFloat, at::kFloat);
  check_case("repeats, M < P", 5, idx({4, 4, 1}), at::kDouble, at::kHalf);
  check_case("M > P", 2, idx({1, 0, 1, 1, 0, 1, 0}), at::kBFloat16, at::kFloat);
  check_case("M = 0", 3, at::empty({0}, at::kLong), at::kFloat, at::kHalf);
  expect(raises_out_of_range(3) && raises_out_of_range(-1),
         "an index outside [0, P) raises, naming it, before any write");
  const auto op = c10::Dispatcher::singleton().findOp({"b2fast::fork_index_out", ""});
  expect(op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU) &&
             op->hasKernelForDispatchKey(c10::DispatchKey::Meta),
         "op registered with CPU and Meta kernels");
  const int failures = b2fast_test::failures;
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
