// CPU kernel of the fused DDIM sampling step with log-prob (docs/algorithm.md, "DDIM step and
// log-prob"; spec: b2fast.reference.ddim.ddim_step_with_logprob).  Per element, in the compute
// dtype acc_t:
//   1. ε̂  = ε_u + w·(ε_c − ε_u)                  (CFG; ε̂ = ε_c without eps_uncond)
//   2. x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t            (optionally clamped to [−r, r])
//   3. μ  = √ᾱ_t'·x̂0 + √(1−ᾱ_t'−σ²)·ε̂
//   4. x' = μ + σ·z, rounded to out_dtype and stored
//   5. log p += −(x'_stored − μ)²/(2σ²) − log σ − ½log 2π   (0 for samples with σ = 0)
// The per-element math (ddim_math.h, shared with CUDA) runs the reference's operations in its
// order and precision, so x' is bitwise the reference's and only the reduction order differs
// (fixed blocks and double sums here, cpu_blocks.h; ~1e-7 relative in fp32).
#include "ddim_step.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cpu_blocks.h"

namespace b2fast {
namespace {

constexpr const char* kOp = "ddim_step_with_logprob";

template <typename acc_t>
struct StepArgs {
  const void* eps_uncond;  // nullptr: no CFG
  const void* eps_cond;
  const void* x_t;
  const void* noise;
  const acc_t* table;         // (S, 6) in acc_t
  const int64_t* step_index;  // (B,)
  void* x_prev;
  int64_t per_sample;
  acc_t guidance_scale;
  Clip<acc_t> clip;
};

// Steps 1–5 over elements [lo, hi) of sample b; returns the block's log-density sum.
template <typename in_t, typename out_t, typename acc_t>
double step_block(const StepArgs<acc_t>& a, int64_t b, int64_t lo, int64_t hi) {
  const auto* eu = static_cast<const in_t*>(a.eps_uncond);
  const auto* ec = static_cast<const in_t*>(a.eps_cond);
  const auto* xt = static_cast<const in_t*>(a.x_t);
  const auto* z = static_cast<const in_t*>(a.noise);
  auto* out = static_cast<out_t*>(a.x_prev);
  const auto c = StepCoefs<acc_t>::load(a.table + a.step_index[b] * kTableColumns);
  double sum = 0.0;
  for (int64_t i = b * a.per_sample + lo; i < b * a.per_sample + hi; ++i) {
    const acc_t cond = static_cast<acc_t>(ec[i]);
    const acc_t eps =
        eu ? cfg_combine(static_cast<acc_t>(eu[i]), cond, a.guidance_scale) : cond;
    const acc_t mu = ddim_mean(eps, static_cast<acc_t>(xt[i]), c, a.clip);
    const out_t stored = static_cast<out_t>(mu + mul_rn(c.sigma, static_cast<acc_t>(z[i])));
    out[i] = stored;
    // log p on the *stored* x' (docs/algorithm.md, "Numerics rules"); 0 for σ = 0
    if (c.stochastic()) {
      sum += static_cast<double>(gaussian_logdensity(static_cast<acc_t>(stored) - mu, c));
    }
  }
  return sum;
}

}  // namespace

void check_ddim_step_args(const std::optional<at::Tensor>& eps_uncond,
                          const at::Tensor& eps_cond, const at::Tensor& x_t,
                          const at::Tensor& noise, const at::Tensor& table,
                          const at::Tensor& step_index, at::ScalarType out_dtype,
                          std::optional<double> clip_sample_range) {
  check_ddim_args(kOp, eps_uncond, eps_cond, x_t, table, step_index, clip_sample_range);
  check_like_eps(kOp, noise, eps_cond, "noise");
  TORCH_CHECK(is_supported_float(out_dtype), kOp, ": out_dtype ", out_dtype,
              " is not supported; allowed: float32, float64, float16, bfloat16");
}

std::tuple<at::Tensor, at::Tensor> ddim_step_with_logprob_cpu(
    const std::optional<at::Tensor>& eps_uncond, const at::Tensor& eps_cond,
    double guidance_scale, const at::Tensor& x_t, const at::Tensor& noise,
    const at::Tensor& table, const at::Tensor& step_index, at::ScalarType out_dtype,
    std::optional<double> clip_sample_range, bool reduce_mean) {
  check_ddim_step_args(eps_uncond, eps_cond, x_t, noise, table, step_index, out_dtype,
                       clip_sample_range);
  TORCH_CHECK(eps_cond.device().is_cpu(), kOp, "_cpu: tensors must be on CPU, got ",
              eps_cond.device());
  const at::ScalarType compute = ddim_compute_dtype(eps_cond);
  // Inputs that share one dtype are read as they are (fp16/bf16 widened per element); mixed
  // dtypes are first converted to the compute dtype, exactly as the reference's .to(compute).
  const bool same = x_t.scalar_type() == eps_cond.scalar_type() &&
                    noise.scalar_type() == eps_cond.scalar_type() &&
                    (!eps_uncond || eps_uncond->scalar_type() == eps_cond.scalar_type());
  const at::ScalarType in_dtype = same ? eps_cond.scalar_type() : compute;
  auto prep = [&](const at::Tensor& t) { return t.to(in_dtype).contiguous(); };
  const at::Tensor ec = prep(eps_cond), xt = prep(x_t), z = prep(noise);
  const at::Tensor eu = eps_uncond ? prep(*eps_uncond) : at::Tensor();
  const at::Tensor tab = table.to(compute).contiguous();
  const at::Tensor idx = step_index.contiguous();
  check_step_index_values(kOp, idx, tab.size(0));

  const int64_t batch = ec.size(0);
  const int64_t per_sample = elements_per_sample(ec);
  at::Tensor x_prev = at::empty(ec.sizes(), ec.options().dtype(out_dtype));
  at::Tensor log_prob = at::empty({batch}, ec.options().dtype(compute));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_dtype, "ddim_step_in", [&] {
    using in_t = scalar_t;
    using acc_t = at::opmath_type<in_t>;  // fp32 for fp16/bf16/fp32, fp64 for fp64 = compute
    const StepArgs<acc_t> args{eu.defined() ? eu.data_ptr() : nullptr,
                               ec.data_ptr(),
                               xt.data_ptr(),
                               z.data_ptr(),
                               tab.data_ptr<acc_t>(),
                               idx.data_ptr<int64_t>(),
                               x_prev.data_ptr(),
                               per_sample,
                               static_cast<acc_t>(guidance_scale),
                               {clip_sample_range.has_value(),
                                static_cast<acc_t>(clip_sample_range.value_or(0.0))}};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "ddim_step_out", [&] {
      reduce_per_sample(batch, per_sample, reduce_mean, log_prob.data_ptr<acc_t>(),
                        [&](int64_t b, int64_t lo, int64_t hi) {
                          return step_block<in_t, scalar_t, acc_t>(args, b, lo, hi);
                        });
    });
  });
  return {x_prev, log_prob};
}

