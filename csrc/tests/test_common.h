// Helpers shared by the C++ tests (csrc/tests/*.cpp): pass/fail bookkeeping, a small SD-like
// schedule table and a relative error.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "../ddim_math.h"

namespace b2fast_test {

inline int failures = 0;

inline void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// (S, 6) table of DDIM with η = eta over SD's scaled-linear betas (0.00085 → 0.012, 1000 steps).
inline at::Tensor make_table(int64_t num_steps, double eta) {
  std::vector<double> ab(1000);
  double prod = 1.0;
  for (int i = 0; i < 1000; ++i) {
    const double root = std::sqrt(0.00085) + (std::sqrt(0.012) - std::sqrt(0.00085)) * i / 999.0;
    prod *= 1.0 - root * root;
    ab[i] = prod;
  }
  at::Tensor table = at::zeros({num_steps, b2fast::kTableColumns}, at::kDouble);
  auto t = table.accessor<double, 2>();
  const int64_t stride = 1000 / num_steps;
  for (int64_t i = 0; i < num_steps; ++i) {
    const int64_t step = (num_steps - 1 - i) * stride + 1;  // "leading", steps_offset 1
    const double a = ab[step], ap = step - stride >= 0 ? ab[step - stride] : ab[0];
    const double sigma = eta * std::sqrt((1 - ap) / (1 - a) * (1 - a / ap));
    t[i][b2fast::kSqrtAb] = std::sqrt(a);
    t[i][b2fast::kSqrt1mAb] = std::sqrt(1 - a);
    t[i][b2fast::kSqrtAbPrev] = std::sqrt(ap);
    t[i][b2fast::kDirCoef] = std::sqrt(std::max(1 - ap - sigma * sigma, 0.0));
    t[i][b2fast::kSigma] = sigma;
    t[i][b2fast::kLogSigma] = sigma > 0 ? std::log(sigma) : 0.0;
  }
  return table;
}

// max |actual − truth| / max |truth| over all elements.
inline double rel_err(const at::Tensor& actual, const std::vector<double>& truth) {
  const at::Tensor a = actual.to(at::kDouble).contiguous().reshape({-1});
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < truth.size(); ++i) {
    num = std::max(num, std::abs(a.data_ptr<double>()[i] - truth[i]));
    den = std::max(den, std::abs(truth[i]));
  }
  return den > 0 ? num / den : num;
}

}  // namespace b2fast_test
