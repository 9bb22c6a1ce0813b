// CUDA soft histograms of histogram AP (FastAP, SoftBin). The per-score arithmetic is
// soft_bin() from ../histogram.h, shared with (and tested through) the CPU kernel.
// One block per query: each thread bins a strided share of the row into a private
// histogram, then the block reduces bin by bin in a fixed order — no atomics, so the
// result is deterministic. Backward: one thread per (query, item), plus one pass over
// the positives (unique columns per row: one writer per element).
#include <cuda_runtime.h>

#include "../histogram.h"
#include "common.cuh"
#include "histogram_cuda.h"

namespace fastrank {
namespace cuda {

constexpr int kHistThreads = 128;

// The private histograms ha, hp live in local memory (dynamically indexed), which is cached in L1.
template <typename T>
__global__ void __launch_bounds__(kHistThreads)
    histogram_forward_kernel(const T* __restrict__ scores, const int64_t* __restrict__ pos_idx,
                             const int64_t* __restrict__ ign_idx, const bool* __restrict__ ign_mask, int64_t N,
                             int64_t P, int64_t L, T scale, T shift, bool open_ends, T* __restrict__ h_all,
                             T* __restrict__ h_pos) {
  __shared__ T smem[kHistThreads / 32];
  __shared__ int nan_seen;
  const int64_t i = blockIdx.x;
  const T* s = scores + i * N;
  const int64_t ign = ign_idx != nullptr ? ign_idx[i] : -1;
  T ha[kMaxHistBins], hp[kMaxHistBins];
  for (int64_t l = 0; l < L; ++l) ha[l] = hp[l] = T(0);
  if (threadIdx.x == 0) nan_seen = 0;
  __syncthreads();
  bool nan_here = false;
  for (int64_t k = threadIdx.x; k < N; k += kHistThreads) {
    if (!is_valid(i, k, N, ign, ign_mask)) continue;
    const T v = scale * s[k] + shift;
    if (v != v) {
      nan_here = true;
      continue;
    }
    add_bin(ha, L, soft_bin(v, L, open_ends));
  }
  for (int64_t q = threadIdx.x; q < P; q += kHistThreads) {
    const int64_t k = pos_idx[i * P + q];
    if (k < 0) continue;
    const T v = scale * s[k] + shift;
    if (v != v) continue;
    add_bin(hp, L, soft_bin(v, L, open_ends));
  }
  if (nan_here) nan_seen = 1;  // benign race: every writer stores 1
  for (int64_t l = 0; l < L; ++l) {
    const T a = block_sum<kHistThreads>(ha[l], smem);
    const T p = block_sum<kHistThreads>(hp[l], smem);
    if (threadIdx.x == 0) {
      h_all[i * L + l] = a;
      h_pos[i * L + l] = p;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && nan_seen) {
    const T nan = T(0) / T(0);
    for (int64_t l = 0; l < L; ++l) h_all[i * L + l] = h_pos[i * L + l] = nan;
  }
}

template <typename T>
__global__ void histogram_backward_items(const T* __restrict__ g_all, const T* __restrict__ scores,
                                         const int64_t* __restrict__ ign_idx, const bool* __restrict__ ign_mask,
                                         int64_t N, int64_t L, T scale, T shift, bool open_ends, T* __restrict__ grad) {
  const int64_t i = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (k >= N) return;
  const int64_t ign = ign_idx != nullptr ? ign_idx[i] : -1;
  if (!is_valid(i, k, N, ign, ign_mask)) {
    grad[i * N + k] = T(0);
    return;
  }
  const T v = scale * scores[i * N + k] + shift;
  grad[i * N + k] = v != v ? v : scale * bin_grad(g_all + i * L, L, soft_bin(v, L, open_ends));
}

template <typename T>
__global__ void histogram_backward_positives(const T* __restrict__ g_pos, const T* __restrict__ scores,
                                             const int64_t* __restrict__ pos_idx, int64_t N, int64_t P, int64_t L,
                                             T scale, T shift, bool open_ends, T* __restrict__ grad) {
  const int64_t i = blockIdx.x;
  const int64_t q = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (q >= P) return;
  const int64_t k = pos_idx[i * P + q];
  if (k < 0) return;
  const T v = scale * scores[i * N + k] + shift;
  if (v != v) return;
  grad[i * N + k] += scale * bin_grad(g_pos + i * L, L, soft_bin(v, L, open_ends));
}

template <typename T>
cudaError_t histogram_forward(const ProblemView<T>& pr, int64_t L, T scale, T shift, bool open_ends, T* h_all,
                              T* h_pos, cudaStream_t stream) {
  const int64_t Q = pr.Q;
  if (Q == 0) return cudaSuccess;
  if (L > kMaxHistBins || Q > 2147483647LL) return cudaErrorInvalidValue;
  histogram_forward_kernel<T><<<static_cast<unsigned>(Q), kHistThreads, 0, stream>>>(
      pr.scores, pr.pos_idx, pr.ign_idx, pr.ign_mask, pr.N, pr.P, L, scale, shift, open_ends, h_all, h_pos);
  return cudaGetLastError();
}

template <typename T>
cudaError_t histogram_backward(const T* g_all, const T* g_pos, const ProblemView<T>& pr, int64_t L, T scale,
                               T shift, bool open_ends, T* grad, cudaStream_t stream) {
  const T* scores = pr.scores;
  const int64_t Q = pr.Q, N = pr.N, P = pr.P;
  if (Q == 0 || N == 0) return cudaSuccess;
  const int64_t per = 256;
  const int64_t nb = (N + per - 1) / per, pb = (P + per - 1) / per;
  if (Q > 2147483647LL || nb > 65535 || pb > 65535) return cudaErrorInvalidConfiguration;
  histogram_backward_items<T><<<dim3(static_cast<unsigned>(Q), static_cast<unsigned>(nb)), per, 0, stream>>>(
      g_all, scores, pr.ign_idx, pr.ign_mask, N, L, scale, shift, open_ends, grad);
  if (P > 0) {
    histogram_backward_positives<T><<<dim3(static_cast<unsigned>(Q), static_cast<unsigned>(pb)), per, 0, stream>>>(
        g_pos, scores, pr.pos_idx, N, P, L, scale, shift, open_ends, grad);
  }
  return cudaGetLastError();
}

#define FR_INSTANTIATE(T)                                                                                      \
  template cudaError_t histogram_forward<T>(const ProblemView<T>&, int64_t, T, T, bool, T*, T*, cudaStream_t);  \
  template cudaError_t histogram_backward<T>(const T*, const T*, const ProblemView<T>&, int64_t, T, T, bool, T*, \
                                             cudaStream_t);
FR_INSTANTIATE(float)
FR_INSTANTIATE(double)
#undef FR_INSTANTIATE

}  // namespace cuda
}  // namespace fastrank
