// Argument checks shared by the DDIM ops (declarations and contracts: ddim_common.h).
#include "ddim_common.h"

namespace b2fast {
namespace {

constexpr const char* kFloats = "allowed: float32, float64, float16, bfloat16";

}  // namespace

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

at::ScalarType ddim_compute_dtype(const at::Tensor& eps_cond) {
  return eps_cond.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_like_eps(const char* op, const at::Tensor& t, const at::Tensor& eps_cond,
                    const char* name) {
  TORCH_CHECK(t.sym_sizes() == eps_cond.sym_sizes(), op, ": ", name,
              " must have the shape of eps_cond ", eps_cond.sym_sizes(), ", got ", t.sym_sizes());
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name, " dtype ", t.scalar_type(),
              " is not supported; ", kFloats);
  TORCH_CHECK(t.device() == eps_cond.device(), op, ": ", name, " is on ", t.device(),
              " but eps_cond is on ", eps_cond.device(), "; all tensors must share one device");
}

void check_per_sample(const char* op, const at::Tensor& t, const at::Tensor& eps_cond,
                      const char* name, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(t.dim() == 1 && t.sym_size(0) == eps_cond.sym_size(0), op, ": ", name,
              " must be (B,) = (", eps_cond.sym_size(0), ",), got ", t.sym_sizes());
  if (dtype.has_value()) {
    TORCH_CHECK(t.scalar_type() == *dtype, op, ": ", name, " dtype ", t.scalar_type(),
                " is not supported; allowed: ", *dtype);
  } else {
    TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name, " dtype ", t.scalar_type(),
                " is not supported; ", kFloats);
  }
  TORCH_CHECK(t.device() == eps_cond.device(), op, ": ", name, " is on ", t.device(),
              " but eps_cond is on ", eps_cond.device(), "; all tensors must share one device");
}

void check_ddim_args(const char* op, const std::optional<at::Tensor>& eps_uncond,
                     const at::Tensor& eps_cond, const at::Tensor& x_t, const at::Tensor& table,
                     const at::Tensor& step_index, std::optional<double> clip_sample_range) {
  TORCH_CHECK(eps_cond.dim() >= 1, op, ": eps_cond must be (B, ...) with a batch dim, got a ",
              eps_cond.dim(), "-d tensor");
  TORCH_CHECK(is_supported_float(eps_cond.scalar_type()), op, ": eps_cond dtype ",
              eps_cond.scalar_type(), " is not supported; ", kFloats);
  if (eps_uncond.has_value()) check_like_eps(op, *eps_uncond, eps_cond, "eps_uncond");
  check_like_eps(op, x_t, eps_cond, "x_t");
  TORCH_CHECK(table.dim() == 2 && table.sym_size(1) == kTableColumns, op,
              ": table must be (S, 6) (see b2fast.schedule.build_step_table), got ",
              table.sym_sizes());
  TORCH_CHECK(table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble, op,
              ": table dtype ", table.scalar_type(),
              " is not supported; allowed: float32, float64");
  TORCH_CHECK(table.device() == eps_cond.device(), op, ": table is on ", table.device(),
              " but eps_cond is on ", eps_cond.device(), "; all tensors must share one device");
  check_per_sample(op, step_index, eps_cond, "step_index", at::kLong);
  TORCH_CHECK(!clip_sample_range.has_value() || *clip_sample_range > 0.0, op,
              ": clip_sample_range must be None (no clip) or > 0, got ",
              clip_sample_range.value_or(0.0));
}

void check_step_index_values(const char* op, const at::Tensor& step_index, int64_t num_steps) {
  const at::Tensor idx = step_index.contiguous();
  const int64_t* data = idx.data_ptr<int64_t>();
  for (int64_t b = 0; b < idx.numel(); ++b) {
    TORCH_CHECK(data[b] >= 0 && data[b] < num_steps, op, ": step_index[", b, "] = ", data[b],
                " is out of range; allowed: 0 <= step_index < table rows (", num_steps, ")");
  }
}

int64_t elements_per_sample(const at::Tensor& t) {
  return t.size(0) > 0 ? t.numel() / t.size(0) : 0;
}

}  // namespace b2fast
