// What the fused CPU rank-sums kernels share about how they run: instruction-set
// multiversioning of the hot loops and the size of a parallel task.
#pragma once

#include <algorithm>
#include <cstdint>

// Build the hot loops for AVX-512, AVX2+FMA and baseline x86-64, picked at load
// time (glibc ifunc), so a wheel built anywhere runs at full width everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FR_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FR_MULTIVERSION
#endif

namespace fastrank {
namespace cpu {

// Query rows per at::parallel_for task: enough pair evaluations (P * N per row) per
// task to amortise scheduling, at least one row.
inline int64_t rows_per_task(int64_t P, int64_t N) {
  const int64_t work = std::max<int64_t>(1, P * N);
  return std::max<int64_t>(1, (int64_t(1) << 16) / work);
}

}  // namespace cpu
}  // namespace fastrank
