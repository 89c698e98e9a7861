// Shared declarations of the training log-prob op and its backward (spec:
// b2fast.reference.ddim.ddim_logprob), used by the CPU kernels (ddim_logprob.cpp), the CUDA
// kernels (csrc/cuda/ddim_logprob.cu) and the C++ test.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "ddim_common.h"

namespace b2fast {

// torch.ops.b2fast.ddim_logprob: log p(x_prev | x_t) (B,) in the compute dtype (fp64 when
// eps_cond is fp64, else fp32), reduced over each sample's elements (mean or sum); 0 for σ = 0.
// x_prev may be any float dtype (read and widened).
constexpr const char* kDdimLogprobSchema =
    "ddim_logprob(Tensor? eps_uncond, Tensor eps_cond, float guidance_scale, Tensor x_t, "
    "Tensor x_prev, Tensor table, Tensor step_index, float? clip_sample_range, "
    "bool reduce_mean) -> Tensor";

// torch.ops.b2fast.ddim_logprob_backward: (grad_eps_uncond, grad_eps_cond), each in the dtype
// and shape of its input; grad_eps_uncond is an empty (0,) tensor of eps_cond's dtype when
// eps_uncond is None.  Recomputes μ (saves nothing from the forward); 0 for σ = 0 samples.
constexpr const char* kDdimLogprobBackwardSchema =
    "ddim_logprob_backward(Tensor grad_log_prob, Tensor? eps_uncond, Tensor eps_cond, "
    "float guidance_scale, Tensor x_t, Tensor x_prev, Tensor table, Tensor step_index, "
    "float? clip_sample_range, bool reduce_mean) -> (Tensor, Tensor)";

// Host-side validation shared by every backend: the DDIM checks plus x_prev like eps_cond and,
// for the backward (grad_log_prob given), grad_log_prob (B,) in a float dtype.
void check_ddim_logprob_args(const char* op, const at::Tensor* grad_log_prob,
                             const std::optional<at::Tensor>& eps_uncond,
                             const at::Tensor& eps_cond, const at::Tensor& x_t,
                             const at::Tensor& x_prev, const at::Tensor& table,
                             const at::Tensor& step_index,
                             std::optional<double> clip_sample_range);

// Empty (0,) stand-in for grad_eps_uncond when eps_uncond is None (eps_cond's dtype, device).
at::Tensor no_uncond_grad(const at::Tensor& eps_cond);

at::Tensor ddim_logprob_cpu(const std::optional<at::Tensor>& eps_uncond,
                            const at::Tensor& eps_cond, double guidance_scale,
                            const at::Tensor& x_t, const at::Tensor& x_prev,
                            const at::Tensor& table, const at::Tensor& step_index,
                            std::optional<double> clip_sample_range, bool reduce_mean);

std::tuple<at::Tensor, at::Tensor> ddim_logprob_backward_cpu(
    const at::Tensor& grad_log_prob, const std::optional<at::Tensor>& eps_uncond,
    const at::Tensor& eps_cond, double guidance_scale, const at::Tensor& x_t,
    const at::Tensor& x_prev, const at::Tensor& table, const at::Tensor& step_index,
    std::optional<double> clip_sample_range, bool reduce_mean);

// Meta kernels: output shapes and dtypes only (torch.compile, opcheck, FakeTensor).
at::Tensor ddim_logprob_meta(const std::optional<at::Tensor>& eps_uncond,
                             const at::Tensor& eps_cond, double guidance_scale,
                             const at::Tensor& x_t, const at::Tensor& x_prev,
                             const at::Tensor& table, const at::Tensor& step_index,
                             std::optional<double> clip_sample_range, bool reduce_mean);

std::tuple<at::Tensor, at::Tensor> ddim_logprob_backward_meta(
    const at::Tensor& grad_log_prob, const std::optional<at::Tensor>& eps_uncond,
    const at::Tensor& eps_cond, double guidance_scale, const at::Tensor& x_t,
    const at::Tensor& x_prev, const at::Tensor& table, const at::Tensor& step_index,
    std::optional<double> clip_sample_range, bool reduce_mean);

// CUDA kernels (csrc/cuda/ddim_logprob.cu, built with B2FAST_WITH_CUDA).
at::Tensor ddim_logprob_cuda(const std::optional<at::Tensor>& eps_uncond,
                             const at::Tensor& eps_cond, double guidance_scale,
                             const at::Tensor& x_t, const at::Tensor& x_prev,
                             const at::Tensor& table, const at::Tensor& step_index,
                             std::optional<double> clip_sample_range, bool reduce_mean);

std::tuple<at::Tensor, at::Tensor> ddim_logprob_backward_cuda(
    const at::Tensor& grad_log_prob, const std::optional<at::Tensor>& eps_uncond,
    const at::Tensor& eps_cond, double guidance_scale, const at::Tensor& x_t,
    const at::Tensor& x_prev, const at::Tensor& table, const at::Tensor& step_index,
    std::optional<double> clip_sample_range, bool reduce_mean);

}  // namespace b2fast
