// Device helpers shared by the CUDA kernels (rank_sums.cu, graded_rank_sums.cu,
// histogram.cu, loss.cu, histogram_loss.cu, graded_loss.cu). No torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../problem.h"
#include "../step.h"

namespace fastrank {
namespace cuda {

// Column k of query i takes part: not the ignored index, not masked.
__device__ __forceinline__ bool is_valid(int64_t i, int64_t k, int64_t N, int64_t ign, const bool* ign_mask) {
  return k != ign && !(ign_mask != nullptr && ign_mask[i * N + k]);
}

// Column k of row i for the fused loss kernels, from the target as given (labels equal, or the
// dense positive mask): 0 = left out, 1 = valid negative, 2 = positive.
__device__ __forceinline__ int column_flag(int64_t i, int64_t k, int64_t N, int64_t ign, const bool* ign_mask,
                                           const TargetView& tg, int64_t label) {
  if (!is_valid(i, k, N, ign, ign_mask)) return 0;
  const bool pos = tg.pos_mask != nullptr ? tg.pos_mask[i * N + k] : tg.glab[k] == label;
  return pos ? 2 : 1;
}

// The query label of row i (0 with a dense target, where column_flag does not read it).
__device__ __forceinline__ int64_t row_label(const TargetView& tg, int64_t i) {
  return tg.qlab != nullptr ? tg.qlab[i] : 0;
}

// Blocks of `per` threads (or tiles) that cover n: a grid dimension of the launchers.
inline unsigned blocks_for(int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); }

// Sum of v over a block of THREADS threads, in a fixed order (warp shuffles, then the
// warps' partial sums in warp order): deterministic. The result is valid in thread 0.
// smem holds THREADS / 32 values; every thread of the block must call it.
template <int THREADS, typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T out = T(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < THREADS / 32; ++w) out += smem[w];
  }
  return out;
}

// v[m] summed over a block of THREADS threads for each m < M, in a fixed order (warp shuffles,
// then the warps in order); thread m < M returns the sum of v[m] (others: 0). red holds
// M * THREADS / 32 values; every thread of the block must call it.
template <int M, int THREADS, typename T>
__device__ __forceinline__ T block_sums(T (&v)[M], T* red) {
  constexpr int kW = THREADS / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < M; ++m)
    for (int off = 16; off > 0; off >>= 1) v[m] += __shfl_xor_sync(0xffffffffu, v[m], off);
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m) red[m * kW + warp] = v[m];
  }
  __syncthreads();
  T out = T(0);
  if (threadIdx.x < M) {
    for (int w = 0; w < kW; ++w) out += red[threadIdx.x * kW + w];
  }
  return out;
}

// The graded kernels' gradient term c_jk of one (ranked item j, valid competitor k) pair, given
// a = d L / d rank_all_j, b = d L / d rank_pos_j, the scores, relevances and ordering keys
// (graded_rank_sums.cu, graded_loss.cu; docs/design.md §1.2):
//   sigmoid: (a + b min(r_j, r_k)) sigma'(d)
//   suprank: a H^-'(d) for key_k < key_j; with the H-rank, b min(r_j, r_k) h+'(d) for key_k > key_j
// d = s_k - s_j; `ties` (an infinite score in play) takes step_diff / tied_grad for equal infinities.
template <typename T, int STEP>
__device__ __forceinline__ T graded_pair_grad(T sk, T sj, T rk, T rj, T kk, T kj, T a, T b, bool ties, bool hrank,
                                              const StepParams<T>& prm, const HRankParams<T>& hr) {
  const T draw = sk - sj;
  const T w = rj < rk ? rj : rk;  // relevance is finite where these kernels run
  if (STEP == kSigmoid) {
    const T g = sigmoid_tau_grad(draw, prm.inv_tau);
    return (a + b * w) * (ties ? tied_grad(draw, g) : g);
  }
  if (kk < kj) {
    const T g = suprank_neg_grad(draw, prm);
    return a * (ties ? tied_grad(draw, g) : g);
  }
  if (hrank && kk > kj) {
    const T g = hrank_plus_grad(ties ? step_diff(sk, sj) : draw, hr);
    return b * w * (ties ? tied_grad(draw, g) : g);
  }
  return T(0);
}

}  // namespace cuda
}  // namespace fastrank
