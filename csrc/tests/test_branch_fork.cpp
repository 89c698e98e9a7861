// C++ test of the CPU branch_fork_out kernel, run by ctest (CMakeLists.txt): out and group_ids
// against latents.to(dtype).repeat_interleave(K) for several dtype pairs, and registration.
// Exit status: 0 on success, 1 on any mismatch.
#include <cstdio>
#include <string>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "../branch_fork.h"
#include "test_common.h"

namespace {

using b2fast_test::expect;

void check_case(int64_t trunks, int64_t branches, at::ScalarType in, at::ScalarType out_dtype) {
  // non-contiguous latents: the kernel reads a contiguous copy
  const at::Tensor latents = at::randn({trunks, 3, 5, 4}).to(in).transpose(2, 3);
  at::Tensor out = at::full({trunks * branches, 3, 4, 5}, NAN, at::TensorOptions(out_dtype));
  at::Tensor group_ids = at::full({trunks * branches}, -1, at::kLong);
  b2fast::branch_fork_out_cpu(latents, branches, out, group_ids);
  const at::Tensor want = latents.to(out_dtype).repeat_interleave(branches, 0);
  const at::Tensor want_ids = at::arange(trunks, at::kLong).repeat_interleave(branches);
  const std::string name = c10::str(in, " -> ", out_dtype, ", P=", trunks, " K=", branches);
  expect(at::equal(out, want), name + ": out is latents cast and repeated");
  expect(at::equal(group_ids, want_ids), name + ": group ids");
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_case(3, 4, at::kFloat, at::kBFloat16);
  check_case(2, 1, at::kFloat, at::kFloat);
  check_case(1, 3, at::kDouble, at::kHalf);
  check_case(2, 2, at::kBFloat16, at::kFloat);
  const auto op = c10::Dispatcher::singleton().findOp({"b2fast::branch_fork_out", ""});
  expect(op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU) &&
             op->hasKernelForDispatchKey(c10::DispatchKey::Meta),
         "op registered with CPU and Meta kernels");
  const int failures = b2fast_test::failures;
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
