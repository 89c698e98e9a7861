// C++ test of the CPU ddim_step_with_logprob kernel, run by ctest (CMakeLists.txt).
// Compares the kernel with a straightforward scalar loop in double over a small SD-like
// schedule (built here from ᾱ, including a σ = 0 row), for fp32 and fp64 inputs, with and
// without CFG, and checks that the op is registered and rejects bad arguments.
// Exit status: 0 on success, 1 on any mismatch.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "../ddim_step.h"
#include "test_common.h"

namespace {

using b2fast_test::expect;
using b2fast_test::make_table;
using b2fast_test::rel_err;

struct Expected {
  std::vector<double> x_prev, log_prob;
};

// The scalar loop: the DDIM formulas in double, log p on the kernel's stored x_prev.
Expected scalar_step(const at::Tensor& eu, const at::Tensor& ec, double w, const at::Tensor& xt,
                     const at::Tensor& z, const at::Tensor& table, const at::Tensor& idx,
                     const at::Tensor& stored) {
  const int64_t batch = ec.size(0), per = ec.numel() / batch;
  auto dbl = [](const at::Tensor& t) { return t.to(at::kDouble).contiguous(); };
  const at::Tensor c = dbl(ec), x = dbl(xt), n = dbl(z), s = dbl(stored);
  const at::Tensor u = eu.defined() ? dbl(eu) : at::Tensor();
  const double* up = u.defined() ? u.data_ptr<double>() : nullptr;
  const double *cp = c.data_ptr<double>(), *xp = x.data_ptr<double>();
  const at::Tensor table64 = table.to(at::kDouble);
  const auto tab = table64.accessor<double, 2>();
  Expected out{std::vector<double>(ec.numel()), std::vector<double>(batch)};
  for (int64_t b = 0; b < batch; ++b) {
    const auto* row = &tab[idx[b].item<int64_t>()][0];
    double sum = 0.0;
    for (int64_t k = b * per; k < (b + 1) * per; ++k) {
      const double eps = up ? up[k] + w * (cp[k] - up[k]) : cp[k];
      const double x0 = (xp[k] - row[b2fast::kSqrt1mAb] * eps) / row[b2fast::kSqrtAb];
      const double mu = row[b2fast::kSqrtAbPrev] * x0 + row[b2fast::kDirCoef] * eps;
      const double sigma = row[b2fast::kSigma];
      out.x_prev[k] = mu + sigma * n.data_ptr<double>()[k];
      const double d = s.data_ptr<double>()[k] - mu;
      if (sigma > 0) sum += -d * d / (2 * sigma * sigma) - std::log(sigma) - b2fast::kHalfLog2Pi;
    }
    out.log_prob[b] = sum / static_cast<double>(per);
  }
  return out;
}

void check_case(const std::vector<int64_t>& shape, at::ScalarType dtype, bool cfg, double tol) {
  const at::Tensor table = make_table(10, 1.0);
  at::Tensor tab = table.to(dtype == at::kDouble ? at::kDouble : at::kFloat);
  tab[9][b2fast::kSigma] = 0.0;  // one deterministic row: x' = μ, log p = 0
  auto rnd = [&] { return at::randn(shape, at::kDouble).to(dtype); };
  const at::Tensor eu = cfg ? rnd() : at::Tensor(), ec = rnd(), xt = rnd() * 2, z = rnd();
  at::Tensor idx = (at::arange(shape[0], at::kLong) * 3).remainder(10);  // mixed steps
  idx[0] = 9;
  auto [x_prev, log_prob] = b2fast::ddim_step_with_logprob_cpu(
      cfg ? std::optional<at::Tensor>(eu) : std::nullopt, ec, 5.0, xt, z, tab, idx, dtype,
      std::nullopt, true);
  const Expected want = scalar_step(eu, ec, 5.0, xt, z, tab, idx, x_prev);
  const std::string name = c10::str(dtype, " ", c10::IntArrayRef(shape), cfg ? " cfg" : " no-cfg");
  expect(rel_err(x_prev, want.x_prev) < tol, name + ": x_prev vs scalar loop");
  expect(rel_err(log_prob, want.log_prob) < tol, name + ": log_prob vs scalar loop");
  expect(log_prob[0].item<double>() == 0.0, name + ": sigma = 0 gives log_prob 0");
}

void check_registration_and_errors() {
  const auto op = c10::Dispatcher::singleton().findOp({"b2fast::ddim_step_with_logprob", ""});
  expect(op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU) &&
             op->hasKernelForDispatchKey(c10::DispatchKey::Meta),
         "op registered with CPU and Meta kernels");
  const at::Tensor x = at::randn({2, 4, 3, 3}), idx = at::zeros({2}, at::kLong);
  std::string message;
  try {
    b2fast::ddim_step_with_logprob_cpu(std::nullopt, x, 1.0, x.narrow(1, 0, 2), x,
                                       make_table(10, 1.0), idx, at::kFloat, std::nullopt, true);
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  }
  expect(message.find("x_t must have the shape of eps_cond") != std::string::npos,
         "bad x_t shape raises an error naming x_t");
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_case({3, 4, 5, 7}, at::kFloat, true, 1e-5);
  check_case({2, 4, 64, 65}, at::kFloat, true, 1e-5);  // several 4,096-element blocks
  check_case({3, 4, 9, 9}, at::kFloat, false, 1e-5);
  check_case({1, 3, 5, 7}, at::kDouble, true, 1e-12);
  check_registration_and_errors();
  const int failures = b2fast_test::failures;
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
