// Fused CUDA histogram AP (FastAP, SoftBin): the CUDA twin of the C++ op's hist_loss_rows
// (cpu/histogram.cpp) and of triton_kernels/histogram_loss.py, docs/design.md §2.4. No torch
// headers: the glue is loss_op.cpp. The bin arithmetic is ../histogram.h and the epilogues
// (AP from the two histograms, and its derivative per bin) ../epilogue.h, shared with the CPU.
//
// One launch per call, grid (Q,), one block per row, whatever the data; on the caller's stream,
// no host synchronisation, no float atomics (bitwise reproducible):
//   1. the block walks its row in tiles of kThreads columns: each column's flag (left out /
//      negative / positive, from the target as given) and its two bins. Each warp adds its 32
//      columns' weights bin by bin, over the range of bins the warp touches (a warp-uniform loop:
//      clustered scores touch few bins), with a shuffle reduction whose lane-0 result goes to the
//      warp's own copy of h_all and h_pos in shared memory, tiles in order; the copies are then
//      summed in warp order. So every bin has one writer and one summation order.
//   2. thread 0 runs the epilogue: the score and, with the gradient, d AP / d h per bin.
//   3. with the gradient, the block walks the row again (in L2 from step 1): a score touches at
//      most two bins, d AP / d s_k = scale * (bin_grad(d_all) + [k pos] bin_grad(d_pos)).
// Rows: no positive scores 0 with a zero gradient row; a NaN among the valid scores scores NaN with
// the gradient NaN at the valid columns when the row has positives (0 without), as the CPU op; an
// invalid row (ignore index outside [-1, N), or bad_rows[i]: a NaN relevance) scores NaN with an
// all-NaN gradient row (no error: that would need a host sync).
// Shared memory: (2 * kWarps + 4) * L values of T, so L is capped (kMaxFusedBins, loss_cuda.h);
// global scratch: none.
#include <cuda_runtime.h>

#include <climits>

#include "../epilogue.h"
#include "../histogram.h"
#include "common.cuh"
#include "loss_cuda.h"

