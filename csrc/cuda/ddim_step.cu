// CUDA kernel of the fused DDIM sampling step with log-prob (spec:
// b2fast.reference.ddim.ddim_step_with_logprob; CPU twin: csrc/ddim_step.cpp).
// One block per (sample, chunk) (common.cuh): each thread reads its group of ε_u, ε_c, x_t, z,
// computes μ and x' = μ + σ·z (ddim_math.h), stores x' in out_dtype and sums the log-density of
// the *stored* x'; the per-sample sums are reduced in a fixed order (no atomics).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ddim_step.h"
#include "common.cuh"

namespace b2fast {
namespace {

using namespace b2fast::cuda;

template <typename acc_t>
struct StepParams {
  InPtr eps_uncond;  // data == nullptr: no CFG
  InPtr eps_cond;
  InPtr x_t;
  InPtr noise;
  OutPtr x_prev;
  const acc_t* table;  // (S, 6) in acc_t
  int64_t num_steps;
  const int64_t* step_index;  // (B,)
  acc_t guidance_scale;
  Clip<acc_t> clip;
};

template <typename acc_t, bool kVector>
__global__ void __launch_bounds__(kThreads)
    ddim_step_kernel(const StepParams<acc_t> p, const LogprobOut<acc_t> out) {
  const Group g = thread_group(out.per_sample, out.chunks);
  const StepCoefs<acc_t> c = step_coefs(p.table, p.num_steps, p.step_index, g.sample);
  acc_t sum = 0;
  if (g.n > 0) {
    acc_t eps[kGroup], x[kGroup], z[kGroup], mu[kGroup];
    load_eps<kVector>(p.eps_uncond, p.eps_cond, p.guidance_scale, g, eps);
    load_group<kVector>(p.x_t, g.first, g.n, x);
    load_group<kVector>(p.noise, g.first, g.n, z);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      mu[k] = ddim_mean(eps[k], x[k], c, p.clip);
      x[k] = mu[k] + mul_rn(c.sigma, z[k]);
    }
    store_group<kVector>(p.x_prev, g.first, g.n, x);  // x now holds the stored x'
    if (c.stochastic()) {
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        if (k < g.n) sum += gaussian_logdensity(x[k] - mu[k], c);
      }
    }
  }
  out.add_block(sum);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ddim_step_with_logprob_cuda(
    const std::optional<at::Tensor>& eps_uncond, const at::Tensor& eps_cond,
    double guidance_scale, const at::Tensor& x_t, const at::Tensor& noise,
    const at::Tensor& table, const at::Tensor& step_index, at::ScalarType out_dtype,
    std::optional<double> clip_sample_range, bool reduce_mean) {
  check_ddim_step_args(eps_uncond, eps_cond, x_t, noise, table, step_index, out_dtype,
                       clip_sample_range);
  TORCH_CHECK(eps_cond.is_cuda(), "ddim_step_with_logprob_cuda: tensors must be on CUDA, got ",
              eps_cond.device());
  const c10::cuda::CUDAGuard guard(eps_cond.device());
  const at::ScalarType compute = ddim_compute_dtype(eps_cond);
  const at::Tensor ec = eps_cond.contiguous(), xt = x_t.contiguous(), z = noise.contiguous();
  const at::Tensor eu = eps_uncond ? eps_uncond->contiguous() : at::Tensor();
  const at::Tensor tab = table.to(compute).contiguous();
  const at::Tensor idx = step_index.contiguous();
  const int64_t per_sample = elements_per_sample(ec);
  at::Tensor x_prev = at::empty(ec.sizes(), ec.options().dtype(out_dtype));
  at::Tensor log_prob = at::empty({ec.size(0)}, ec.options().dtype(compute));
  const bool vector = can_vectorize(per_sample, {&eu, &ec, &xt, &z, &x_prev});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(compute, "ddim_step_with_logprob_cuda", [&] {
    using acc_t = scalar_t;
    const StepParams<acc_t> p{in_ptr(eu),
                              in_ptr(ec),
                              in_ptr(xt),
                              in_ptr(z),
                              out_ptr(x_prev),
                              tab.const_data_ptr<acc_t>(),
                              tab.size(0),
                              idx.const_data_ptr<int64_t>(),
                              static_cast<acc_t>(guidance_scale),
                              {clip_sample_range.has_value(),
                               static_cast<acc_t>(clip_sample_range.value_or(0.0))}};
    launch_logprob<acc_t>(log_prob, per_sample, reduce_mean, stream,
                          [&](const LogprobOut<acc_t>& out, unsigned int blocks) {
                            const auto kernel = vector ? ddim_step_kernel<acc_t, true>
                                                       : ddim_step_kernel<acc_t, false>;
                            kernel<<<blocks, kThreads, 0, stream>>>(p, out);
                          });
  });
  return {x_prev, log_prob};
}

}  // namespace b2fast

TORCH_LIBRARY_IMPL(b2fast, CUDA, m) {
  m.impl("ddim_step_with_logprob", &b2fast::ddim_step_with_logprob_cuda);
}
