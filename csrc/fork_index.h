// Shared declarations of the fork by index (spec: b2fast.reference.fork_index), used by the CPU
// kernel (fork_index.cpp), the CUDA kernel (csrc/cuda/fork_index.cu) and the C++ test.
#pragma once

#include <ATen/core/Tensor.h>

namespace b2fast {

// torch.ops.b2fast.fork_index_out: out[i] = latents[index[i]] cast to out.dtype, written in
// place (no allocation, no host sync on CUDA). latents (P, ...) any float dtype; index (M,) int64
// with values in [0, P), any order, repeats allowed; out (M, ...) any float dtype, not
// overlapping latents. branch_fork_out is the case index = arange(P).repeat_interleave(K).
// An index outside [0, P) raises on the CPU (values checked before any write) and fires a
// device-side assert on CUDA (the values are never read on the host).
constexpr const char* kForkIndexSchema =
    "fork_index_out(Tensor latents, Tensor index, Tensor(a!) out) -> ()";

// Host-side validation shared by every backend (shapes, dtypes, devices; never values).
// The kernels also require out to be contiguous (checked there, not on meta).
void check_fork_index_args(const at::Tensor& latents, const at::Tensor& index,
                           const at::Tensor& out);

// Kernel-side checks on top: out contiguous, on `device_type`, and not overlapping latents.
void check_fork_index_output(const at::Tensor& latents, const at::Tensor& out,
                             c10::DeviceType device_type);

void fork_index_out_cpu(const at::Tensor& latents, const at::Tensor& index, const at::Tensor& out);

// CUDA kernel (csrc/cuda/fork_index.cu, built with B2FAST_WITH_CUDA).
void fork_index_out_cuda(const at::Tensor& latents, const at::Tensor& index,
                         const at::Tensor& out);

// Meta kernel: the checks only.
void fork_index_out_meta(const at::Tensor& latents, const at::Tensor& index,
                         const at::Tensor& out);

}  // namespace b2fast
