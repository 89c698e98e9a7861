// CUDA kernels of the training log-prob and its backward (spec:
// b2fast.reference.ddim.ddim_logprob; CPU twins and formulas: csrc/ddim_logprob.cpp).
// One block per (sample, chunk) (common.cuh); the forward reduces each sample's log-density in
// a fixed order (no atomics); the backward is elementwise and recomputes μ.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ddim_logprob.h"
#include "common.cuh"

namespace b2fast {
namespace {

using namespace b2fast::cuda;

template <typename acc_t>
struct LogprobParams {
  InPtr eps_uncond;  // data == nullptr: no CFG
  InPtr eps_cond;
  InPtr x_t;
  InPtr x_prev;
  const acc_t* table;  // (S, 6) in acc_t
  int64_t num_steps;
  const int64_t* step_index;  // (B,)
  acc_t guidance_scale;
  Clip<acc_t> clip;
};

// ε̂, x_t and x' of the thread's group.
template <bool kVector, typename acc_t>
__device__ inline void load_inputs(const LogprobParams<acc_t>& p, const Group& g,
                                   acc_t (&eps)[kGroup], acc_t (&x)[kGroup],
                                   acc_t (&x_prev)[kGroup]) {
  load_eps<kVector>(p.eps_uncond, p.eps_cond, p.guidance_scale, g, eps);
  load_group<kVector>(p.x_t, g.first, g.n, x);
  load_group<kVector>(p.x_prev, g.first, g.n, x_prev);
}

template <typename acc_t, bool kVector>
__global__ void __launch_bounds__(kThreads)
    ddim_logprob_kernel(const LogprobParams<acc_t> p, const LogprobOut<acc_t> out) {
  const Group g = thread_group(out.per_sample, out.chunks);
  const StepCoefs<acc_t> c = step_coefs(p.table, p.num_steps, p.step_index, g.sample);
  acc_t sum = 0;
  if (g.n > 0 && c.stochastic()) {  // σ = 0: log p = 0
    acc_t eps[kGroup], x[kGroup], x_prev[kGroup];
    load_inputs<kVector>(p, g, eps, x, x_prev);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      if (k < g.n) sum += gaussian_logdensity(x_prev[k] - ddim_mean(eps[k], x[k], c, p.clip), c);
    }
  }
  out.add_block(sum);
}

// dε̂ = g_b·(x' − μ)/σ²·dμ/dε̂ (0 for σ = 0); grad_eps_cond = w·dε̂ and grad_eps_uncond =
// (1 − w)·dε̂ with CFG (grad_uncond.data != nullptr), else grad_eps_cond = dε̂.
template <typename acc_t, bool kVector>
__global__ void __launch_bounds__(kThreads)
    ddim_logprob_backward_kernel(const LogprobParams<acc_t> p, int64_t per_sample,
                                 int64_t chunks, InPtr grad_log_prob, bool reduce_mean,
                                 OutPtr grad_uncond, OutPtr grad_cond) {
  const Group g = thread_group(per_sample, chunks);
  if (g.n <= 0) return;
  const StepCoefs<acc_t> c = step_coefs(p.table, p.num_steps, p.step_index, g.sample);
  acc_t d_eps[kGroup] = {};
  if (c.stochastic()) {
    const acc_t grad = load_one<acc_t>(grad_log_prob, g.sample);
    const acc_t g_b = reduce_mean ? grad / static_cast<acc_t>(per_sample) : grad;
    const acc_t scale = g_b / (c.sigma * c.sigma);
    acc_t eps[kGroup], x[kGroup], x_prev[kGroup];
    load_inputs<kVector>(p, g, eps, x, x_prev);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      d_eps[k] = logprob_grad_eps(eps[k], x[k], x_prev[k], c, p.clip, scale);
    }
  }
  if (grad_uncond.data != nullptr) {
    const acc_t one_minus_w = acc_t(1) - p.guidance_scale;
    acc_t d_uncond[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      d_uncond[k] = one_minus_w * d_eps[k];
      d_eps[k] = p.guidance_scale * d_eps[k];
    }
    store_group<kVector>(grad_uncond, g.first, g.n, d_uncond);
  }
  store_group<kVector>(grad_cond, g.first, g.n, d_eps);
}

// Inputs made contiguous (no copy when they already are) with the table in the compute dtype.
struct Inputs {
  at::Tensor eu, ec, xt, xp, table, step_index;
  int64_t per_sample;
  bool vector;
};

Inputs prepare(const char* op, const std::optional<at::Tensor>& eps_uncond,
               const at::Tensor& eps_cond, const at::Tensor& x_t, const at::Tensor& x_prev,
               const at::Tensor& table, const at::Tensor& step_index) {
  TORCH_CHECK(eps_cond.is_cuda(), op, "_cuda: tensors must be on CUDA, got ", eps_cond.device());
  Inputs in;
  in.ec = eps_cond.contiguous();
  in.eu = eps_uncond ? eps_uncond->contiguous() : at::Tensor();
  in.xt = x_t.contiguous();
  in.xp = x_prev.contiguous();
  in.table = table.to(ddim_compute_dtype(eps_cond)).contiguous();
  in.step_index = step_index.contiguous();
  in.per_sample = elements_per_sample(in.ec);
  in.vector = can_vectorize(in.per_sample, {&in.eu, &in.ec, &in.xt, &in.xp});
  return in;
}

