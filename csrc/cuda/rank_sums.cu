// CUDA kernels of the rank-sums primitive (docs/design.md §1.1). No torch headers: the
// glue lives in rank_sums_op.cpp. Step arithmetic comes from ../step.h, shared with
// the CPU kernel (the CPU tests exercise it); the loop structure below is GPU-only.
//
// The kernels never see labels or a dense positive mask, only pos_idx (the
// columns of each query's ranked positives). Instead of telling positives from
// negatives inside the sweep, they sweep all valid competitors with the
// negatives' step g and then correct over the positives:
//   sigmoid: g = h = sigma, rank_all = 1/2 + sum_valid sigma, rank_pos = 1/2 + sum_P sigma
//            (the sums include j itself, sigma(0) = 1/2)
//   suprank: rank_all = sum_valid H^- + sum_P (H - H^-), rank_pos = sum_P H
//            (j itself contributes H^-(0) + H(0) - H^-(0) = 1)
// Backward (no atomics, fixed reduction order, hence deterministic):
//   column kernel:  grad[i,k]  = sum_j a_j g'(d_jk)                for valid k
//   row kernel:     tot[i,j]   = sum_k a_j g'(d_jk) + correction    (forward-shaped)
//   pos kernel:     grad[i,k] += sum_j corr_jk - tot[i,k]           for positive k (unique per row)
// with corr = b_j sigma' (sigmoid) or -a_j H^-' (suprank: positives get H, no gradient).
#include <cuda_runtime.h>

#include "../step.h"
#include "common.cuh"
#include "rank_sums_cuda.h"

