// CPU kernel of the branch fork (docs/algorithm.md, "Branch sampling"; spec:
// b2fast.reference.branch_fork):
// out[g·K + k] = latents[g] cast to out.dtype (the same conversion as Tensor.to), and
// group_ids[g·K + k] = g, written in place into preallocated outputs.
#include "branch_fork.h"

#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/TypeCast.h>
#include <torch/library.h>

#include "cpu_blocks.h"
#include "ddim_common.h"

namespace b2fast {
namespace {

constexpr const char* kOp = "branch_fork_out";

}  // namespace

void check_branch_fork_args(const at::Tensor& latents, int64_t branches, const at::Tensor& out,
                            const at::Tensor& group_ids) {
  constexpr const char* floats = "allowed: float32, float64, float16, bfloat16";
  TORCH_CHECK(latents.dim() >= 1, kOp, ": latents must be (P, ...) with a trunk dim, got a ",
              latents.dim(), "-d tensor");
  TORCH_CHECK(is_supported_float(latents.scalar_type()), kOp, ": latents dtype ",
              latents.scalar_type(), " is not supported; ", floats);
  TORCH_CHECK(branches >= 1, kOp, ": branches must be >= 1, got ", branches);
  const c10::SymInt rows = latents.sym_size(0) * branches;
  std::vector<c10::SymInt> want(latents.sym_sizes().begin(), latents.sym_sizes().end());
  want[0] = rows;
  TORCH_CHECK(out.sym_sizes() == c10::SymIntArrayRef(want), kOp,
              ": out must be (P·branches, ...) = ", c10::SymIntArrayRef(want), ", got ",
              out.sym_sizes());
  TORCH_CHECK(is_supported_float(out.scalar_type()), kOp, ": out dtype ", out.scalar_type(),
              " is not supported; ", floats);
  TORCH_CHECK(group_ids.dim() == 1 && group_ids.sym_size(0) == rows, kOp,
              ": group_ids must be (P·branches,) = (", rows, ",), got ", group_ids.sym_sizes());
  TORCH_CHECK(group_ids.scalar_type() == at::kLong, kOp, ": group_ids dtype ",
              group_ids.scalar_type(), " is not supported; allowed: int64");
  for (const auto& [t, name] : {std::pair{&out, "out"}, std::pair{&group_ids, "group_ids"}}) {
    TORCH_CHECK(t->device() == latents.device(), kOp, ": ", name, " is on ", t->device(),
                " but latents is on ", latents.device(), "; all tensors must share one device");
  }
}

void check_branch_fork_outputs(const at::Tensor& out, const at::Tensor& group_ids,
                               c10::DeviceType device_type) {
  TORCH_CHECK(out.device().type() == device_type, kOp, ": expected tensors on ", device_type,
              ", got ", out.device());
  TORCH_CHECK(out.is_contiguous() && group_ids.is_contiguous(), kOp,
              ": out and group_ids must be contiguous (they are written in place)");
}

void branch_fork_out_cpu(const at::Tensor& latents, int64_t branches, const at::Tensor& out,
                         const at::Tensor& group_ids) {
  check_branch_fork_args(latents, branches, out, group_ids);
  check_branch_fork_outputs(out, group_ids, c10::DeviceType::CPU);
  const at::Tensor src = latents.contiguous();
  const int64_t rows = src.size(0) * branches;
  const int64_t row_size = elements_per_sample(src);

  int64_t* groups = group_ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) groups[r] = r / branches;

  const int64_t grain = std::max<int64_t>(1, kCpuBlock / std::max<int64_t>(row_size, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fork_in", [&] {
    using in_t = scalar_t;
    const in_t* in = src.const_data_ptr<in_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fork_out", [&] {
      scalar_t* dst = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const in_t* from = in + (r / branches) * row_size;
          scalar_t* to = dst + r * row_size;
          for (int64_t j = 0; j < row_size; ++j) to[j] = c10::convert<scalar_t>(from[j]);
        }
      });
    });
  });
}

void branch_fork_out_meta(const at::Tensor& latents, int64_t branches, const at::Tensor& out,
                          const at::Tensor& group_ids) {
  check_branch_fork_args(latents, branches, out, group_ids);
}

}  // namespace b2fast

TORCH_LIBRARY_FRAGMENT(b2fast, m) {
  m.def(b2fast::kBranchForkSchema, {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(b2fast, CPU, m) {
  m.impl("branch_fork_out", &b2fast::branch_fork_out_cpu);
}

TORCH_LIBRARY_IMPL(b2fast, Meta, m) {
  m.impl("branch_fork_out", &b2fast::branch_fork_out_meta);
}
