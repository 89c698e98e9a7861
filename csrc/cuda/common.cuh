// Building blocks of the CUDA kernels (csrc/cuda/*.cu).
//
// Layout: a sample of D elements is cut into chunks of kChunk = kThreads · kGroup elements, one
// thread block per (sample, chunk), and thread t handles the kGroup consecutive elements
// [t·kGroup, t·kGroup + kGroup) of its chunk.  The partition depends only on D, never on the
// batch size, so per-sample reductions are bitwise reproducible whatever batch holds a sample.
//
// Tensors are passed with their dtype as a run-time value (InPtr/OutPtr) and widened to the
// compute dtype on load, so one kernel serves every mix of fp32/fp64/fp16/bf16 inputs without a
// conversion pass.  A group is loaded with one vector access when every pointer is aligned and
// D is a multiple of kGroup (kVector = true), else element by element; both paths give each
// thread the same elements, so their results are bitwise equal.
#pragma once

#include <cstdint>
#include <initializer_list>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/TypeCast.h>

#include "../ddim_math.h"

namespace b2fast::cuda {

constexpr int kThreads = 256;                  // threads per block
constexpr int kGroup = 4;                      // consecutive elements per thread
constexpr int64_t kChunk = kThreads * kGroup;  // elements per block

// Chunks of one sample of `per_sample` elements.
inline int64_t num_chunks(int64_t per_sample) { return (per_sample + kChunk - 1) / kChunk; }

// A tensor's data and dtype (fp32, fp64, fp16 or bf16), read widened to the compute dtype.
struct InPtr {
  const void* data;
  c10::ScalarType dtype;
};
struct OutPtr {
  void* data;
  c10::ScalarType dtype;
};

// An undefined tensor (an absent eps_uncond) gives data = nullptr.
inline InPtr in_ptr(const at::Tensor& t) {
  if (!t.defined()) return {nullptr, c10::ScalarType::Float};
  return {t.const_data_ptr(), t.scalar_type()};
}
inline OutPtr out_ptr(const at::Tensor& t) { return {t.mutable_data_ptr(), t.scalar_type()}; }

// Whether the vector path applies: D a multiple of kGroup and every tensor's data aligned to a
// group of its elements (undefined tensors are skipped).
inline bool can_vectorize(int64_t per_sample, std::initializer_list<const at::Tensor*> tensors) {
  if (per_sample % kGroup != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (!t->defined()) continue;
    const auto address = reinterpret_cast<uintptr_t>(t->const_data_ptr());
    if (address % (kGroup * t->element_size()) != 0) return false;
  }
  return true;
}

// kGroup elements aligned as one vector access (16 bytes for fp32, 8 for fp16/bf16).
template <typename T>
struct alignas(sizeof(T) * kGroup) Pack {
  T v[kGroup];
};

// The group at element i of a T tensor, widened to acc_t; n < kGroup elements in the scalar
// path at a chunk's end (the rest read as 0).
template <typename T, bool kVector, typename acc_t>
__device__ inline void load_as(const void* data, int64_t i, int n, acc_t (&v)[kGroup]) {
  const T* p = static_cast<const T*>(data) + i;
  if constexpr (kVector) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(p);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[k] = static_cast<acc_t>(pack.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[k] = k < n ? static_cast<acc_t>(p[k]) : acc_t(0);
  }
}

template <bool kVector, typename acc_t>
__device__ inline void load_group(InPtr t, int64_t i, int n, acc_t (&v)[kGroup]) {
  switch (t.dtype) {
    case c10::ScalarType::Double: return load_as<double, kVector>(t.data, i, n, v);
    case c10::ScalarType::Half: return load_as<c10::Half, kVector>(t.data, i, n, v);
    case c10::ScalarType::BFloat16: return load_as<c10::BFloat16, kVector>(t.data, i, n, v);
    default: return load_as<float, kVector>(t.data, i, n, v);
  }
}

// One element, widened to acc_t.
template <typename acc_t>
__device__ inline acc_t load_one(InPtr t, int64_t i) {
  acc_t v[kGroup];
  load_group<false>(t, i, 1, v);
  return v[0];
}

// One aligned vector store of a group.  Through the __stwb intrinsic (an ordinary write-back
// store): a plain vector or struct store is split into element stores by the compiler when the
// index comes from thread_group.
__device__ inline void store_vector(float* p, const float (&v)[kGroup]) {
  __stwb(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
}
__device__ inline void store_vector(double* p, const double (&v)[kGroup]) {
  __stwb(reinterpret_cast<double2*>(p), make_double2(v[0], v[1]));
  __stwb(reinterpret_cast<double2*>(p) + 1, make_double2(v[2], v[3]));
}
template <typename T>  // c10::Half, c10::BFloat16: 16-bit payloads in .x, paired little-endian
__device__ inline void store_vector(T* p, const T (&v)[kGroup]) {
  __stwb(reinterpret_cast<uint2*>(p),
         make_uint2(v[0].x | (static_cast<uint32_t>(v[1].x) << 16),
                    v[2].x | (static_cast<uint32_t>(v[3].x) << 16)));
}

// Stores the group at element i of a T tensor, rounding each value as Tensor.to does, and
// replaces v by the stored values (what a later read of the tensor gives).
template <typename T, bool kVector, typename acc_t>
__device__ inline void store_as(void* data, int64_t i, int n, acc_t (&v)[kGroup]) {
  T* p = static_cast<T*>(data) + i;
  T out[kGroup];
#pragma unroll
  for (int k = 0; k < kGroup; ++k) {
    out[k] = c10::convert<T>(v[k]);
    v[k] = static_cast<acc_t>(out[k]);
  }
  if constexpr (kVector) {
    store_vector(p, out);
  } else {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      if (k < n) p[k] = out[k];
    }
  }
}

template <bool kVector, typename acc_t>
__device__ inline void store_group(OutPtr t, int64_t i, int n, acc_t (&v)[kGroup]) {
  switch (t.dtype) {
    case c10::ScalarType::Double: return store_as<double, kVector>(t.data, i, n, v);
    case c10::ScalarType::Half: return store_as<c10::Half, kVector>(t.data, i, n, v);
    case c10::ScalarType::BFloat16: return store_as<c10::BFloat16, kVector>(t.data, i, n, v);
    default: return store_as<float, kVector>(t.data, i, n, v);
  }
}

// The group of thread threadIdx.x in block blockIdx.x = sample · chunks + chunk:
// elements [first, first + n) of the flat tensor, n <= 0 when the thread has none.
struct Group {
  int64_t sample;
  int64_t first;
  int n;
};

__device__ inline Group thread_group(int64_t per_sample, int64_t chunks) {
  const int64_t sample = blockIdx.x / chunks;
  const int64_t offset = (blockIdx.x % chunks) * kChunk + threadIdx.x * kGroup;
  const int64_t left = per_sample - offset;
  return {sample, sample * per_sample + offset,
          static_cast<int>(left < kGroup ? (left > 0 ? left : 0) : kGroup)};
}

// The schedule row of `sample`; its step index is checked on the device (no host sync).
template <typename acc_t>
__device__ inline StepCoefs<acc_t> step_coefs(const acc_t* table, int64_t num_steps,
                                              const int64_t* step_index, int64_t sample) {
  const int64_t step = step_index[sample];
  CUDA_KERNEL_ASSERT(step >= 0 && step < num_steps && "step_index out of range of the table");
  return StepCoefs<acc_t>::load(table + step * kTableColumns);
}

// Sum of v over the block in a fixed order (warp shuffle trees, then the warp sums), so the
// result is reproducible; valid in thread 0.  Call once per kernel, by every thread.
template <typename T>
__device__ inline T block_sum(T v) {
  constexpr int kWarps = kThreads / 32;
  __shared__ T warp_sums[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = T(0);
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : T(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Blocks of the (sample, chunk) grid, checked against CUDA's limit on grid.x.
inline unsigned int grid_blocks(int64_t samples, int64_t chunks) {
  const int64_t blocks = samples * chunks;
  TORCH_CHECK(blocks <= INT32_MAX, "b2fast: ", samples, " samples of ", chunks,
              " chunks exceed the CUDA grid limit; split the batch");
  return static_cast<unsigned int>(blocks);
}

// ε̂ of the group: eps_cond, or ε_u + w·(ε_c − ε_u) when eps_uncond is given.
template <bool kVector, typename acc_t>
__device__ inline void load_eps(InPtr eps_uncond, InPtr eps_cond, acc_t w, const Group& g,
                                acc_t (&eps)[kGroup]) {
  load_group<kVector>(eps_cond, g.first, g.n, eps);
  if (eps_uncond.data == nullptr) return;
  acc_t u[kGroup];
  load_group<kVector>(eps_uncond, g.first, g.n, u);
#pragma unroll
  for (int k = 0; k < kGroup; ++k) eps[k] = cfg_combine(u[k], eps[k], w);
}

// Per-sample log p from the sum of its log-densities (in double): mean or sum, in acc_t.
template <typename acc_t>
__device__ inline acc_t finish_logprob(double sum, int64_t per_sample, bool reduce_mean) {
  return static_cast<acc_t>(reduce_mean ? sum / static_cast<double>(per_sample) : sum);
}

// Second pass of a multi-chunk reduction: log_prob[b] from the chunk sums of sample b, added in
// chunk order (no atomics).
template <typename acc_t>
__global__ void sum_chunks_kernel(const acc_t* partial, int64_t batch, int64_t chunks,
                                  int64_t per_sample, bool reduce_mean, acc_t* log_prob) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  double total = 0.0;
  for (int64_t j = 0; j < chunks; ++j) total += static_cast<double>(partial[b * chunks + j]);
  log_prob[b] = finish_logprob<acc_t>(total, per_sample, reduce_mean);
}

// Where a (sample, chunk) kernel puts its per-sample log-density sums.
template <typename acc_t>
struct LogprobOut {
  acc_t* log_prob;  // (B,): written by the kernel when a sample is one chunk
  acc_t* partial;   // (B · chunks,) chunk sums for the second pass, else nullptr
  int64_t per_sample;
  int64_t chunks;
  bool reduce_mean;

  // Called by every thread of the block with its own sum (in element order).
  __device__ void add_block(acc_t thread_sum) const {
    const acc_t sum = block_sum(thread_sum);
    if (threadIdx.x != 0) return;
    if (chunks == 1) {
      log_prob[blockIdx.x] = finish_logprob<acc_t>(sum, per_sample, reduce_mean);
    } else {
      partial[blockIdx.x] = sum;
    }
  }
};

// Computes log_prob (B,) in acc_t: launch(out, blocks) starts the (sample, chunk) kernel on
// `stream`, then a second pass adds the chunk sums when a sample spans several chunks (or
// none: D = 0 gives the reference's empty mean NaN, or sum 0).
template <typename acc_t, typename Launch>
void launch_logprob(const at::Tensor& log_prob, int64_t per_sample, bool reduce_mean,
                    cudaStream_t stream, const Launch& launch) {
  const int64_t batch = log_prob.size(0);
  const int64_t chunks = num_chunks(per_sample);
  if (batch == 0) return;
  const unsigned int blocks = grid_blocks(batch, chunks);
  const at::Tensor partial =
      chunks > 1 ? at::empty({batch * chunks}, log_prob.options()) : at::Tensor();
  const LogprobOut<acc_t> out{log_prob.mutable_data_ptr<acc_t>(),
                              partial.defined() ? partial.mutable_data_ptr<acc_t>() : nullptr,
                              per_sample, chunks, reduce_mean};
  if (blocks > 0) {
    launch(out, blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (chunks != 1) {
    constexpr int threads = 128;
    const auto grid = static_cast<unsigned int>((batch + threads - 1) / threads);
    sum_chunks_kernel<acc_t><<<grid, threads, 0, stream>>>(out.partial, batch, chunks,
                                                           per_sample, reduce_mean, out.log_prob);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace b2fast::cuda
