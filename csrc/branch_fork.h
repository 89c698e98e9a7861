// Shared declarations of the branch fork (spec: b2fast.reference.branch_fork), used by the CPU
// kernel (branch_fork.cpp), the CUDA kernel (csrc/cuda/branch_fork.cu) and the C++ test.
#pragma once

#include <ATen/core/Tensor.h>

namespace b2fast {

// torch.ops.b2fast.branch_fork_out: out[g·K + k] = latents[g] cast to out.dtype and
// group_ids[g·K + k] = g for K = branches, written in place (no allocation, no host sync).
// latents (P, ...) any float dtype; out (P·K, ...) any float dtype; group_ids (P·K,) int64.
constexpr const char* kBranchForkSchema =
    "branch_fork_out(Tensor latents, int branches, Tensor(a!) out, Tensor(b!) group_ids) -> ()";

// Host-side validation shared by every backend (shapes, dtypes, devices; never values).
// The kernels also require out and group_ids to be contiguous (checked there, not on meta).
void check_branch_fork_args(const at::Tensor& latents, int64_t branches, const at::Tensor& out,
                            const at::Tensor& group_ids);

// Kernel-side checks on top: out and group_ids contiguous, and on `device_type`.
void check_branch_fork_outputs(const at::Tensor& out, const at::Tensor& group_ids,
                               c10::DeviceType device_type);

void branch_fork_out_cpu(const at::Tensor& latents, int64_t branches, const at::Tensor& out,
                         const at::Tensor& group_ids);

// CUDA kernel (csrc/cuda/branch_fork.cu, built with B2FAST_WITH_CUDA).
void branch_fork_out_cuda(const at::Tensor& latents, int64_t branches, const at::Tensor& out,
                          const at::Tensor& group_ids);

// Meta kernel: the checks only.
void branch_fork_out_meta(const at::Tensor& latents, int64_t branches, const at::Tensor& out,
                          const at::Tensor& group_ids);

}  // namespace b2fast
