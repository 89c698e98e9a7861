// Fixed-block parallel loops of the CPU kernels, with deterministic per-sample reductions.
//
// A sample's D elements are cut into blocks of kCpuBlock; the partition depends only on D,
// never on the batch size or the thread count, and block sums are added in block order in
// double, so a sample's log p is bitwise the same whatever batch or machine computes it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>

namespace b2fast {

// Elements per block.
constexpr int64_t kCpuBlock = 4096;

inline int64_t cpu_blocks(int64_t per_sample) { return (per_sample + kCpuBlock - 1) / kCpuBlock; }

// Calls fn(job, b, lo, hi) for every block [lo, hi) of every sample b < batch, in parallel;
// job = b · blocks + block.  Grain 1: a block is already kCpuBlock elements of work.
template <typename F>
void parallel_sample_blocks(int64_t batch, int64_t per_sample, const F& fn) {
  const int64_t blocks = cpu_blocks(per_sample);
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / blocks;
      const int64_t lo = (job % blocks) * kCpuBlock;
      fn(job, b, lo, std::min(per_sample, lo + kCpuBlock));
    }
  });
}

// out[b] = Σ over blocks of block_sum(b, lo, hi) (a double), divided by D when reduce_mean,
// rounded to acc_t.  block_sum runs in parallel; the block sums are added in block order.
template <typename acc_t, typename F>
void reduce_per_sample(int64_t batch, int64_t per_sample, bool reduce_mean, acc_t* out,
                       const F& block_sum) {
  const int64_t blocks = cpu_blocks(per_sample);
  std::vector<double> partial(static_cast<size_t>(batch * blocks));
  parallel_sample_blocks(batch, per_sample, [&](int64_t job, int64_t b, int64_t lo, int64_t hi) {
    partial[job] = block_sum(b, lo, hi);
  });
  for (int64_t b = 0; b < batch; ++b) {
    double total = 0.0;
    for (int64_t j = 0; j < blocks; ++j) total += partial[b * blocks + j];
    out[b] = static_cast<acc_t>(reduce_mean ? total / static_cast<double>(per_sample) : total);
  }
}

}  // namespace b2fast