namespace fastrank {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kTileP = 4;  // ranked positives per block in the row-shaped kernels

template <typename T, int STEP>
__device__ __forceinline__ T step_neg(T d, const StepParams<T>& p) {
  return STEP == kSigmoid ? sigmoid_tau(d, p.inv_tau) : suprank_neg(d, p);
}

template <typename T, int STEP>
__device__ __forceinline__ T step_neg_grad(T d, const StepParams<T>& p) {
  return STEP == kSigmoid ? sigmoid_tau_grad(d, p.inv_tau) : suprank_neg_grad(d, p);
}

// MODE 0: forward (rank_all, rank_pos). MODE 1: backward row sums tot[i,j] into out0.
template <typename T, int STEP, int MODE>
__global__ void __launch_bounds__(kThreads)
    row_kernel(const T* __restrict__ scores, const int64_t* __restrict__ pos_idx, const int64_t* __restrict__ ign_idx,
               const bool* __restrict__ ign_mask, const T* __restrict__ grad_all, const T* __restrict__ grad_pos,
               int64_t N, int64_t P, StepParams<T> prm, T* __restrict__ out0, T* __restrict__ out1) {
  __shared__ T smem[kThreads / 32];
  const int64_t i = blockIdx.x;  // 64-bit from here on: i * N exceeds 2^31 at Q = N = 46341
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * kTileP;
  const T* s = scores + i * N;
  const int64_t* pidx = pos_idx + i * P;
  const int64_t ign = ign_idx != nullptr ? ign_idx[i] : -1;

  // suprank forward: H^- = +inf terms (d = +inf, or an overflowing line) counted apart in
  // ninf, so that the correction takes back a positive's +inf without inf - inf
  T sj[kTileP], a[kTileP], b[kTileP], acc0[kTileP], acc1[kTileP], ninf[kTileP];
  bool has[kTileP];
  bool ties = false;
#pragma unroll
  for (int t = 0; t < kTileP; ++t) {
    const int64_t p = p0 + t;
    const int64_t j = p < P ? pidx[p] : -1;
    has[t] = j >= 0;
    sj[t] = has[t] ? s[j] : T(0);
    a[t] = (MODE == 1 && has[t]) ? grad_all[i * P + p] : T(0);
    b[t] = (MODE == 1 && has[t]) ? grad_pos[i * P + p] : T(0);
    acc0[t] = acc1[t] = ninf[t] = T(0);
    ties |= isinf(sj[t]);
  }
  // sweep every valid competitor with the negatives' step
  for (int64_t k = threadIdx.x; k < N; k += kThreads) {
    if (!is_valid(i, k, N, ign, ign_mask)) continue;
    const T sk = s[k];
#pragma unroll
    for (int t = 0; t < kTileP; ++t) {
      const T d = sk - sj[t];
      if (MODE == 0) {
        const T g = step_neg<T, STEP>(ties ? step_diff(sk, sj[t]) : d, prm);
        if (STEP == kSupRank && isinf(g))
          ninf[t] += T(1);
        else
          acc0[t] += g;
      } else {
        const T g = step_neg_grad<T, STEP>(d, prm);
        acc0[t] += a[t] * (ties ? tied_grad(d, g) : g);
      }
    }
  }
  // correction over the positives (all valid by construction)
  for (int64_t q = threadIdx.x; q < P; q += kThreads) {
    const int64_t k = pidx[q];
    if (k < 0) continue;
    const T sk = s[k];
#pragma unroll
    for (int t = 0; t < kTileP; ++t) {
      const T draw = sk - sj[t];
      if (MODE == 0) {
        const T d = ties ? step_diff(sk, sj[t]) : draw;
        if (STEP == kSigmoid) {
          acc1[t] += sigmoid_tau(d, prm.inv_tau);
        } else {
          const T h = heaviside(d);
          const T hneg = suprank_neg(d, prm);
          acc1[t] += h;
          if (isinf(hneg)) {
            ninf[t] -= T(1);
            acc0[t] += h;
          } else {
            acc0[t] += h - hneg;
          }
        }
      } else {
        const T g = STEP == kSigmoid ? sigmoid_tau_grad(draw, prm.inv_tau) : suprank_neg_grad(draw, prm);
        const T gt = ties ? tied_grad(draw, g) : g;
        if (STEP == kSigmoid)
          acc0[t] += b[t] * gt;
        else
          acc0[t] -= a[t] * gt;
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kTileP; ++t) {
    const T r0 = block_sum<kThreads>(acc0[t], smem);
    const T r1 = MODE == 0 ? block_sum<kThreads>(acc1[t], smem) : T(0);
    const T n_inf = MODE == 0 && STEP == kSupRank ? block_sum<kThreads>(ninf[t], smem) : T(0);
    if (threadIdx.x == 0 && has[t]) {
      const int64_t o = i * P + p0 + t;
      if (MODE == 0) {
        const T self = STEP == kSigmoid ? T(0.5) : T(0);
        out0[o] = n_inf > T(0) ? T(INFINITY) : r0 + self;
        out1[o] = r1 + self;
      } else {
        out0[o] = r0;
      }
    }
  }
}

// grad[i,k] = sum_j a_j g'(s_ik - s_ij) for valid k (0 for ignored k): one thread per competitor,
// the row's positives staged through shared memory.
template <typename T, int STEP>
__global__ void __launch_bounds__(kThreads)
    column_kernel(const T* __restrict__ scores, const int64_t* __restrict__ pos_idx,
                  const int64_t* __restrict__ ign_idx, const bool* __restrict__ ign_mask,
                  const T* __restrict__ grad_all, int64_t N, int64_t P, StepParams<T> prm, T* __restrict__ grad) {
  __shared__ T s_sj[kThreads];
  __shared__ T s_a[kThreads];
  const int64_t i = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const T* s = scores + i * N;
  const int64_t* pidx = pos_idx + i * P;
  const int64_t ign = ign_idx != nullptr ? ign_idx[i] : -1;
  const bool active = k < N && is_valid(i, k, N, ign, ign_mask);
  const T sk = k < N ? s[k] : T(0);
  const bool ties = isinf(sk);  // only an infinite competitor can tie with a ranked item at inf
  T acc = T(0);
  for (int64_t p0 = 0; p0 < P; p0 += kThreads) {
    const int64_t p = p0 + threadIdx.x;
    const int64_t j = p < P ? pidx[p] : -1;
    s_sj[threadIdx.x] = j >= 0 ? s[j] : T(0);
    s_a[threadIdx.x] = j >= 0 ? grad_all[i * P + p] : T(0);  // holes: a = 0
    __syncthreads();
    const int64_t n = P - p0 < kThreads ? P - p0 : kThreads;
    if (active) {
      for (int64_t t = 0; t < n; ++t) {
        const T d = sk - s_sj[t];
        const T g = step_neg_grad<T, STEP>(d, prm);
        acc += s_a[t] * (ties ? tied_grad(d, g) : g);
      }
    }
    __syncthreads();
  }
  if (k < N) grad[i * N + k] = active ? acc : T(0);
}

// For each positive k = pos_idx[i,q]: grad[i,k] += sum_j corr_jk - tot[i,q]. Columns are unique
// within a row, so each element has exactly one writer.
template <typename T, int STEP>
__global__ void __launch_bounds__(kThreads)
    positive_kernel(const T* __restrict__ scores, const int64_t* __restrict__ pos_idx,
                    const T* __restrict__ grad_all, const T* __restrict__ grad_pos, const T* __restrict__ tot,
                    int64_t N, int64_t P, StepParams<T> prm, T* __restrict__ grad) {
  const int64_t i = blockIdx.x;
  const int64_t q = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (q >= P) return;
  const int64_t* pidx = pos_idx + i * P;
  const int64_t k = pidx[q];
  if (k < 0) return;
  const T* s = scores + i * N;
  const T sk = s[k];
  const bool ties = isinf(sk);
  T acc = T(0);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t j = pidx[p];
    if (j < 0) continue;
    const T d = sk - s[j];
    const T g = STEP == kSigmoid ? sigmoid_tau_grad(d, prm.inv_tau) : suprank_neg_grad(d, prm);
    const T gt = ties ? tied_grad(d, g) : g;
    if (STEP == kSigmoid)
      acc += grad_pos[i * P + p] * gt;
    else
      acc -= grad_all[i * P + p] * gt;
  }
  grad[i * N + k] += acc - tot[i * P + q];
}

template <typename T>
cudaError_t rank_sums_forward(const ProblemView<T>& pr, int step, StepParams<T> prm, T* rank_all, T* rank_pos,
                              cudaStream_t stream) {
  const int64_t Q = pr.Q, N = pr.N, P = pr.P;
  if (Q == 0 || P == 0) return cudaSuccess;
  if (Q > 2147483647LL || blocks_for(P, kTileP) > 65535u) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(Q), blocks_for(P, kTileP));
  dispatch_step(step, [&](auto kind) {
    row_kernel<T, decltype(kind)::value, 0><<<grid, kThreads, 0, stream>>>(
        pr.scores, pr.pos_idx, pr.ign_idx, pr.ign_mask, nullptr, nullptr, N, P, prm, rank_all, rank_pos);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t rank_sums_backward(const T* grad_all, const T* grad_pos, const ProblemView<T>& pr, int step,
                               StepParams<T> prm, T* grad, T* work, cudaStream_t stream) {
  const int64_t Q = pr.Q, N = pr.N, P = pr.P;
  if (Q == 0 || N == 0) return cudaSuccess;
  if (Q > 2147483647LL || blocks_for(N, kThreads) > 65535u || blocks_for(P, kTileP) > 65535u)
    return cudaErrorInvalidConfiguration;
  const dim3 gcol(static_cast<unsigned>(Q), blocks_for(N, kThreads));
  const dim3 grow(static_cast<unsigned>(Q), blocks_for(P > 0 ? P : 1, kTileP));
  const dim3 gpos(static_cast<unsigned>(Q), blocks_for(P > 0 ? P : 1, kThreads));
  dispatch_step(step, [&](auto kind) {
    constexpr int STEP = decltype(kind)::value;
    column_kernel<T, STEP><<<gcol, kThreads, 0, stream>>>(pr.scores, pr.pos_idx, pr.ign_idx, pr.ign_mask, grad_all, N,
                                                           P, prm, grad);
    if (P > 0) {
      row_kernel<T, STEP, 1><<<grow, kThreads, 0, stream>>>(pr.scores, pr.pos_idx, pr.ign_idx, pr.ign_mask, grad_all,
                                                             grad_pos, N, P, prm, work, nullptr);
      positive_kernel<T, STEP><<<gpos, kThreads, 0, stream>>>(pr.scores, pr.pos_idx, grad_all, grad_pos, work, N, P,
                                                               prm, grad);
    }
  });
  return cudaGetLastError();
}

template cudaError_t rank_sums_forward<float>(const ProblemView<float>&, int, StepParams<float>, float*, float*,
                                              cudaStream_t);
template cudaError_t rank_sums_forward<double>(const ProblemView<double>&, int, StepParams<double>, double*, double*,
                                               cudaStream_t);
template cudaError_t rank_sums_backward<float>(const float*, const float*, const ProblemView<float>&, int,
                                               StepParams<float>, float*, float*, cudaStream_t);
template cudaError_t rank_sums_backward<double>(const double*, const double*, const ProblemView<double>&, int,
                                                StepParams<double>, double*, double*, cudaStream_t);

}  // namespace cuda
}  // namespace fastrank
