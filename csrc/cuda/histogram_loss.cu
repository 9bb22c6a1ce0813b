// Fused CUDA histogram AP (FastAP, SoftBin): the CUDA twin of the C++ op's hist_loss_rows
// (cpu/histogram.cpp) and of triton_kernels/histogram_loss.py, docs/design.md §2.4. No torch
// headers: the glue is loss_op.cpp. The bin arithmetic is ../histogram.h and the epilogues
// (AP from the two histograms, and its derivative per bin) ../epilogue.h, shared with the CPU.
//
// On the caller's stream, no host synchronisation, no float atomics (bitwise reproducible). With
// enough rows to fill the GPU (plan_histogram_loss: C = 1) one launch, grid (Q,), one block per row:
//   1. the block walks its row in tiles of kThreads columns: each column's flag (left out /
//      negative / positive, from the target as given) and its two bins. Each warp adds its 32
//      columns' weights bin by bin, over the range of bins the warp touches (a warp-uniform loop:
//      clustered scores touch few bins), with a shuffle reduction whose lane-0 result goes to the
//      warp's own copy of h_all and h_pos in shared memory, tiles in order; the copies are then
//      summed in warp order. So every bin has one writer and one summation order.
//   2. thread 0 runs the epilogue: the score and, with the gradient, d AP / d h per bin.
//   3. with the gradient, the block walks the row again (in L2 from step 1): a score touches at
//      most two bins, d AP / d s_k = scale * (bin_grad(d_all) + [k pos] bin_grad(d_pos)).
// With few rows against a long gallery (Q = 256 queries against a 64k memory) a row is split over C
// blocks (C from Q and N only), three launches: hist_part_kernel, grid (Q, C), step 1 on one chunk
// of the columns into partial histograms (Q, C, 2, L) and partial counts (Q, C, 2); then
// hist_finish_kernel, grid (Q,), the partials added in the order c = 0..C-1 and step 2, the
// derivatives per bin into (Q, 2, L); then hist_grad_kernel, grid (Q, cdiv(N, kThreads)), step 3.
// Rows: no positive scores 0 with a zero gradient row; a NaN among the valid scores scores NaN with
// the gradient NaN at the valid columns when the row has positives (0 without), as the CPU op; an
// invalid row (ignore index outside [-1, N), or bad_rows[i]: a NaN relevance) scores NaN with an
// all-NaN gradient row (no error: that would need a host sync).
// Shared memory: (2 * kWarps + 4) * L values of T, so L is capped (kMaxFusedBins, loss_cuda.h);
// global scratch: none with C = 1, else Q * (2 C + 2) * L values of T and 2 Q C ints.
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

constexpr int64_t kTargetBlocks = 1024;  // the split aims at about this many blocks in all
constexpr int64_t kMinChunk = 4096;       // columns per block at least