template <typename acc_t>
LogprobParams<acc_t> make_params(const Inputs& in, double guidance_scale,
                                 std::optional<double> clip_sample_range) {
  return {in_ptr(in.eu),
          in_ptr(in.ec),
          in_ptr(in.xt),
          in_ptr(in.xp),
          in.table.const_data_ptr<acc_t>(),
          in.table.size(0),
          in.step_index.const_data_ptr<int64_t>(),
          static_cast<acc_t>(guidance_scale),
          {clip_sample_range.has_value(), static_cast<acc_t>(clip_sample_range.value_or(0.0))}};
}

}  // namespace

at::Tensor ddim_logprob_cuda(const std::optional<at::Tensor>& eps_uncond,
                             const at::Tensor& eps_cond, double guidance_scale,
                             const at::Tensor& x_t, const at::Tensor& x_prev,
                             const at::Tensor& table, const at::Tensor& step_index,
                             std::optional<double> clip_sample_range, bool reduce_mean) {
  constexpr const char* op = "ddim_logprob";
  check_ddim_logprob_args(op, nullptr, eps_uncond, eps_cond, x_t, x_prev, table, step_index,
                          clip_sample_range);
  const c10::cuda::CUDAGuard guard(eps_cond.device());
  const Inputs in = prepare(op, eps_uncond, eps_cond, x_t, x_prev, table, step_index);
  const at::ScalarType compute = ddim_compute_dtype(eps_cond);
  at::Tensor log_prob = at::empty({in.ec.size(0)}, in.ec.options().dtype(compute));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(compute, "ddim_logprob_cuda", [&] {
    using acc_t = scalar_t;
    const LogprobParams<acc_t> p = make_params<acc_t>(in, guidance_scale, clip_sample_range);
    launch_logprob<acc_t>(log_prob, in.per_sample, reduce_mean, stream,
                          [&](const LogprobOut<acc_t>& out, unsigned int blocks) {
                            const auto kernel = in.vector ? ddim_logprob_kernel<acc_t, true>
                                                          : ddim_logprob_kernel<acc_t, false>;
                            kernel<<<blocks, kThreads, 0, stream>>>(p, out);
                          });
  });
  return log_prob;
}

std::tuple<at::Tensor, at::Tensor> ddim_logprob_backward_cuda(
    const at::Tensor& grad_log_prob, const std::optional<at::Tensor>& eps_uncond,
    const at::Tensor& eps_cond, double guidance_scale, const at::Tensor& x_t,
    const at::Tensor& x_prev, const at::Tensor& table, const at::Tensor& step_index,
    std::optional<double> clip_sample_range, bool reduce_mean) {
  constexpr const char* op = "ddim_logprob_backward";
  check_ddim_logprob_args(op, &grad_log_prob, eps_uncond, eps_cond, x_t, x_prev, table,
                          step_index, clip_sample_range);
  const c10::cuda::CUDAGuard guard(eps_cond.device());
  const Inputs in = prepare(op, eps_uncond, eps_cond, x_t, x_prev, table, step_index);
  const at::Tensor grad = grad_log_prob.contiguous();
  at::Tensor grad_cond = at::empty(in.ec.sizes(), in.ec.options());
  at::Tensor grad_uncond =
      in.eu.defined() ? at::empty(in.eu.sizes(), in.eu.options()) : no_uncond_grad(eps_cond);
  const bool vector = in.vector && can_vectorize(in.per_sample, {&grad_cond, &grad_uncond});
  const int64_t batch = in.ec.size(0), chunks = num_chunks(in.per_sample);
  const unsigned int blocks = grid_blocks(batch, chunks);
  if (blocks == 0) return {grad_uncond, grad_cond};
  const OutPtr uncond = in.eu.defined() ? out_ptr(grad_uncond) : OutPtr{nullptr, at::kFloat};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(ddim_compute_dtype(eps_cond), "ddim_logprob_backward_cuda", [&] {
    using acc_t = scalar_t;
    const LogprobParams<acc_t> p = make_params<acc_t>(in, guidance_scale, clip_sample_range);
    const auto kernel = vector ? ddim_logprob_backward_kernel<acc_t, true>
                               : ddim_logprob_backward_kernel<acc_t, false>;
    kernel<<<blocks, kThreads, 0, stream>>>(p, in.per_sample, chunks, in_ptr(grad), reduce_mean,
                                            uncond, out_ptr(grad_cond));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_uncond, grad_cond};
}

}  // namespace b2fast

TORCH_LIBRARY_IMPL(b2fast, CUDA, m) {
  m.impl("ddim_logprob", &b2fast::ddim_logprob_cuda);
  m.impl("ddim_logprob_backward", &b2fast::ddim_logprob_backward_cuda);
}
