// CUDA kernels of the graded rank-sums primitive (docs/design.md §1.1, issue 9). No torch
// headers: the glue lives in graded_rank_sums_op.cpp. Step arithmetic comes from
// ../step.h, shared with the CPU kernels; the loop structure below is GPU-only and
// follows rank_sums.cu.
//
// For query i, ranked item j = pos_idx[i,p] and valid competitor k, d = s_ik - s_ij,
// w = min(rel_j, rel_k):
//   rank_all = 1     + sum_{k != j} g(d),   g = sigma (sigmoid); H if key_k >= key_j else H^- (suprank)
//   rank_pos = rel_j + sum_{k != j} w h(d), h = sigma (sigmoid); H (suprank), or with HAPPIER's
//              smoothed H-rank (hr.on) h+ for key_k > key_j (../step.h hrank_plus)
// The ordering key is the relevance unless the caller passes one (HAPPIER orders by the
// hierarchy level and weighs by a relevance computed from it).
// Unlike the binary kernels there is no split into positives and negatives: the
// relevance of k decides the step, so one sweep over every valid k does it all, j
// itself included (it is valid by construction). Its self term is removed in
// closed form: sigma(0) = 1/2 gives rank_all = 1/2 + sweep, rank_pos = rel_j/2 + sweep;
// suprank's self term is H(0) = 1 and w H(0) = rel_j, exactly the constants, so the
// sweep alone is the result.
//
// Backward, a = grad_rank_all[i,p], b = grad_rank_pos[i,p]:
//   c_jk = (a + b w) sigma'(d)              (sigmoid)
//   c_jk = a [key_k < key_j] H^-'(d)        (suprank: H has no gradient, so b drops out...)
//        + b w [key_k > key_j] h+'(d)       (... unless the H-rank replaces it)
//   grad[i,k] += c_jk (every valid k),  grad[i,j] -= c_jk.
// Deterministic, no atomics, fixed reduction order:
//   column kernel:  grad[i,k]  = sum_p c_{j_p k}         for valid k, 0 for ignored k
//   row kernel:     grad[i,j] -= sum_k c_jk              one block per tile of ranked j
// The row kernel runs after the column kernel on the same stream and each ranked
// column appears once per row, so every grad element it touches has exactly one
// writer: no (Q, P) workspace or third kernel is needed. The self pair (k = j) enters
// both sums and cancels to rounding, as in rank_sums.cu. Equal infinite scores tie (step.h
// step_diff, tied_grad; j's own term included), looked for only where a score is infinite,
// as in rank_sums.cu.
#include <cuda_runtime.h>

#include "../step.h"
#include "common.cuh"
#include "graded_rank_sums_cuda.h"