// Step 1 on the columns [k_lo, k_hi) of row i: each warp's h_all, h_pos in wa, wp (kWarps x L,
// zeroed here), summed in warp order into ha, hp (L each); returns the positive count of the
// range (in every thread) and sets nan when a valid score's bin coordinate is NaN.
template <typename T>
__device__ int accumulate_row(const ProblemView<T>& pr, const TargetView& tg, int64_t i, int64_t k_lo,
                              int64_t k_hi, int64_t L, T scale, T shift, bool open_ends, T* wa, T* wp, T* ha,
                              T* hp, int* red, int& nan) {
  const int64_t N = pr.N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ign = pr.ign_idx != nullptr ? pr.ign_idx[i] : -1;
  const int64_t label = row_label(tg, i);
  const T* s = pr.scores + i * N;
  for (int64_t l = threadIdx.x; l < 2 * kWarps * L; l += kThreads) wa[l] = T(0);
  __syncthreads();
  int np = 0;
  nan = 0;
  for (int64_t k0 = k_lo; k0 < k_hi; k0 += kThreads) {
    const int64_t k = k0 + threadIdx.x;
    const int f = k < k_hi ? column_flag(i, k, N, ign, pr.ign_mask, tg, label) : 0;
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
  __syncthreads();  // ha, hp, written by the whole block, are read next by any thread
  return np;
}

// Step 3 for column k of row i (valid or not): d AP / d s_k from the per-bin derivatives.
template <typename T>
__device__ __forceinline__ T column_grad(const ProblemView<T>& pr, const TargetView& tg, int64_t i, int64_t k,
                                         int64_t L, T scale, T shift, bool open_ends, const T* d_all,
                                         const T* d_pos) {
  const int64_t ign = pr.ign_idx != nullptr ? pr.ign_idx[i] : -1;
  const int f = column_flag(i, k, pr.N, ign, pr.ign_mask, tg, row_label(tg, i));
  if (f == 0) return T(0);
  // no branch on the slope: a score without one (outside the support, clamped at an open end,
  // on a bin centre) has zero derivatives
  const SoftBin<T> b = soft_bin(bin_coord(pr.scores[i * pr.N + k], scale, shift), L, open_ends);
  T out = bin_grad(d_all, L, b);
  if (f == 2) out += bin_grad(d_pos, L, b);
  return out * scale;
}

// The gradient row of a row that is invalid (bad), has a NaN among its valid scores, or has no
// positive: NaN everywhere, NaN at the valid columns (when it has positives), or zeros.
template <typename T>
__device__ __forceinline__ T degenerate_grad(const ProblemView<T>& pr, const TargetView& tg, int64_t i, int64_t k,
                                             bool bad, bool nan, int np) {
  if (bad) return T(NAN);
  const int64_t ign = pr.ign_idx != nullptr ? pr.ign_idx[i] : -1;
  if (nan && np > 0 && column_flag(i, k, pr.N, ign, pr.ign_mask, tg, row_label(tg, i)) != 0) return T(NAN);
  return T(0);
}

template <typename T>
__device__ __forceinline__ bool bad_row(const ProblemView<T>& pr, const bool* bad_rows, int64_t i) {
  const int64_t ign = pr.ign_idx != nullptr ? pr.ign_idx[i] : -1;
  return ign < -1 || ign >= pr.N || (bad_rows != nullptr && bad_rows[i]);
}

// C = 1: the whole call in one launch, one block per row (steps 1-3)
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
  int nan = 0;
  const int np = accumulate_row(pr, tg, i, 0, N, L, scale, shift, open_ends, wa, wp, ha, hp, red, nan);
  const bool bad = bad_row(pr, bad_rows, i);
  if (threadIdx.x == 0) n_pos[i] = np;
  // the row's state is the same for the whole block: these returns skip no barrier
  if (bad || nan || np == 0) {
    if (threadIdx.x == 0) score[i] = bad || nan ? T(NAN) : T(0);
    if (grad != nullptr)
      for (int64_t k = threadIdx.x; k < N; k += kThreads) grad[i * N + k] = degenerate_grad(pr, tg, i, k, bad, nan, np);
    return;
  }
  if (threadIdx.x == 0) {
    score[i] = epi.value(ha, hp, L, np);
    if (grad != nullptr) epi.grad(ha, hp, L, np, d_all, d_pos);
  }
  if (grad == nullptr) return;
  __syncthreads();
  for (int64_t k = threadIdx.x; k < N; k += kThreads)
    grad[i * N + k] = column_grad(pr, tg, i, k, L, scale, shift, open_ends, d_all, d_pos);
}