std::tuple<at::Tensor, at::Tensor> ddim_step_with_logprob_meta(
    const std::optional<at::Tensor>& eps_uncond, const at::Tensor& eps_cond,
    double /*guidance_scale*/, const at::Tensor& x_t, const at::Tensor& noise,
    const at::Tensor& table, const at::Tensor& step_index, at::ScalarType out_dtype,
    std::optional<double> clip_sample_range, bool /*reduce_mean*/) {
  check_ddim_step_args(eps_uncond, eps_cond, x_t, noise, table, step_index, out_dtype,
                       clip_sample_range);
  // sym_sizes so torch.compile with dynamic shapes can trace through the op.
  at::Tensor x_prev = at::empty_symint(eps_cond.sym_sizes(), eps_cond.options().dtype(out_dtype));
  at::Tensor log_prob = at::empty_symint({eps_cond.sym_size(0)},
                                         eps_cond.options().dtype(ddim_compute_dtype(eps_cond)));
  return {x_prev, log_prob};
}

}  // namespace b2fast

// A FRAGMENT, so each csrc/<op>.cpp defines its own schema (TORCH_LIBRARY may appear only once
// per namespace).  pt2_compliant: the op has a Meta kernel and passes torch.library.opcheck.
TORCH_LIBRARY_FRAGMENT(b2fast, m) {
  m.def(b2fast::kDdimStepSchema, {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(b2fast, CPU, m) {
  m.impl("ddim_step_with_logprob", &b2fast::ddim_step_with_logprob_cpu);
}

TORCH_LIBRARY_IMPL(b2fast, Meta, m) {
  m.impl("ddim_step_with_logprob", &b2fast::ddim_step_with_logprob_meta);
}
