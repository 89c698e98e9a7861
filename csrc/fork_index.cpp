// CPU kernel of the fork by index (spec: b2fast.reference.fork_index):
// out[i] = latents[index[i]] cast to out.dtype (the same conversion as Tensor.to), written in
// place into a preallocated output. Every index is checked against [0, P) before any write.
#include "fork_index.h"

#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/TypeCast.h>
#include <torch/library.h>

#include "cpu_blocks.h"
#include "ddim_common.h"

namespace b2fast {
namespace {

constexpr const char* kOp = "fork_index_out";

}  // namespace

void check_fork_index_args(const at::Tensor& latents, const at::Tensor& index,
                           const at::Tensor& out) {
  constexpr const char* floats = "allowed: float32, float64, float16, bfloat16";
  TORCH_CHECK(latents.dim() >= 1, kOp, ": latents must be (P, ...) with a row dim, got a ",
              latents.dim(), "-d tensor");
  TORCH_CHECK(is_supported_float(latents.scalar_type()), kOp, ": latents dtype ",
              latents.scalar_type(), " is not supported; ", floats);
  TORCH_CHECK(index.dim() == 1, kOp, ": index must be (M,), got ", index.sym_sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, kOp, ": index dtype ", index.scalar_type(),
              " is not supported; allowed: int64");
  std::vector<c10::SymInt> want(latents.sym_sizes().begin(), latents.sym_sizes().end());
  want[0] = index.sym_size(0);
  TORCH_CHECK(out.sym_sizes() == c10::SymIntArrayRef(want), kOp, ": out must be (M, ...) = ",
              c10::SymIntArrayRef(want), ", got ", out.sym_sizes());
  TORCH_CHECK(is_supported_float(out.scalar_type()), kOp, ": out dtype ", out.scalar_type(),
              " is not supported; ", floats);
  for (const auto& [t, name] : {std::pair{&index, "index"}, std::pair{&out, "out"}}) {
    TORCH_CHECK(t->device() == latents.device(), kOp, ": ", name, " is on ", t->device(),
                " but latents is on ", latents.device(), "; all tensors must share one device");
  }
}

void check_fork_index_output(const at::Tensor& latents, const at::Tensor& out,
                             c10::DeviceType device_type) {
  TORCH_CHECK(out.device().type() == device_type, kOp, ": expected tensors on ", device_type,
              ", got ", out.device());
  TORCH_CHECK(out.is_contiguous(), kOp, ": out must be contiguous (it is written in place)");
  // TooHard: a view that is not dense (an expanded latents); refuse it when it shares storage.
  const at::MemOverlapStatus overlap = at::get_overlap_status(out, latents);
  TORCH_CHECK(overlap == at::MemOverlapStatus::No ||
                  (overlap == at::MemOverlapStatus::TooHard &&
                   !out.storage().is_alias_of(latents.storage())),
              kOp, ": out must not overlap latents (rows still to be read would be overwritten); "
              "write into another buffer");
}

void fork_index_out_cpu(const at::Tensor& latents, const at::Tensor& index,
                        const at::Tensor& out) {
  check_fork_index_args(latents, index, out);
  check_fork_index_output(latents, out, c10::DeviceType::CPU);
  const at::Tensor idx = index.contiguous();
  const int64_t* rows = idx.const_data_ptr<int64_t>();
  const int64_t trunks = latents.size(0), count = idx.numel();
  for (int64_t i = 0; i < count; ++i) {  // all values first: a bad index writes nothing
    TORCH_CHECK(rows[i] >= 0 && rows[i] < trunks, kOp, ": index[", i, "] = ", rows[i],
                " is out of range; allowed: 0 <= index < latents.size(0) (", trunks, ")");
  }
  const at::Tensor src = latents.contiguous();
  const int64_t row_size = count > 0 ? out.numel() / count : 0;

  const int64_t grain = std::max<int64_t>(1, kCpuBlock / std::max<int64_t>(row_size, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fork_in", [&] {
    using in_t = scalar_t;
    const in_t* in = src.const_data_ptr<in_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fork_out", [&] {
      scalar_t* dst = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const in_t* from = in + rows[i] * row_size;
          scalar_t* to = dst + i * row_size;
          for (int64_t j = 0; j < row_size; ++j) to[j] = c10::convert<scalar_t>(from[j]);
        }
      });
    });
  });
}

void fork_index_out_meta(const at::Tensor& latents, const at::Tensor& index,
                         const at::Tensor& out) {
  check_fork_index_args(latents, index, out);
}

}  // namespace b2fast

TORCH_LIBRARY_FRAGMENT(b2fast, m) {
  m.def(b2fast::kForkIndexSchema, {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(b2fast, CPU, m) {
  m.impl("fork_index_out", &b2fast::fork_index_out_cpu);
}

TORCH_LIBRARY_IMPL(b2fast, Meta, m) {
  m.impl("fork_index_out", &b2fast::fork_index_out_meta);
}
