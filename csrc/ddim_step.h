// Shared declarations of the fused DDIM sampling step (spec: b2fast/reference/ddim.py).
//
// Used by the CPU kernel (ddim_step.cpp), the CUDA kernel (csrc/cuda/ddim_step.cu) and the
// C++ test, so all backends validate arguments and read the schedule table the same way.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "ddim_common.h"

namespace b2fast {

// Schema of the registered op torch.ops.b2fast.ddim_step_with_logprob.
//   clip_sample_range: None = no clip of x̂0 (SD); a value r > 0 clamps x̂0 to [−r, r].
//   reduce_mean: true = mean of the per-element log-density over C·H·W (DDPO), false = sum.
//   Returns (x_prev in out_dtype, log_prob (B,) in the compute dtype: fp64 when eps_cond is
//   fp64, else fp32).
constexpr const char* kDdimStepSchema =
    "ddim_step_with_logprob(Tensor? eps_uncond, Tensor eps_cond, float guidance_scale, "
    "Tensor x_t, Tensor noise, Tensor table, Tensor step_index, ScalarType out_dtype, "
    "float? clip_sample_range, bool reduce_mean) -> (Tensor, Tensor)";

// Host-side validation shared by every backend (shapes, dtypes, devices, clip range).
// Does not read tensor values, so it is safe on meta/fake tensors and never syncs a device.
// noise is like eps_cond; out_dtype is a supported float dtype.
void check_ddim_step_args(const std::optional<at::Tensor>& eps_uncond,
                          const at::Tensor& eps_cond, const at::Tensor& x_t,
                          const at::Tensor& noise, const at::Tensor& table,
                          const at::Tensor& step_index, at::ScalarType out_dtype,
                          std::optional<double> clip_sample_range);

// CPU kernel: one memory pass, deterministic per-sample reduction (fixed blocks, double sums).
std::tuple<at::Tensor, at::Tensor> ddim_step_with_logprob_cpu(
    const std::optional<at::Tensor>& eps_uncond, const at::Tensor& eps_cond,
    double guidance_scale, const at::Tensor& x_t, const at::Tensor& noise,
    const at::Tensor& table, const at::Tensor& step_index, at::ScalarType out_dtype,
    std::optional<double> clip_sample_range, bool reduce_mean);

// CUDA kernel (csrc/cuda/ddim_step.cu, built with B2FAST_WITH_CUDA): same semantics, current
// stream, no host sync, deterministic per-sample reduction, step_index checked on the device.
std::tuple<at::Tensor, at::Tensor> ddim_step_with_logprob_cuda(
    const std::optional<at::Tensor>& eps_uncond, const at::Tensor& eps_cond,
    double guidance_scale, const at::Tensor& x_t, const at::Tensor& noise,
    const at::Tensor& table, const at::Tensor& step_index, at::ScalarType out_dtype,
    std::optional<double> clip_sample_range, bool reduce_mean);

// Meta kernel: output shapes and dtypes only (torch.compile, opcheck, FakeTensor).
std::tuple<at::Tensor, at::Tensor> ddim_step_with_logprob_meta(
    const std::optional<at::Tensor>& eps_uncond, const at::Tensor& eps_cond,
    double guidance_scale, const at::Tensor& x_t, const at::Tensor& noise,
    const at::Tensor& table, const at::Tensor& step_index, at::ScalarType out_dtype,
    std::optional<double> clip_sample_range, bool reduce_mean);

}  // namespace b2fast
