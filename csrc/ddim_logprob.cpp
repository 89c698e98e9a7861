// CPU kernels of the training log-prob and its backward (docs/algorithm.md, "DDIM step and
// log-prob"; spec: b2fast.reference.ddim.ddim_logprob).  Per element, in the compute dtype
// acc_t (ddim_math.h):
//   ε̂ = ε_u + w·(ε_c − ε_u),  μ = √ᾱ_t'·clamp(x̂0) + √(1−ᾱ_t'−σ²)·ε̂,  d = x' − μ
//   forward:  log p += −d²/(2σ²) − log σ − ½log 2π, reduced per sample (mean or sum, in double
//             over fixed blocks, cpu_blocks.h); 0 for samples with σ = 0
//   backward: dε̂ = g_b·d/σ²·dμ/dε̂ with g_b = grad_log_prob[b] (/ D for mean), then
//             grad_eps_cond = w·dε̂, grad_eps_uncond = (1 − w)·dε̂ (grad_eps_cond = dε̂ without
//             CFG); 0 for σ = 0.  μ is recomputed, nothing is saved from the forward.
#include "ddim_logprob.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cpu_blocks.h"

namespace b2fast {
namespace {

constexpr const char* kForward = "ddim_logprob";
constexpr const char* kBackward = "ddim_logprob_backward";

// Inputs of both kernels, all of dtype in_t (contiguous) but the table, step_index and grad.
template <typename acc_t>
struct LogprobArgs {
  const void* eps_uncond;  // nullptr: no CFG
  const void* eps_cond;
  const void* x_t;
  const void* x_prev;
  const acc_t* table;         // (S, 6) in acc_t
  const int64_t* step_index;  // (B,)
  int64_t per_sample;
  acc_t guidance_scale;
  Clip<acc_t> clip;

