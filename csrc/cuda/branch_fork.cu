// CUDA kernel of the branch fork (spec: b2fast.reference.branch_fork; CPU twin:
// csrc/branch_fork.cpp).  One block per (trunk, chunk) (common.cuh): each thread reads its
// group of latents[g] once and writes it, cast to out.dtype, into the K branch rows
// out[g·K + k]; the first chunk's block of trunk g also writes group_ids[g·K + k] = g.
#include <algorithm>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../branch_fork.h"
#include "../ddim_common.h"
#include "common.cuh"

namespace b2fast {
namespace {

using namespace b2fast::cuda;

template <typename acc_t, bool kVector>
__global__ void __launch_bounds__(kThreads)
    branch_fork_kernel(InPtr latents, int64_t row_size, int64_t chunks, int64_t branches,
                       OutPtr out, int64_t* group_ids) {
  const Group g = thread_group(row_size, chunks);
  if (blockIdx.x % chunks == 0) {
    for (int64_t k = threadIdx.x; k < branches; k += kThreads) {
      group_ids[g.sample * branches + k] = g.sample;
    }
  }
  if (g.n <= 0) return;
  acc_t v[kGroup];
  load_group<kVector>(latents, g.first, g.n, v);
  const int64_t offset = g.first - g.sample * row_size;  // within the row
  for (int64_t k = 0; k < branches; ++k) {
    // Rounding to out.dtype is idempotent, so v (replaced by the stored values) stays valid.
    store_group<kVector>(out, (g.sample * branches + k) * row_size + offset, g.n, v);
  }
}

}  // namespace

void branch_fork_out_cuda(const at::Tensor& latents, int64_t branches, const at::Tensor& out,
                          const at::Tensor& group_ids) {
  check_branch_fork_args(latents, branches, out, group_ids);
  check_branch_fork_outputs(out, group_ids, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(latents.device());
  const at::Tensor src = latents.contiguous();
  const int64_t row_size = elements_per_sample(src);
  // At least one chunk, so empty rows still get their group ids.
  const int64_t chunks = std::max<int64_t>(1, num_chunks(row_size));
  const unsigned int blocks = grid_blocks(src.size(0), chunks);
  if (blocks == 0) return;
  const bool vector = can_vectorize(row_size, {&src, &out});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Read in double when either side is fp64, so every cast is the one Tensor.to does.
  const bool fp64 = src.scalar_type() == at::kDouble || out.scalar_type() == at::kDouble;
  const auto kernel = fp64 ? (vector ? branch_fork_kernel<double, true>
                                    : branch_fork_kernel<double, false>)
                           : (vector ? branch_fork_kernel<float, true>
                                     : branch_fork_kernel<float, false>);
  kernel<<<blocks, kThreads, 0, stream>>>(in_ptr(src), row_size, chunks, branches,
                                          out_ptr(out), group_ids.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace b2fast

TORCH_LIBRARY_IMPL(b2fast, CUDA, m) {
  m.impl("branch_fork_out", &b2fast::branch_fork_out_cuda);
}