namespace fastrank {
namespace cuda {
// A namespace of their own: rank_sums.cu defines kernels and helpers with the same
// names in fastrank::cuda, and both objects link into one extension.
namespace graded {

constexpr int kThreads = 256;
constexpr int kTileP = 4;  // ranked items per block in the row kernel

template <typename T>
__device__ __forceinline__ T min_rel(T x, T y) {
  return x < y ? x : y;  // relevance is finite (checked by the glue): no NaN rule needed
}

// MODE 0: forward, rank_all into out0 and rank_pos into out1, both (Q, P).
// MODE 1: backward row sums, grad[i, j] -= sum_k c_jk with grad = out0 (Q, N).
// ptxas (CUDA 13, sm_80) caps <double, kSigmoid, 0> at 64 registers and spills 8 bytes
// (make cuda-check): loop-invariant values stored before the sweep and reloaded after it
// (seen in the SASS of an earlier version), not inside the loop, so it is left alone.
template <typename T, int STEP, int MODE>
__global__ void __launch_bounds__(kThreads)
    row_kernel(const T* __restrict__ scores, const T* __restrict__ rel, const T* __restrict__ key,
               const int64_t* __restrict__ pos_idx, const int64_t* __restrict__ ign_idx,
               const bool* __restrict__ ign_mask, const T* __restrict__ grad_all, const T* __restrict__ grad_pos,
               int64_t N, int64_t P, StepParams<T> prm, HRankParams<T> hr, T* __restrict__ out0,
               T* __restrict__ out1) {
  __shared__ T smem[kThreads / 32];
  const int64_t i = blockIdx.x;  // 64-bit from here on: i * N exceeds 2^31 at Q = N = 46341
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * kTileP;
  const T* s = scores + i * N;
  const T* r = rel + i * N;
  const T* kr = (key != nullptr ? key : rel) + i * N;
  const int64_t* pidx = pos_idx + i * P;
  const int64_t ign = ign_idx != nullptr ? ign_idx[i] : -1;
  // b matters to the sigmoid and to the H-rank (suprank's exact H has no gradient)
  const bool need_b = STEP == kSigmoid || hr.on;

  // holes get rel_j = key_j = 0 and a = b = 0: their sums are computed but never stored
  T sj[kTileP], rj[kTileP], kj[kTileP], a[kTileP], b[kTileP], acc0[kTileP], acc1[kTileP];
  bool any = false;
  bool ties = false;  // a ranked item at +-inf: the same in every thread
#pragma unroll
  for (int t = 0; t < kTileP; ++t) {
    const int64_t p = p0 + t;
    const int64_t j = p < P ? pidx[p] : -1;
    const bool has = j >= 0;
    any |= has;
    sj[t] = has ? s[j] : T(0);
    rj[t] = has ? r[j] : T(0);
    kj[t] = has ? kr[j] : T(0);
    a[t] = (MODE == 1 && has) ? grad_all[i * P + p] : T(0);
    b[t] = (MODE == 1 && need_b && has) ? grad_pos[i * P + p] : T(0);
    acc0[t] = acc1[t] = T(0);
    ties |= isinf(sj[t]);
  }
  // Padded rows (fewer ranked items than P) leave whole tiles empty. `any` is the
  // same in every thread (they all read the same pos_idx entries), so returning
  // before the first __syncthreads is safe.
  if (!any) return;

  // one sweep over every valid competitor, j itself included
  for (int64_t k = threadIdx.x; k < N; k += kThreads) {
    if (!is_valid(i, k, N, ign, ign_mask)) continue;
    const T sk = s[k];
    const T rk = r[k];
    const T kk = kr[k];
#pragma unroll
    for (int t = 0; t < kTileP; ++t) {
      const T draw = sk - sj[t];
      if (MODE == 0) {
        const T d = ties ? step_diff(sk, sj[t]) : draw;
        if (STEP == kSigmoid) {
          const T sig = sigmoid_tau(d, prm.inv_tau);
          acc0[t] += sig;
          acc1[t] += min_rel(rj[t], rk) * sig;
        } else {
          const T h = heaviside(d);
          acc0[t] += kk >= kj[t] ? h : suprank_neg(d, prm);
          acc1[t] += min_rel(rj[t], rk) * (hr.on && kk > kj[t] ? hrank_plus(d, hr) : h);
        }
      } else {
        acc0[t] += graded_pair_grad<T, STEP>(sk, sj[t], rk, rj[t], kk, kj[t], a[t], b[t], ties, hr.on, prm, hr);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kTileP; ++t) {
    const T r0 = block_sum<kThreads>(acc0[t], smem);
    const T r1 = MODE == 0 ? block_sum<kThreads>(acc1[t], smem) : T(0);
    const int64_t p = p0 + t;
    const int64_t j = threadIdx.x == 0 && p < P ? pidx[p] : -1;
    if (j >= 0) {
      if (MODE == 0) {
        // remove the self term of the sweep (see the top of the file)
        out0[i * P + p] = STEP == kSigmoid ? r0 + T(0.5) : r0;
        out1[i * P + p] = STEP == kSigmoid ? r1 + T(0.5) * rj[t] : r1;
      } else {
        out0[i * N + j] -= r0;  // the column kernel wrote this element; this is its only other writer
      }
    }
  }
}

// grad[i,k] = sum_p c_{j_p k} for valid k (0 for ignored k): one thread per competitor,
// the row's ranked items staged through shared memory.
template <typename T, int STEP>
__global__ void __launch_bounds__(kThreads)
    column_kernel(const T* __restrict__ scores, const T* __restrict__ rel, const T* __restrict__ key,
                  const int64_t* __restrict__ pos_idx, const int64_t* __restrict__ ign_idx,
                  const bool* __restrict__ ign_mask, const T* __restrict__ grad_all, const T* __restrict__ grad_pos,
                  int64_t N, int64_t P, StepParams<T> prm, HRankParams<T> hr, T* __restrict__ grad) {
  __shared__ T s_sj[kThreads];
  __shared__ T s_rj[kThreads];
  __shared__ T s_kj[kThreads];
  __shared__ T s_a[kThreads];
  __shared__ T s_b[kThreads];
  const int64_t i = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const T* s = scores + i * N;
  const T* r = rel + i * N;
  const T* kr = (key != nullptr ? key : rel) + i * N;
  const int64_t* pidx = pos_idx + i * P;
  const int64_t ign = ign_idx != nullptr ? ign_idx[i] : -1;
  const bool need_b = STEP == kSigmoid || hr.on;
  const bool active = k < N && is_valid(i, k, N, ign, ign_mask);
  const T sk = k < N ? s[k] : T(0);
  const T rk = k < N ? r[k] : T(0);
  const T kk = k < N ? kr[k] : T(0);
  const bool ties = isinf(sk);  // only an infinite competitor can tie with a ranked item at inf
  T acc = T(0);
  for (int64_t p0 = 0; p0 < P; p0 += kThreads) {
    const int64_t p = p0 + threadIdx.x;
    const int64_t j = p < P ? pidx[p] : -1;
    // holes: a = b = 0, and key_j = -inf so that neither key comparison of suprank holds
    // (the key is finite: checked by the glue)
    s_sj[threadIdx.x] = j >= 0 ? s[j] : T(0);
    s_rj[threadIdx.x] = j >= 0 ? r[j] : T(0);
    s_kj[threadIdx.x] = j >= 0 ? kr[j] : -INFINITY;
    s_a[threadIdx.x] = j >= 0 ? grad_all[i * P + p] : T(0);
    if (need_b) s_b[threadIdx.x] = j >= 0 ? grad_pos[i * P + p] : T(0);
    __syncthreads();
    const int64_t n = P - p0 < kThreads ? P - p0 : kThreads;
    if (active) {
      for (int64_t t = 0; t < n; ++t)
        acc += graded_pair_grad<T, STEP>(sk, s_sj[t], rk, s_rj[t], kk, s_kj[t], s_a[t], s_b[t], ties, hr.on, prm, hr);
    }
    __syncthreads();
  }
  if (k < N) grad[i * N + k] = active ? acc : T(0);
}

}  // namespace graded

template <typename T>
cudaError_t graded_rank_sums_forward(const ProblemView<T>& pr, const T* relevance, const T* key, int step,
                                     StepParams<T> prm, HRankParams<T> hr, T* rank_all, T* rank_pos, cudaStream_t stream) {
  using graded::kThreads;
  using graded::kTileP;
  const int64_t Q = pr.Q, N = pr.N, P = pr.P;
  if (Q == 0 || P == 0) return cudaSuccess;
  if (Q > 2147483647LL || blocks_for(P, kTileP) > 65535u) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(Q), blocks_for(P, kTileP));
  dispatch_step(step, [&](auto kind) {
    graded::row_kernel<T, decltype(kind)::value, 0><<<grid, kThreads, 0, stream>>>(
        pr.scores, relevance, key, pr.pos_idx, pr.ign_idx, pr.ign_mask, nullptr, nullptr, N, P, prm, hr, rank_all,
        rank_pos);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t graded_rank_sums_backward(const T* grad_all, const T* grad_pos, const ProblemView<T>& pr,
                                      const T* relevance, const T* key, int step, StepParams<T> prm,
                                      HRankParams<T> hr, T* grad, cudaStream_t stream) {
  using graded::kThreads;
  using graded::kTileP;
  const int64_t Q = pr.Q, N = pr.N, P = pr.P;
  if (Q == 0 || N == 0) return cudaSuccess;
  if (Q > 2147483647LL || blocks_for(N, kThreads) > 65535u || blocks_for(P, kTileP) > 65535u)
    return cudaErrorInvalidConfiguration;
  const dim3 gcol(static_cast<unsigned>(Q), blocks_for(N, kThreads));
  const dim3 grow(static_cast<unsigned>(Q), blocks_for(P, kTileP));
  dispatch_step(step, [&](auto kind) {
    constexpr int STEP = decltype(kind)::value;
    graded::column_kernel<T, STEP><<<gcol, kThreads, 0, stream>>>(pr.scores, relevance, key, pr.pos_idx,
                                                                   pr.ign_idx, pr.ign_mask, grad_all, grad_pos, N,
                                                                   P, prm, hr, grad);
    if (P == 0) return;
    // must follow the column kernel (same stream): it subtracts from what that kernel wrote
    graded::row_kernel<T, STEP, 1><<<grow, kThreads, 0, stream>>>(pr.scores, relevance, key, pr.pos_idx,
                                                                   pr.ign_idx, pr.ign_mask, grad_all, grad_pos, N,
                                                                   P, prm, hr, grad, nullptr);
  });
  return cudaGetLastError();
}

template cudaError_t graded_rank_sums_forward<float>(const ProblemView<float>&, const float*, const float*, int,
                                                     StepParams<float>, HRankParams<float>, float*, float*,
                                                     cudaStream_t);
template cudaError_t graded_rank_sums_forward<double>(const ProblemView<double>&, const double*, const double*, int,
                                                      StepParams<double>, HRankParams<double>, double*, double*,
                                                      cudaStream_t);
template cudaError_t graded_rank_sums_backward<float>(const float*, const float*, const ProblemView<float>&,
                                                      const float*, const float*, int, StepParams<float>,
                                                      HRankParams<float>, float*, cudaStream_t);
template cudaError_t graded_rank_sums_backward<double>(const double*, const double*, const ProblemView<double>&,
                                                       const double*, const double*, int, StepParams<double>,
                                                       HRankParams<double>, double*, cudaStream_t);

}  // namespace cuda
}  // namespace fastrank
