// C++ test of the CPU ddim_logprob and ddim_logprob_backward kernels, run by ctest
// (CMakeLists.txt).  Compares both with a scalar loop of the formulas in double (σ = 0 row,
// CFG on/off, clip on/off, mean/sum, fp32/fp64/mixed bf16 inputs), checks the backward against
// central finite differences of the forward in fp64, and checks registration and errors.
// Exit status: 0 on success, 1 on any mismatch.
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "../ddim_logprob.h"
#include "../ddim_step.h"
#include "test_common.h"

namespace {

using b2fast_test::expect;
using b2fast_test::make_table;
using b2fast_test::rel_err;

struct Truth {
  std::vector<double> log_prob, grad_uncond, grad_cond;
};

// The scalar loop in double: log p and the gradients for upstream gradient `grad` (B,).
Truth scalar_logprob(const at::Tensor& eu, const at::Tensor& ec, double w, const at::Tensor& xt,
                     const at::Tensor& xp, const at::Tensor& table, const at::Tensor& idx,
                     std::optional<double> clip, bool reduce_mean, const at::Tensor& grad) {
  const int64_t batch = ec.size(0), per = ec.numel() / batch;
  auto dbl = [](const at::Tensor& t) { return t.to(at::kDouble).contiguous(); };
  const at::Tensor c = dbl(ec), x = dbl(xt), p = dbl(xp), g = dbl(grad), tab64 = dbl(table);
  const at::Tensor u = eu.defined() ? dbl(eu) : at::Tensor();
  const auto tab = tab64.accessor<double, 2>();
  Truth out{std::vector<double>(batch), std::vector<double>(ec.numel()),
            std::vector<double>(ec.numel())};
  for (int64_t b = 0; b < batch; ++b) {
    const auto* row = &tab[idx[b].item<int64_t>()][0];
    const double sigma = row[b2fast::kSigma];
    const double g_b = g.data_ptr<double>()[b] / (reduce_mean ? per : 1);
    double sum = 0.0;
    for (int64_t k = b * per; k < (b + 1) * per; ++k) {
      const double ck = c.data_ptr<double>()[k];
      const double uk = u.defined() ? u.data_ptr<double>()[k] : 0.0;
      const double eps = u.defined() ? uk + w * (ck - uk) : ck;
      double x0 = (x.data_ptr<double>()[k] - row[b2fast::kSqrt1mAb] * eps) / row[b2fast::kSqrtAb];
      const bool in_range = !clip || (-*clip <= x0 && x0 <= *clip);
      if (clip) x0 = std::min(std::max(x0, -*clip), *clip);
      const double mu = row[b2fast::kSqrtAbPrev] * x0 + row[b2fast::kDirCoef] * eps;
      const double d = p.data_ptr<double>()[k] - mu;
      double d_eps = 0.0;
      if (sigma > 0) {
        sum += -d * d / (2 * sigma * sigma) - std::log(sigma) - b2fast::kHalfLog2Pi;
        const double slope = row[b2fast::kSqrtAbPrev] * row[b2fast::kSqrt1mAb] /
                             row[b2fast::kSqrtAb];  // −dμ/dx̂0·dx̂0/dε̂ inside the clamp
        const double dmu = row[b2fast::kDirCoef] - (in_range ? slope : 0.0);
        d_eps = g_b * d / (sigma * sigma) * dmu;
      }
      out.grad_cond[k] = u.defined() ? w * d_eps : d_eps;
      out.grad_uncond[k] = (1 - w) * d_eps;
    }
    out.log_prob[b] = reduce_mean ? sum / per : sum;
  }
  return out;
}

void check_case(const std::vector<int64_t>& shape, at::ScalarType eps_dtype,
                at::ScalarType state_dtype, bool cfg, std::optional<double> clip, bool mean,
                double tol, double grad_tol) {
  const at::ScalarType compute = eps_dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor table = make_table(10, 1.0).to(compute);
  table[9][b2fast::kSigma] = 0.0;  // a deterministic row: log p = 0, gradient 0
  auto rnd = [&](at::ScalarType t) { return at::randn(shape, at::kDouble).to(t); };
  const at::Tensor eu = cfg ? rnd(eps_dtype) : at::Tensor(), ec = rnd(eps_dtype);
  const at::Tensor xt = rnd(state_dtype) * 2;
  at::Tensor idx = (at::arange(shape[0], at::kLong) * 3).remainder(10);
  idx[0] = 9;
  const std::optional<at::Tensor> eu_opt = cfg ? std::optional<at::Tensor>(eu) : std::nullopt;
  // x' from the sampling step, so x' − μ is a realistic σ·z
  const at::Tensor xp = std::get<0>(b2fast::ddim_step_with_logprob_cpu(
      eu_opt, ec, 5.0, xt, rnd(compute), table, idx, state_dtype, clip, mean));
  const at::Tensor grad = at::randn({shape[0]}, at::kDouble).to(compute);

  const at::Tensor lp = b2fast::ddim_logprob_cpu(eu_opt, ec, 5.0, xt, xp, table, idx, clip, mean);
  auto [gu, gc] =
      b2fast::ddim_logprob_backward_cpu(grad, eu_opt, ec, 5.0, xt, xp, table, idx, clip, mean);
  const Truth want = scalar_logprob(eu, ec, 5.0, xt, xp, table, idx, clip, mean, grad);
  const std::string name =
      c10::str(eps_dtype, "/", state_dtype, " ", c10::IntArrayRef(shape), cfg ? " cfg" : "",
               clip ? " clip" : "", mean ? " mean" : " sum");
  expect(lp.scalar_type() == compute && rel_err(lp, want.log_prob) < tol,
         name + ": log_prob vs scalar loop");
  expect(lp[0].item<double>() == 0.0, name + ": sigma = 0 gives log_prob 0");
  expect(gc.scalar_type() == eps_dtype && gc.sizes() == ec.sizes() &&
             rel_err(gc, want.grad_cond) < grad_tol,
         name + ": grad_eps_cond vs scalar loop");
  expect(gc[0].abs().max().item<double>() == 0.0, name + ": sigma = 0 gives zero gradient");
  if (cfg) {
    expect(gu.scalar_type() == eps_dtype && rel_err(gu, want.grad_uncond) < grad_tol,
           name + ": grad_eps_uncond vs scalar loop");
  } else {
    expect(gu.dim() == 1 && gu.size(0) == 0 && gu.scalar_type() == eps_dtype,
           name + ": no eps_uncond gives an empty (0,) grad_eps_uncond");
  }
}

// The backward is the derivative of the forward: central differences in fp64.
void check_finite_differences() {
  const std::vector<int64_t> shape{2, 3, 4, 4};
  const at::Tensor table = make_table(10, 1.0);
  const at::Tensor eu = at::randn(shape, at::kDouble), ec = at::randn(shape, at::kDouble);
  const at::Tensor xt = at::randn(shape, at::kDouble), xp = at::randn(shape, at::kDouble) * 0.5;
  const at::Tensor idx = at::tensor({2, 6}, at::kLong), grad = at::tensor({0.7, -1.3}, at::kDouble);
  auto [gu, gc] = b2fast::ddim_logprob_backward_cpu(grad, eu, ec, 3.0, xt, xp, table, idx,
                                                    std::nullopt, true);
  double worst = 0.0;
  const double h = 1e-6;
  for (int64_t k : {0, 17, 40, 95}) {
    for (bool uncond : {false, true}) {
      auto lp_at = [&](double delta) {
        at::Tensor u = eu.clone(), c = ec.clone();
        (uncond ? u : c).view({-1})[k] += delta;
        return (b2fast::ddim_logprob_cpu(u, c, 3.0, xt, xp, table, idx, std::nullopt, true) * grad)
            .sum()
            .item<double>();
      };
      const double fd = (lp_at(h) - lp_at(-h)) / (2 * h);
      const double an = (uncond ? gu : gc).view({-1})[k].item<double>();
      worst = std::max(worst, std::abs(fd - an) / std::max(std::abs(an), 1e-3));
    }
  }
  expect(worst < 1e-5, c10::str("backward vs finite differences (rel err ", worst, ")"));
}

void check_registration_and_errors() {
  for (const char* name : {"b2fast::ddim_logprob", "b2fast::ddim_logprob_backward"}) {
    const auto op = c10::Dispatcher::singleton().findOp({name, ""});
    expect(op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU) &&
               op->hasKernelForDispatchKey(c10::DispatchKey::Meta),
           std::string(name) + " registered with CPU and Meta kernels");
  }
  const at::Tensor x = at::randn({2, 4, 3, 3}), idx = at::zeros({2}, at::kLong);
  std::string message;
  try {
    b2fast::ddim_logprob_backward_cpu(at::ones({3}), std::nullopt, x, 1.0, x, x,
                                      make_table(10, 1.0), idx, std::nullopt, true);
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  }
  expect(message.find("grad_log_prob must be (B,)") != std::string::npos,
         "bad grad_log_prob shape raises an error naming grad_log_prob");
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (bool mean : {true, false}) {
    check_case({3, 4, 5, 7}, at::kFloat, at::kFloat, true, std::nullopt, mean, 1e-5, 1e-4);
    check_case({3, 4, 5, 7}, at::kFloat, at::kFloat, true, 1.0, mean, 1e-5, 1e-4);
  }
  check_case({2, 4, 64, 65}, at::kFloat, at::kFloat, false, std::nullopt, true, 1e-5, 1e-4);
  check_case({2, 3, 9, 9}, at::kDouble, at::kDouble, true, 1.0, false, 1e-12, 1e-10);
  check_case({2, 4, 8, 8}, at::kBFloat16, at::kFloat, true, std::nullopt, true, 1e-5, 1e-2);
  check_finite_differences();
  check_registration_and_errors();
  const int failures = b2fast_test::failures;
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
