// Per-element DDIM math shared by the CPU kernels (csrc/*.cpp) and the CUDA kernels
// (csrc/cuda/*.cu); spec: b2fast/reference/ddim.py.  Header-only and free of ATen, so nvcc
// compiles the same functions for the device.
//
// Every function runs the reference's operations in the reference's order and precision acc_t
// (fp32, or fp64 when eps_cond is fp64), so the CPU x_prev is bitwise the reference's.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/macros/Macros.h>

namespace b2fast {

// Column layout of the (S, 6) per-step schedule table; must match b2fast/kernels/table.py.
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

// a·b rounded to T before it is used.  nvcc contracts a·b + c into one fused multiply-add by
// default; the reference (separate PyTorch ops) and the CPU kernels round the product first, so
// every product that feeds an addition goes through here.
template <typename T>
C10_HOST_DEVICE inline T mul_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, double>) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

// One row of the schedule table in the compute dtype.
template <typename acc_t>
struct StepCoefs {
  acc_t sqrt_ab, sqrt_1m_ab, sqrt_ab_prev, dir_coef, sigma, log_sigma;

  C10_HOST_DEVICE static StepCoefs load(const acc_t* row) {
    return {row[kSqrtAb], row[kSqrt1mAb], row[kSqrtAbPrev],
            row[kDirCoef], row[kSigma],   row[kLogSigma]};
  }
  // σ > 0: a stochastic step.  σ = 0 is deterministic: log p = 0 and no gradient.
  C10_HOST_DEVICE bool stochastic() const { return sigma > acc_t(0); }
  // 2·σ·σ, rounded as the reference's 2 * σ * σ.
  C10_HOST_DEVICE acc_t two_var() const { return acc_t(2) * sigma * sigma; }
};

// Optional clamp of x̂0 to [−range, range] (clip_sample_range; SD uses none).
template <typename acc_t>
struct Clip {
  bool on;
  acc_t range;
};

// ε̂ = ε_u + w·(ε_c − ε_u)  (classifier-free guidance).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t cfg_combine(acc_t eps_uncond, acc_t eps_cond, acc_t w) {
  return eps_uncond + mul_rn(w, eps_cond - eps_uncond);
}

// μ = √ᾱ_t'·clamp(x̂0) + √(1−ᾱ_t'−σ²)·ε̂ with x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t.
// *in_range (optional) tells whether the clamp let x̂0 through, −r ≤ x̂0 ≤ r inclusive as in
// clamp's backward (always true without clip).  The clamp propagates NaN like torch.clamp.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t ddim_mean(acc_t eps, acc_t x_t, const StepCoefs<acc_t>& c,
                                       Clip<acc_t> clip, bool* in_range = nullptr) {
  acc_t x0 = (x_t - mul_rn(c.sqrt_1m_ab, eps)) / c.sqrt_ab;
  if (in_range) *in_range = !clip.on || (-clip.range <= x0 && x0 <= clip.range);
  if (clip.on) {
    x0 = x0 < -clip.range ? -clip.range : x0;
    x0 = x0 > clip.range ? clip.range : x0;
  }
  return mul_rn(c.sqrt_ab_prev, x0) + mul_rn(c.dir_coef, eps);
}

// log N(x'; μ, σ²) of one element, d = x' − μ:  −d²/(2σ²) − log σ − ½log 2π.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t gaussian_logdensity(acc_t d, const StepCoefs<acc_t>& c) {
  return -(d * d) / c.two_var() - c.log_sigma - static_cast<acc_t>(kHalfLog2Pi);
}

// dμ/dε̂ = √(1−ᾱ_t'−σ²) − √ᾱ_t'·√(1−ᾱ_t)/√ᾱ_t  (the second term only where the clamp passes).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t mean_grad_eps(const StepCoefs<acc_t>& c, bool in_range) {
  return in_range ? c.dir_coef - mul_rn(c.sqrt_ab_prev, c.sqrt_1m_ab / c.sqrt_ab) : c.dir_coef;
}

// ∂(g·log p)/∂ε̂ of one element: scale·(x' − μ)·dμ/dε̂, where scale = g_b/σ² is the sample's
// upstream gradient (already divided by D for reduce_mean) over σ²; callers skip σ = 0 samples.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t logprob_grad_eps(acc_t eps, acc_t x_t, acc_t x_prev,
                                              const StepCoefs<acc_t>& c, Clip<acc_t> clip,
                                              acc_t scale) {
  bool in_range = true;
  const acc_t mu = ddim_mean(eps, x_t, c, clip, &in_range);
  return scale * (x_prev - mu) * mean_grad_eps(c, in_range);
}

}  // namespace b2fast