  StepCoefs<acc_t> coefs(int64_t b) const {
    return StepCoefs<acc_t>::load(table + step_index[b] * kTableColumns);
  }
  template <typename in_t>
  acc_t eps(int64_t i) const {
    const acc_t cond = static_cast<acc_t>(static_cast<const in_t*>(eps_cond)[i]);
    if (!eps_uncond) return cond;
    return cfg_combine(static_cast<acc_t>(static_cast<const in_t*>(eps_uncond)[i]), cond,
                       guidance_scale);
  }
  template <typename in_t>
  acc_t read(const void* t, int64_t i) const {
    return static_cast<acc_t>(static_cast<const in_t*>(t)[i]);
  }
};

// Sum of the log-density over elements [lo, hi) of sample b.
template <typename in_t, typename acc_t>
double logprob_block(const LogprobArgs<acc_t>& a, int64_t b, int64_t lo, int64_t hi) {
  const StepCoefs<acc_t> c = a.coefs(b);
  if (!c.stochastic()) return 0.0;
  double sum = 0.0;
  for (int64_t i = b * a.per_sample + lo; i < b * a.per_sample + hi; ++i) {
    const acc_t mu = ddim_mean(a.template eps<in_t>(i), a.template read<in_t>(a.x_t, i), c, a.clip);
    sum += static_cast<double>(gaussian_logdensity(a.template read<in_t>(a.x_prev, i) - mu, c));
  }
  return sum;
}

// Gradients of elements [lo, hi) of sample b; grad_uncond is nullptr without CFG.
template <typename in_t, typename acc_t>
void backward_block(const LogprobArgs<acc_t>& a, const acc_t* grad_log_prob, bool reduce_mean,
                    in_t* grad_uncond, in_t* grad_cond, int64_t b, int64_t lo, int64_t hi) {
  const StepCoefs<acc_t> c = a.coefs(b);
  const acc_t g = reduce_mean ? grad_log_prob[b] / static_cast<acc_t>(a.per_sample)
                              : grad_log_prob[b];
  const acc_t scale = c.stochastic() ? g / (c.sigma * c.sigma) : acc_t(0);
  const acc_t one_minus_w = acc_t(1) - a.guidance_scale;
  for (int64_t i = b * a.per_sample + lo; i < b * a.per_sample + hi; ++i) {
    const acc_t d_eps = c.stochastic()
                            ? logprob_grad_eps(a.template eps<in_t>(i),
                                               a.template read<in_t>(a.x_t, i),
                                               a.template read<in_t>(a.x_prev, i), c, a.clip, scale)
                            : acc_t(0);
    if (grad_uncond) {
      grad_cond[i] = static_cast<in_t>(a.guidance_scale * d_eps);
      grad_uncond[i] = static_cast<in_t>(one_minus_w * d_eps);
    } else {
      grad_cond[i] = static_cast<in_t>(d_eps);
    }
  }
}

// Inputs converted for the kernels: read as they are when eps_uncond, eps_cond, x_t and x_prev
// share one dtype (fp16/bf16 widened per element), else converted to the compute dtype first,
// exactly as the reference's .to(compute).
struct Prepared {
  at::Tensor eu, ec, xt, xp, table, step_index;
  at::ScalarType in_dtype;
};

Prepared prepare(const char* op, const std::optional<at::Tensor>& eps_uncond,
                 const at::Tensor& eps_cond, const at::Tensor& x_t, const at::Tensor& x_prev,
                 const at::Tensor& table, const at::Tensor& step_index) {
  TORCH_CHECK(eps_cond.device().is_cpu(), op, "_cpu: tensors must be on CPU, got ",
              eps_cond.device());
  const at::ScalarType compute = ddim_compute_dtype(eps_cond);
  const at::ScalarType e = eps_cond.scalar_type();
  const bool same = x_t.scalar_type() == e && x_prev.scalar_type() == e &&
                    (!eps_uncond || eps_uncond->scalar_type() == e);
  Prepared p;
  p.in_dtype = same ? e : compute;
  auto prep = [&](const at::Tensor& t) { return t.to(p.in_dtype).contiguous(); };
  p.ec = prep(eps_cond);
  p.xt = prep(x_t);
  p.xp = prep(x_prev);
  p.eu = eps_uncond ? prep(*eps_uncond) : at::Tensor();
  p.table = table.to(compute).contiguous();
  p.step_index = step_index.contiguous();
  check_step_index_values(op, p.step_index, p.table.size(0));
  return p;
}

template <typename acc_t>
LogprobArgs<acc_t> make_args(const Prepared& p, double guidance_scale,
                             std::optional<double> clip_sample_range) {
  return {p.eu.defined() ? p.eu.data_ptr() : nullptr,
          p.ec.data_ptr(),
          p.xt.data_ptr(),
          p.xp.data_ptr(),
          p.table.data_ptr<acc_t>(),
          p.step_index.data_ptr<int64_t>(),
          elements_per_sample(p.ec),
          static_cast<acc_t>(guidance_scale),
          {clip_sample_range.has_value(), static_cast<acc_t>(clip_sample_range.value_or(0.0))}};
}

}  // namespace

void check_ddim_logprob_args(const char* op, const at::Tensor* grad_log_prob,
                             const std::optional<at::Tensor>& eps_uncond,
                             const at::Tensor& eps_cond, const at::Tensor& x_t,
                             const at::Tensor& x_prev, const at::Tensor& table,
                             const at::Tensor& step_index,
                             std::optional<double> clip_sample_range) {
  check_ddim_args(op, eps_uncond, eps_cond, x_t, table, step_index, clip_sample_range);
  check_like_eps(op, x_prev, eps_cond, "x_prev");
  if (grad_log_prob) check_per_sample(op, *grad_log_prob, eps_cond, "grad_log_prob", std::nullopt);
}

at::Tensor no_uncond_grad(const at::Tensor& eps_cond) { return at::empty({0}, eps_cond.options()); }

at::Tensor ddim_logprob_cpu(const std::optional<at::Tensor>& eps_uncond,
                            const at::Tensor& eps_cond, double guidance_scale,
                            const at::Tensor& x_t, const at::Tensor& x_prev,
                            const at::Tensor& table, const at::Tensor& step_index,
                            std::optional<double> clip_sample_range, bool reduce_mean) {
  check_ddim_logprob_args(kForward, nullptr, eps_uncond, eps_cond, x_t, x_prev, table, step_index,
                          clip_sample_range);
  const Prepared p = prepare(kForward, eps_uncond, eps_cond, x_t, x_prev, table, step_index);
  const int64_t batch = p.ec.size(0);
  at::Tensor log_prob = at::empty({batch}, p.ec.options().dtype(ddim_compute_dtype(eps_cond)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.in_dtype, kForward, [&] {
    using acc_t = at::opmath_type<scalar_t>;  // = the compute dtype
    const LogprobArgs<acc_t> args = make_args<acc_t>(p, guidance_scale, clip_sample_range);
    reduce_per_sample(batch, args.per_sample, reduce_mean, log_prob.data_ptr<acc_t>(),
                      [&](int64_t b, int64_t lo, int64_t hi) {
                        return logprob_block<scalar_t, acc_t>(args, b, lo, hi);
                      });
  });
  return log_prob;
}

std::tuple<at::Tensor, at::Tensor> ddim_logprob_backward_cpu(
    const at::Tensor& grad_log_prob, const std::optional<at::Tensor>& eps_uncond,
    const at::Tensor& eps_cond, double guidance_scale, const at::Tensor& x_t,
    const at::Tensor& x_prev, const at::Tensor& table, const at::Tensor& step_index,
    std::optional<double> clip_sample_range, bool reduce_mean) {
  check_ddim_logprob_args(kBackward, &grad_log_prob, eps_uncond, eps_cond, x_t, x_prev, table,
                          step_index, clip_sample_range);
  const Prepared p = prepare(kBackward, eps_uncond, eps_cond, x_t, x_prev, table, step_index);
  const at::Tensor grad = grad_log_prob.to(ddim_compute_dtype(eps_cond)).contiguous();
  // Written in the kernel's input dtype, then stored in each input's own dtype (a no-op cast
  // unless the inputs had mixed dtypes).
  at::Tensor grad_cond = at::empty(p.ec.sizes(), p.ec.options());
  at::Tensor grad_uncond = p.eu.defined() ? at::empty(p.eu.sizes(), p.eu.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.in_dtype, kBackward, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LogprobArgs<acc_t> args = make_args<acc_t>(p, guidance_scale, clip_sample_range);
    scalar_t* gu = grad_uncond.defined() ? grad_uncond.data_ptr<scalar_t>() : nullptr;
    scalar_t* gc = grad_cond.data_ptr<scalar_t>();
    parallel_sample_blocks(p.ec.size(0), args.per_sample,
                           [&](int64_t /*job*/, int64_t b, int64_t lo, int64_t hi) {
                             backward_block<scalar_t, acc_t>(args, grad.data_ptr<acc_t>(),
                                                             reduce_mean, gu, gc, b, lo, hi);
                           });
  });
  return {eps_uncond ? grad_uncond.to(eps_uncond->scalar_type()) : no_uncond_grad(eps_cond),
          grad_cond.to(eps_cond.scalar_type())};
}

at::Tensor ddim_logprob_meta(const std::optional<at::Tensor>& eps_uncond,
                             const at::Tensor& eps_cond, double /*guidance_scale*/,
                             const at::Tensor& x_t, const at::Tensor& x_prev,
                             const at::Tensor& table, const at::Tensor& step_index,
                             std::optional<double> clip_sample_range, bool /*reduce_mean*/) {
  check_ddim_logprob_args(kForward, nullptr, eps_uncond, eps_cond, x_t, x_prev, table, step_index,
                          clip_sample_range);
  return at::empty_symint({eps_cond.sym_size(0)},
                          eps_cond.options().dtype(ddim_compute_dtype(eps_cond)));
}

std::tuple<at::Tensor, at::Tensor> ddim_logprob_backward_meta(
    const at::Tensor& grad_log_prob, const std::optional<at::Tensor>& eps_uncond,
    const at::Tensor& eps_cond, double /*guidance_scale*/, const at::Tensor& x_t,
    const at::Tensor& x_prev, const at::Tensor& table, const at::Tensor& step_index,
    std::optional<double> clip_sample_range, bool /*reduce_mean*/) {
  check_ddim_logprob_args(kBackward, &grad_log_prob, eps_uncond, eps_cond, x_t, x_prev, table,
                          step_index, clip_sample_range);
  at::Tensor grad_uncond =
      eps_uncond ? at::empty_symint(eps_uncond->sym_sizes(), eps_uncond->options())
                 : no_uncond_grad(eps_cond);
  return {grad_uncond, at::empty_symint(eps_cond.sym_sizes(), eps_cond.options())};
}

}  // namespace b2fast

TORCH_LIBRARY_FRAGMENT(b2fast, m) {
  m.def(b2fast::kDdimLogprobSchema, {at::Tag::pt2_compliant_tag});
  m.def(b2fast::kDdimLogprobBackwardSchema, {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(b2fast, CPU, m) {
  m.impl("ddim_logprob", &b2fast::ddim_logprob_cpu);
  m.impl("ddim_logprob_backward", &b2fast::ddim_logprob_backward_cpu);
}

TORCH_LIBRARY_IMPL(b2fast, Meta, m) {
  m.impl("ddim_logprob", &b2fast::ddim_logprob_meta);
  m.impl("ddim_logprob_backward", &b2fast::ddim_logprob_backward_meta);
}
