// CPU kernel of the fused DDIM sampling step with log-prob (DESIGN §2; spec:
// b2fast.reference.ddim.ddim_step_with_logprob).  Per element, in the compute dtype acc_t:
//   1. ε̂  = ε_u + w·(ε_c − ε_u)                  (CFG; ε̂ = ε_c without eps_uncond)
//   2. x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t            (optionally clamped to [−r, r])
//   3. μ  = √ᾱ_t'·x̂0 + √(1−ᾱ_t'−σ²)·ε̂
//   4. x' = μ + σ·z, rounded to out_dtype and stored
//   5. log p += −(x'_stored − μ)²/(2σ²) − log σ − ½log 2π   (0 for samples with σ = 0)
// The operations run in the reference's order and precision, so x' is bitwise the reference's
// and only the reduction order differs (double sums here, ~1e-7 relative in fp32).
#include "ddim_step.h"

#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace b2fast {
namespace {

// Elements per reduction block.  The partition depends only on the shape, never on the thread
// count, so log p is bitwise reproducible across runs and machines.
constexpr int64_t kBlock = 4096;

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

template <typename acc_t>
struct StepArgs {
  const void* eps_uncond;  // nullptr: no CFG
  const void* eps_cond;
  const void* x_t;
  const void* noise;
  const acc_t* table;        // (S, 6) in acc_t
  const int64_t* step_index;  // (B,)
  void* x_prev;
  double* partial;  // (B · blocks,) per-block sums of the per-element log-density
  int64_t per_sample;
  int64_t blocks;
  acc_t guidance_scale;
  bool clip;
  acc_t clip_range;
};

// Steps 1–5 over elements [lo, hi) of sample b; returns the block's log-density sum.
template <typename in_t, typename out_t, typename acc_t>
double step_block(const StepArgs<acc_t>& a, int64_t b, int64_t lo, int64_t hi) {
  const auto* eu = static_cast<const in_t*>(a.eps_uncond);
  const auto* ec = static_cast<const in_t*>(a.eps_cond);
  const auto* xt = static_cast<const in_t*>(a.x_t);
  const auto* z = static_cast<const in_t*>(a.noise);
  auto* out = static_cast<out_t*>(a.x_prev);
  const acc_t* row = a.table + a.step_index[b] * kTableColumns;
  const acc_t sigma = row[kSigma];
  const bool stochastic = sigma > acc_t(0);
  const acc_t two_var = acc_t(2) * sigma * sigma;  // same rounding as the reference's 2·σ·σ
  const acc_t half_log_2pi = static_cast<acc_t>(kHalfLog2Pi);
  double sum = 0.0;
  for (int64_t i = b * a.per_sample + lo; i < b * a.per_sample + hi; ++i) {
    const acc_t c = static_cast<acc_t>(ec[i]);
    const acc_t eps = eu ? static_cast<acc_t>(eu[i]) +
                               a.guidance_scale * (c - static_cast<acc_t>(eu[i]))
                         : c;
    acc_t x0 = (static_cast<acc_t>(xt[i]) - row[kSqrt1mAb] * eps) / row[kSqrtAb];
    if (a.clip) x0 = std::min(std::max(x0, -a.clip_range), a.clip_range);
    const acc_t mu = row[kSqrtAbPrev] * x0 + row[kDirCoef] * eps;
    const out_t stored = static_cast<out_t>(mu + sigma * static_cast<acc_t>(z[i]));
    out[i] = stored;
    if (stochastic) {
      // log p on the *stored* x' (numerics rule, DESIGN §2)
      const acc_t d = static_cast<acc_t>(stored) - mu;
      sum += static_cast<double>(-(d * d) / two_var - row[kLogSigma] - half_log_2pi);
    }
  }
  return sum;
}

template <typename in_t, typename out_t, typename acc_t>
void run_step(const StepArgs<acc_t>& a, int64_t batch) {
  // One job per (sample, block); grain 1 because a block is already kBlock elements of work.
  at::parallel_for(0, batch * a.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / a.blocks;
      const int64_t lo = (job % a.blocks) * kBlock;
      const int64_t hi = std::min(a.per_sample, lo + kBlock);
      a.partial[job] = step_block<in_t, out_t, acc_t>(a, b, lo, hi);
    }
  });
}

// Per-sample log p from the block sums, added in block order (deterministic).
template <typename acc_t>
void reduce_blocks(const double* partial, int64_t batch, int64_t blocks, int64_t per_sample,
                   bool reduce_mean, acc_t* log_prob) {
  for (int64_t b = 0; b < batch; ++b) {
    double total = 0.0;
    for (int64_t j = 0; j < blocks; ++j) total += partial[b * blocks + j];
    log_prob[b] = static_cast<acc_t>(reduce_mean ? total / static_cast<double>(per_sample) : total);
  }
}

void check_step_index_values(const at::Tensor& step_index, int64_t num_steps) {
  const int64_t* idx = step_index.data_ptr<int64_t>();
  for (int64_t b = 0; b < step_index.numel(); ++b) {
    TORCH_CHECK(idx[b] >= 0 && idx[b] < num_steps, "ddim_step_with_logprob: step_index[", b,
                "] = ", idx[b], " is out of range; allowed: 0 <= step_index < table rows (",
                num_steps, ")");
  }
}

}  // namespace

