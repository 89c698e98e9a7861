// Shared declarations of the fused DDIM sampling step (spec: b2fast/reference/ddim.py).
//
// Used by the CPU kernel (ddim_step.cpp), the C++ test and, later, the CUDA kernel
// (csrc/cuda/ddim_step.cu), so all backends validate arguments and read the schedule table
// the same way.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace b2fast {

// Column layout of the (S, 6) per-step schedule table; must match b2fast/reference/ddim.py.
enum TableColumn : int64_t {
  kSqrtAb = 0,      // √ᾱ_t
  kSqrt1mAb = 1,    // √(1−ᾱ_t)
  kSqrtAbPrev = 2,  // √ᾱ_t'
  kDirCoef = 3,     // √(1−ᾱ_t'−σ_t²)
  kSigma = 4,       // σ_t
  kLogSigma = 5,    // log σ_t
  kTableColumns = 6,
};

// ½·log 2π, the Gaussian normaliser per element.
constexpr double kHalfLog2Pi = 0.91893853320467274178;

// Schema of the registered op torch.ops.b2fast.ddim_step_with_logprob.
//   clip_sample_range: None = no clip of x̂0 (SD); a value r > 0 clamps x̂0 to [−r, r].
//   reduce_mean: true = mean of the per-element log-density over C·H·W (DDPO), false = sum.
//   Returns (x_prev in out_dtype, log_prob (B,) in the compute dtype: fp64 when eps_cond is
//   fp64, else fp32).
constexpr const char* kDdimStepSchema =
    "ddim_step_with_logprob(Tensor? eps_uncond, Tensor eps_cond, float guidance_scale, "
    "Tensor x_t, Tensor noise, Tensor table, Tensor step_index, ScalarType out_dtype, "
    "float? clip_sample_range, bool reduce_mean) -> (Tensor, Tensor)";

// Compute dtype of the step, as in the reference: fp64 when eps_cond is fp64, else fp32.
at::ScalarType ddim_compute_dtype(const at::Tensor& eps_cond);

// Host-side validation shared by every backend (shapes, dtypes, devices, clip range).
// Does not read tensor values, so it is safe on meta/fake tensors and never syncs a device.
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

// Meta kernel: output shapes and dtypes only (torch.compile, opcheck, FakeTensor).
std::tuple<at::Tensor, at::Tensor> ddim_step_with_logprob_meta(
    const std::optional<at::Tensor>& eps_uncond, const at::Tensor& eps_cond,
    double guidance_scale, const at::Tensor& x_t, const at::Tensor& noise,
    const at::Tensor& table, const at::Tensor& step_index, at::ScalarType out_dtype,
    std::optional<double> clip_sample_range, bool reduce_mean);

}  // namespace b2fast
