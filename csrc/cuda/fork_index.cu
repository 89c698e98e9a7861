// CUDA kernel of the fork by index (spec: b2fast.reference.fork_index; CPU twin:
// csrc/fork_index.cpp).  One block per (output row, chunk) (common.cuh): each thread reads
// index[i] (never on the host), then its group of latents[index[i]], and writes it cast to
// out.dtype into out[i].  An index outside [0, P) fires a device-side assert.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../fork_index.h"
#include "common.cuh"

namespace b2fast {
namespace {

using namespace b2fast::cuda;

template <typename acc_t, bool kVector>
__global__ void __launch_bounds__(kThreads)
    fork_index_kernel(InPtr latents, int64_t trunks, const int64_t* index, int64_t row_size,
                      int64_t chunks, OutPtr out) {
  const Group g = thread_group(row_size, chunks);  // g.sample is the output row i
  if (g.n <= 0) return;
  const int64_t row = index[g.sample];
  CUDA_KERNEL_ASSERT(row >= 0 && row < trunks && "fork_index: index out of range of latents");
  const int64_t offset = g.first - g.sample * row_size;  // within the row
  acc_t v[kGroup];
  load_group<kVector>(latents, row * row_size + offset, g.n, v);
  store_group<kVector>(out, g.first, g.n, v);
}

}  // namespace

void fork_index_out_cuda(const at::Tensor& latents, const at::Tensor& index,
                         const at::Tensor& out) {
  check_fork_index_args(latents, index, out);
  check_fork_index_output(latents, out, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(latents.device());
  const at::Tensor src = latents.contiguous();
  const at::Tensor idx = index.contiguous();
  const int64_t count = idx.numel();
  const int64_t row_size = count > 0 ? out.numel() / count : 0;
  const int64_t chunks = num_chunks(row_size);
  const unsigned int blocks = grid_blocks(count, chunks);
  if (blocks == 0) return;
  const bool vector = can_vectorize(row_size, {&src, &out});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Read in double when either side is fp64, so every cast is the one Tensor.to does.
  const bool fp64 = src.scalar_type() == at::kDouble || out.scalar_type() == at::kDouble;
  const auto kernel = fp64 ? (vector ? fork_index_kernel<double, true>
                                     : fork_index_kernel<double, false>)
                           : (vector ? fork_index_kernel<float, true>
                                     : fork_index_kernel<float, false>);
  kernel<<<blocks, kThreads, 0, stream>>>(in_ptr(src), src.size(0),
                                          idx.const_data_ptr<int64_t>(), row_size, chunks,
                                          out_ptr(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace b2fast

TORCH_LIBRARY_IMPL(b2fast, CUDA, m) {
  m.impl("fork_index_out", &b2fast::fork_index_out_cuda);
}
