// Argument checks and helpers shared by every DDIM op and backend (CPU, CUDA, Meta).
//
// The checks read shapes, dtypes and devices only, never tensor values, so they are safe on
// meta/fake tensors and never sync a device; only check_step_index_values reads values (CPU).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "ddim_math.h"

namespace b2fast {

// fp32, fp64, fp16 or bf16: the float dtypes every op accepts.
bool is_supported_float(at::ScalarType t);

// Compute dtype of the DDIM ops, as in the reference: fp64 when eps_cond is fp64, else fp32.
at::ScalarType ddim_compute_dtype(const at::Tensor& eps_cond);

// Checks common to all DDIM ops: eps_cond is (B, ...) in a supported float dtype, eps_uncond
// (optional) and x_t are like it, table is (S, 6) fp32/fp64, step_index is (B,) int64, all on
// eps_cond's device, and clip_sample_range is None or > 0.  `op` prefixes the messages.
void check_ddim_args(const char* op, const std::optional<at::Tensor>& eps_uncond,
                     const at::Tensor& eps_cond, const at::Tensor& x_t, const at::Tensor& table,
                     const at::Tensor& step_index, std::optional<double> clip_sample_range);

// `t` (called `name` in messages) has eps_cond's shape, a supported float dtype, its device.
void check_like_eps(const char* op, const at::Tensor& t, const at::Tensor& eps_cond,
                    const char* name);

// `t` is a (B,) tensor on eps_cond's device (B = eps_cond.size(0)) in dtype `dtype`, or in a
// supported float dtype when `dtype` is nullopt.
void check_per_sample(const char* op, const at::Tensor& t, const at::Tensor& eps_cond,
                      const char* name, std::optional<at::ScalarType> dtype);

// CPU only: every step_index value lies in [0, num_steps).  Reads the values on the host.
void check_step_index_values(const char* op, const at::Tensor& step_index, int64_t num_steps);

// Elements per sample, D = numel / B (0 for an empty batch).
int64_t elements_per_sample(const at::Tensor& t);

}  // namespace b2fast