at::ScalarType ddim_compute_dtype(const at::Tensor& eps_cond) {
  return eps_cond.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_ddim_step_args(const std::optional<at::Tensor>& eps_uncond,
                          const at::Tensor& eps_cond, const at::Tensor& x_t,
                          const at::Tensor& noise, const at::Tensor& table,
                          const at::Tensor& step_index, at::ScalarType out_dtype,
                          std::optional<double> clip_sample_range) {
  constexpr const char* op = "ddim_step_with_logprob: ";
  constexpr const char* floats = "allowed: float32, float64, float16, bfloat16";
  TORCH_CHECK(eps_cond.dim() >= 1, op, "eps_cond must be (B, ...) with a batch dim, got a ",
              eps_cond.dim(), "-d tensor");
  TORCH_CHECK(is_supported_float(eps_cond.scalar_type()), op, "eps_cond dtype ",
              eps_cond.scalar_type(), " is not supported; ", floats);
  const auto device = eps_cond.device();
  auto check_like_eps = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sym_sizes() == eps_cond.sym_sizes(), op, name,
                " must have the shape of eps_cond ", eps_cond.sym_sizes(), ", got ", t.sym_sizes());
    TORCH_CHECK(is_supported_float(t.scalar_type()), op, name, " dtype ", t.scalar_type(),
                " is not supported; ", floats);
    TORCH_CHECK(t.device() == device, op, name, " is on ", t.device(),
                " but eps_cond is on ", device, "; all tensors must share one device");
  };
  if (eps_uncond.has_value()) check_like_eps(*eps_uncond, "eps_uncond");
  check_like_eps(x_t, "x_t");
  check_like_eps(noise, "noise");
  TORCH_CHECK(table.dim() == 2 && table.sym_size(1) == kTableColumns, op,
              "table must be (S, 6) (see b2fast.schedule.build_step_table), got ",
              table.sym_sizes());
  TORCH_CHECK(table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble, op,
              "table dtype ", table.scalar_type(), " is not supported; allowed: float32, float64");
  TORCH_CHECK(table.device() == device, op, "table is on ", table.device(), " but eps_cond is on ",
              device, "; all tensors must share one device");
  TORCH_CHECK(step_index.dim() == 1 && step_index.sym_size(0) == eps_cond.sym_size(0), op,
              "step_index must be (B,) = (", eps_cond.sym_size(0), ",), got ",
              step_index.sym_sizes());
  TORCH_CHECK(step_index.scalar_type() == at::kLong, op, "step_index dtype ",
              step_index.scalar_type(), " is not supported; allowed: int64");
  TORCH_CHECK(step_index.device() == device, op, "step_index is on ", step_index.device(),
              " but eps_cond is on ", device, "; all tensors must share one device");
  TORCH_CHECK(is_supported_float(out_dtype), op, "out_dtype ", out_dtype,
              " is not supported; ", floats);
  TORCH_CHECK(!clip_sample_range.has_value() || *clip_sample_range > 0.0, op,
              "clip_sample_range must be None (no clip) or > 0, got ",
              clip_sample_range.value_or(0.0));
}

std::tuple<at::Tensor, at::Tensor> ddim_step_with_logprob_cpu(
    const std::optional<at::Tensor>& eps_uncond, const at::Tensor& eps_cond,
    double guidance_scale, const at::Tensor& x_t, const at::Tensor& noise,
    const at::Tensor& table, const at::Tensor& step_index, at::ScalarType out_dtype,
    std::optional<double> clip_sample_range, bool reduce_mean) {
  check_ddim_step_args(eps_uncond, eps_cond, x_t, noise, table, step_index, out_dtype,
                       clip_sample_range);
  TORCH_CHECK(eps_cond.device().is_cpu(),
              "ddim_step_with_logprob_cpu: tensors must be on CPU, got ", eps_cond.device());
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
  check_step_index_values(idx, tab.size(0));

  const int64_t batch = ec.size(0);
  const int64_t per_sample = batch > 0 ? ec.numel() / batch : 0;
  const int64_t blocks = (per_sample + kBlock - 1) / kBlock;
  at::Tensor x_prev = at::empty(ec.sizes(), ec.options().dtype(out_dtype));
  at::Tensor log_prob = at::empty({batch}, ec.options().dtype(compute));
  std::vector<double> partial(static_cast<size_t>(batch * blocks));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_dtype, "ddim_step_in", [&] {
    using in_t = scalar_t;
    using acc_t = at::opmath_type<in_t>;  // fp32 for fp16/bf16/fp32, fp64 for fp64 = compute
    const StepArgs<acc_t> args{eu.defined() ? eu.data_ptr() : nullptr, ec.data_ptr(),
                               xt.data_ptr(), z.data_ptr(), tab.data_ptr<acc_t>(),
                               idx.data_ptr<int64_t>(), x_prev.data_ptr(), partial.data(),
                               per_sample, blocks, static_cast<acc_t>(guidance_scale),
                               clip_sample_range.has_value(),
                               static_cast<acc_t>(clip_sample_range.value_or(0.0))};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "ddim_step_out", [&] {
      run_step<in_t, scalar_t, acc_t>(args, batch);
    });
    reduce_blocks<acc_t>(partial.data(), batch, blocks, per_sample, reduce_mean,
                         log_prob.data_ptr<acc_t>());
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