namespace fastrank {
namespace cuda {
namespace histogram_loss {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// v = scale * s + shift rounded twice, never contracted into an FMA: the CPU op and the naive
// backend round twice, and an ulp can move a score off a bin centre (a kink of the weights)
__device__ __forceinline__ float bin_coord(float s, float scale, float shift) {
  return __fadd_rn(__fmul_rn(scale, s), shift);
}
__device__ __forceinline__ double bin_coord(double s, double scale, double shift) {
  return __dadd_rn(__dmul_rn(scale, s), shift);
}

// the sum over the warp of v, valid in lane 0 (a fixed butterfly order)
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, typename Epilogue>
__global__ void __launch_bounds__(kThreads)
    hist_loss_kernel(ProblemView<T> pr, TargetView tg, const bool* __restrict__ bad_rows, int64_t L, T scale,
                     T shift, bool open_ends, Epilogue epi, T* __restrict__ score, int64_t* __restrict__ n_pos,
                     T* __restrict__ grad) {
  extern __shared__ unsigned char smem_raw[];
  T* wa = reinterpret_cast<T*>(smem_raw);  // kWarps x L: each warp's h_all
  T* wp = wa + kWarps * L;                 // kWarps x L: each warp's h_pos
  T* ha = wp + kWarps * L;                 // L each: the row's histograms, the epilogue's derivatives
  T* hp = ha + L;
  T* d_all = hp + L;
  T* d_pos = d_all + L;
  __shared__ int red[kWarps];
  const int64_t i = blockIdx.x;
  const int64_t N = pr.N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ign = pr.ign_idx != nullptr ? pr.ign_idx[i] : -1;
  const int64_t label = row_label(tg, i);
  const T* s = pr.scores + i * N;
  for (int64_t l = threadIdx.x; l < 2 * kWarps * L; l += kThreads) wa[l] = T(0);
  __syncthreads();
  int np = 0, nan = 0;
  for (int64_t k0 = 0; k0 < N; k0 += kThreads) {
    const int64_t k = k0 + threadIdx.x;
    const int f = k < N ? column_flag(i, k, N, ign, pr.ign_mask, tg, label) : 0;
    SoftBin<T> b{};
    bool on = false;
    if (f != 0) {
      const T v = bin_coord(s[k], scale, shift);
      if (v != v) {
        nan = 1;
      } else {
        b = soft_bin(v, L, open_ends);
        on = true;
      }
    }
    np += f == 2;
    // the bins this warp touches, clipped to [0, L): the same loop bounds in every lane
    const int lo = __reduce_min_sync(0xffffffffu, on ? static_cast<int>(b.lo) : INT_MAX);
    const int hi = __reduce_max_sync(0xffffffffu, on ? static_cast<int>(b.lo) + 1 : INT_MIN);
    const int first = lo < 0 ? 0 : lo;
    const int last = hi > static_cast<int>(L) - 1 ? static_cast<int>(L) - 1 : hi;
    for (int l = first; l <= last; ++l) {
      const T c = on ? (b.lo == l ? b.w_lo : T(0)) + (b.lo + 1 == l ? b.w_hi : T(0)) : T(0);
      const T all = warp_sum(c);
      const T pos = warp_sum(f == 2 ? c : T(0));
      if (lane == 0) {
        wa[warp * L + l] += all;
        wp[warp * L + l] += pos;
      }
    }
  }
  nan = __syncthreads_or(nan);
  // the positive count, summed in warp order
  for (int off = 16; off > 0; off >>= 1) np += __shfl_xor_sync(0xffffffffu, np, off);
  if (lane == 0) red[warp] = np;
  __syncthreads();
  np = 0;
  for (int w = 0; w < kWarps; ++w) np += red[w];
  for (int64_t l = threadIdx.x; l < L; l += kThreads) {
    T a = T(0), p = T(0);
    for (int w = 0; w < kWarps; ++w) {
      a += wa[w * L + l];
      p += wp[w * L + l];
    }
    ha[l] = a;
    hp[l] = p;
  }
  const bool bad = ign < -1 || ign >= N || (bad_rows != nullptr && bad_rows[i]);
  if (threadIdx.x == 0) n_pos[i] = np;
  // the row's state is the same for the whole block: these returns skip no barrier
  if (bad || nan || np == 0) {
    if (threadIdx.x == 0) score[i] = bad || nan ? T(NAN) : T(0);
    if (grad != nullptr) {
      for (int64_t k = threadIdx.x; k < N; k += kThreads) {
        T out = T(0);
        if (bad)
          out = T(NAN);
        else if (nan && np > 0 && column_flag(i, k, N, ign, pr.ign_mask, tg, label) != 0)
          out = T(NAN);
        grad[i * N + k] = out;
      }
    }
    return;
  }
  __syncthreads();  // ha, hp, written by the whole block, are read by thread 0
  if (threadIdx.x == 0) {
    score[i] = epi.value(ha, hp, L, np);
    if (grad != nullptr) epi.grad(ha, hp, L, np, d_all, d_pos);
  }
  if (grad == nullptr) return;
  __syncthreads();
  for (int64_t k = threadIdx.x; k < N; k += kThreads) {
    const int f = column_flag(i, k, N, ign, pr.ign_mask, tg, label);
    T out = T(0);
    if (f != 0) {
      // no branch on the slope: a score without one (outside the support, clamped at an open end,
      // on a bin centre) has zero derivatives
      const SoftBin<T> b = soft_bin(bin_coord(s[k], scale, shift), L, open_ends);
      out = bin_grad(d_all, L, b);
      if (f == 2) out += bin_grad(d_pos, L, b);
      out *= scale;
    }
    grad[i * N + k] = out;
  }
}

}  // namespace histogram_loss

using namespace histogram_loss;

template <typename T>
cudaError_t histogram_loss_forward(const ProblemView<T>& pr, const TargetView& target, const bool* bad_rows,
                                   int64_t bins, T scale, T shift, bool open_ends, int kind, T* score,
                                   int64_t* n_pos, T* grad, cudaStream_t stream) {
  const int64_t Q = pr.Q;
  if (Q == 0 || pr.N == 0) return cudaSuccess;
  if (Q > 2147483647LL || bins < 2 || bins > kMaxFusedBins) return cudaErrorInvalidConfiguration;
  const size_t smem = static_cast<size_t>((2 * kWarps + 4) * bins) * sizeof(T);
  const unsigned q = static_cast<unsigned>(Q);
  if (kind == 0)
    hist_loss_kernel<T, FastApEpilogue<T>><<<q, kThreads, smem, stream>>>(pr, target, bad_rows, bins, scale, shift,
                                                                          open_ends, FastApEpilogue<T>{}, score, n_pos,
                                                                          grad);
  else
    hist_loss_kernel<T, SoftBinEpilogue<T>><<<q, kThreads, smem, stream>>>(pr, target, bad_rows, bins, scale, shift,
                                                                           open_ends, SoftBinEpilogue<T>{}, score,
                                                                           n_pos, grad);
  return cudaGetLastError();
}

template cudaError_t histogram_loss_forward<float>(const ProblemView<float>&, const TargetView&, const bool*, int64_t,
                                                   float, float, bool, int, float*, int64_t*, float*, cudaStream_t);
template cudaError_t histogram_loss_forward<double>(const ProblemView<double>&, const TargetView&, const bool*,
                                                    int64_t, double, double, bool, int, double*, int64_t*, double*,
                                                    cudaStream_t);

}  // namespace cuda
}  // namespace fastrank