// C > 1, launch 1 of 3: chunk c of row i into part (Q, C, 2, L) and meta (Q, C, 2): (positives, NaN)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    hist_part_kernel(ProblemView<T> pr, TargetView tg, int64_t L, T scale, T shift, bool open_ends, int64_t C,
                     int64_t CH, T* __restrict__ part, int* __restrict__ meta) {
  extern __shared__ unsigned char smem_raw[];
  T* wa = reinterpret_cast<T*>(smem_raw);
  T* wp = wa + kWarps * L;
  T* ha = wp + kWarps * L;
  T* hp = ha + L;
  __shared__ int red[kWarps];
  const int64_t i = blockIdx.x, c = blockIdx.y;
  const int64_t k_lo = c * CH;
  const int64_t k_hi = k_lo + CH < pr.N ? k_lo + CH : pr.N;
  int nan = 0;
  const int np = accumulate_row(pr, tg, i, k_lo, k_hi, L, scale, shift, open_ends, wa, wp, ha, hp, red, nan);
  T* out = part + (i * C + c) * 2 * L;
  for (int64_t l = threadIdx.x; l < L; l += kThreads) {
    out[l] = ha[l];
    out[L + l] = hp[l];
  }
  if (threadIdx.x == 0) {
    meta[(i * C + c) * 2] = np;
    meta[(i * C + c) * 2 + 1] = nan;
  }
}

// C > 1, launch 2 of 3: the partials of row i added in the order c = 0..C-1, the score, n_pos and,
// with the gradient, the per-bin derivatives into deriv (Q, 2, L); the row's state into
// state (Q, 2): (positives, flags: 1 = NaN, 2 = invalid)
template <typename T, typename Epilogue>
__global__ void __launch_bounds__(kThreads)
    hist_finish_kernel(ProblemView<T> pr, const bool* __restrict__ bad_rows, int64_t L, int64_t C, Epilogue epi,
                       const T* __restrict__ part, const int* __restrict__ meta, T* __restrict__ score,
                       int64_t* __restrict__ n_pos, T* __restrict__ deriv, int* __restrict__ state) {
  extern __shared__ unsigned char smem_raw[];
  T* ha = reinterpret_cast<T*>(smem_raw);
  T* hp = ha + L;
  const int64_t i = blockIdx.x;
  for (int64_t l = threadIdx.x; l < L; l += kThreads) {
    T a = T(0), p = T(0);
    for (int64_t c = 0; c < C; ++c) {
      a += part[(i * C + c) * 2 * L + l];
      p += part[(i * C + c) * 2 * L + L + l];
    }
    ha[l] = a;
    hp[l] = p;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  int np = 0, nan = 0;
  for (int64_t c = 0; c < C; ++c) {
    np += meta[(i * C + c) * 2];
    nan |= meta[(i * C + c) * 2 + 1];
  }
  const bool bad = bad_row(pr, bad_rows, i);
  n_pos[i] = np;
  state[2 * i] = np;
  state[2 * i + 1] = (nan ? 1 : 0) | (bad ? 2 : 0);
  if (bad || nan || np == 0) {
    score[i] = bad || nan ? T(NAN) : T(0);
    return;
  }
  score[i] = epi.value(ha, hp, L, np);
  if (deriv != nullptr) epi.grad(ha, hp, L, np, deriv + i * 2 * L, deriv + i * 2 * L + L);
}

// C > 1, launch 3 of 3 (with the gradient): a block of columns of row i
template <typename T>
__global__ void __launch_bounds__(kThreads)
    hist_grad_kernel(ProblemView<T> pr, TargetView tg, int64_t L, T scale, T shift, bool open_ends,
                     const T* __restrict__ deriv, const int* __restrict__ state, T* __restrict__ grad) {
  extern __shared__ unsigned char smem_raw[];
  T* d_all = reinterpret_cast<T*>(smem_raw);
  T* d_pos = d_all + L;
  const int64_t i = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int np = state[2 * i], flags = state[2 * i + 1];
  // the row's state is the same for the whole block: this return skips no barrier
  if (flags != 0 || np == 0) {
    if (k < pr.N) grad[i * pr.N + k] = degenerate_grad(pr, tg, i, k, (flags & 2) != 0, (flags & 1) != 0, np);
    return;
  }
  for (int64_t l = threadIdx.x; l < 2 * L; l += kThreads) d_all[l] = deriv[i * 2 * L + l];
  __syncthreads();
  if (k < pr.N) grad[i * pr.N + k] = column_grad(pr, tg, i, k, L, scale, shift, open_ends, d_all, d_pos);
}

}  // namespace histogram_loss

using namespace histogram_loss;

HistLossPlan plan_histogram_loss(int64_t Q, int64_t N, int64_t bins, bool with_grad) {
  HistLossPlan p;
  const int64_t per_row = (kTargetBlocks + (Q > 0 ? Q : 1) - 1) / (Q > 0 ? Q : 1);
  const int64_t by_len = N / kMinChunk;
  p.splits = per_row < by_len ? per_row : by_len;
  if (p.splits < 1) p.splits = 1;
  p.chunk = (N + p.splits - 1) / p.splits;
  p.scratch_elems = p.splits > 1 ? Q * (2 * p.splits + (with_grad ? 2 : 0)) * bins : 1;
  p.int_elems = p.splits > 1 ? Q * (2 * p.splits + 2) : 1;
  return p;
}

template <typename T>
cudaError_t histogram_loss_forward(const ProblemView<T>& pr, const TargetView& target, const bool* bad_rows,
                                   int64_t bins, T scale, T shift, bool open_ends, int kind,
                                   const HistLossPlan& plan, T* scratch, int* int_scratch, T* score,
                                   int64_t* n_pos, T* grad, cudaStream_t stream) {
  const int64_t Q = pr.Q, N = pr.N, C = plan.splits;
  if (Q == 0 || N == 0) return cudaSuccess;
  if (Q > 2147483647LL || bins < 2 || bins > kMaxFusedBins || C > 65535 || blocks_for(N, kThreads) > 65535u)
    return cudaErrorInvalidConfiguration;
  const size_t smem = static_cast<size_t>((2 * kWarps + 4) * bins) * sizeof(T);
  const unsigned q = static_cast<unsigned>(Q);
  auto run = [&](auto epi) {
    using Epi = decltype(epi);
    if (C == 1) {
      hist_loss_kernel<T, Epi><<<q, kThreads, smem, stream>>>(pr, target, bad_rows, bins, scale, shift, open_ends,
                                                               epi, score, n_pos, grad);
      return;
    }
    T* part = scratch;                              // (Q, C, 2, L)
    T* deriv = grad != nullptr ? scratch + Q * C * 2 * bins : nullptr;  // (Q, 2, L)
    int* meta = int_scratch;                        // (Q, C, 2)
    int* state = int_scratch + Q * C * 2;           // (Q, 2)
    const size_t smem_2l = static_cast<size_t>(2 * bins) * sizeof(T);
    hist_part_kernel<T><<<dim3(q, static_cast<unsigned>(C)), kThreads, smem, stream>>>(
        pr, target, bins, scale, shift, open_ends, C, plan.chunk, part, meta);
    hist_finish_kernel<T, Epi><<<q, kThreads, smem_2l, stream>>>(pr, bad_rows, bins, C, epi, part, meta, score,
                                                                  n_pos, deriv, state);
    if (grad != nullptr)
      hist_grad_kernel<T><<<dim3(q, blocks_for(N, kThreads)), kThreads, smem_2l, stream>>>(
          pr, target, bins, scale, shift, open_ends, deriv, state, grad);
  };
  if (kind == 0)
    run(FastApEpilogue<T>{});
  else
    run(SoftBinEpilogue<T>{});
  return cudaGetLastError();
}

template cudaError_t histogram_loss_forward<float>(const ProblemView<float>&, const TargetView&, const bool*, int64_t,
                                                   float, float, bool, int, const HistLossPlan&, float*, int*,
                                                   float*, int64_t*, float*, cudaStream_t);
template cudaError_t histogram_loss_forward<double>(const ProblemView<double>&, const TargetView&, const bool*,
                                                    int64_t, double, double, bool, int, const HistLossPlan&, double*,
                                                    int*, double*, int64_t*, double*, cudaStream_t);

}  // namespace cuda
}  // namespace fastrank
