// Fused CUDA loss kernels: ap_loss (Smooth-AP, SupAP) and recall_loss (SupRank's Recall@k;
// Patel et al.'s with clamp_hits), the CUDA twin of the C++ ops (cpu/rank_sums.cpp, "fused loss
// ops") and of the fused Triton kernels (triton_kernels/loss.py), docs/design.md §2.4. No torch
// headers: the glue is loss_op.cpp. The step arithmetic is ../step.h and the epilogues (score and
// its derivatives) ../epilogue.h, shared with the CPU kernels; only the loop structure is here.
//
// Per call, whatever the data: three launches, four with the gradient, all on the caller's stream,
// no host synchronisation (so a call can be captured in a CUDA graph), no float atomics (every
// value has one writer and a fixed summation order: bitwise reproducible).
//
// 1. compact_kernel, grid (Q,): each row walks its columns in tiles of kThreads, flags each
//    column (left out / negative / positive, from the target as given: labels equal, or the dense
//    positive mask), writes the positives' columns in column order into cols (Q, N) int32 (a warp
//    ballot and the warps' counts per tile: a deterministic block scan) and meta[i] = (count,
//    flags). The data checks that would need a host sync are flags here: bit 1 = a NaN among the
//    row's valid scores, bit 2 = invalid input (an ignore index outside [-1, N), or bad_rows[i]:
//    a NaN in the row's float relevance, found by the glue's device pass).
// 2. sums_kernel, grid (Q, C): per positive j, with d = s_k - s_j over every valid k (j included),
//        sigmoid: rank_all_j = sum_valid sigma(d), rank_pos_j = sum_pos sigma(d)  (+ 1/2 in 3)
//                 S1_j = sum_valid sigma'(d),    S2_j = sum_pos sigma'(d)
//        suprank: rank_all_j = sum_pos H(d) + sum_neg H^-(d),  rank_pos_j = sum_pos H(d)
//                 S1_j = sum_neg H^-'(d)
//    kTileP positives per sweep, each loaded score serving all of them. C (from Q and N only:
//    small Q against a long gallery) splits a row: a row with at least C tiles of positives deals
//    them round-robin to the C blocks, each against the whole row (final sums into work); one with
//    fewer has each block sweep one chunk of the columns for all of its positives (partial sums
//    into part, added by kernel 3 in the order c = 0..C-1). A tile holding an infinite positive
//    takes step_diff / tied_grad (a tie of equal infinities is d = 0), as the CPU kernels do.
// 3. epilogue_kernel, grid (Q,): the partials reduced, the self term added, then ApEpilogue /
//    RecallEpilogue (../epilogue.h, called as they are) give the score and the coefficients
//    a_j = d score / d rank_all_j, b_j = d score / d rank_pos_j; each positive's own share
//    own_j = a_j S1_j + b_j S2_j (suprank: a_j S1_j) is left as -own_j at its column of grad.
//    The epilogue runs in one thread per row (rows in parallel): O(|P_i| * |ks|) per row.
// 4. grad_kernel, grid (Q, cdiv(N, kThreads)): per column k,
//        sigmoid: sum_j (a_j + b_j [k pos]) sigma'(s_k - s_j),  suprank: [k neg] sum_j a_j H^-'(s_k - s_j)
//    plus the -own_k kernel 3 left at a positive column; 0 at a left-out column. The sigmoid's
//    self pair adds c_jj at column j and own_j takes it back.
//
// Rows: a query without positives scores 0 with a zero gradient row; a NaN row (bit 1) scores
// NaN with its gradient NaN at the valid columns when it has positives (0 without), as the CPU op;
// an invalid row (bit 2) scores NaN with an all-NaN gradient row (no error: that would need a sync).
//
// Memory beyond scores and gradient rows, per (row, column): the int32 column and `planes` values
// of T (the positive count is known only on the device). A tile whose sums one block of kernel 2
// completes is finished there (finish_ap: AP's a and b, -own at the positive's column, the block's
// sum of AP terms into rsum (Q, C)), and a split row by kernel 3, so rank_pos, S1 and S2 are never
// stored: AP keeps 1 plane (suprank) or 2 (sigmoid) with the gradient, none without; Recall@k 1
// (rank_all, overwritten by a; its S1 waits at the positive's column of the gradient row). Plus
// the split partials, Q * C^2 * sums * kTileP values. 64-bit offsets
// throughout (i * N exceeds 2^31 at Q = N = 46341); columns are int32 (the glue checks N < 2^31).
#include <cuda_runtime.h>

#include "../epilogue.h"
#include "../step.h"
#include "common.cuh"
#include "loss_cuda.h"

namespace fastrank {
namespace cuda {
// a named namespace (not an anonymous one): the kernels keep readable names in ptxas's summary
// (tools/cuda_check.sh) and in profiles
namespace loss {

constexpr int kLossThreads = 256;
constexpr int kWarps = kLossThreads / 32;
constexpr int kTileP = 8;  // positives per sweep of the sums kernel
// the split aims at about this many blocks in all, each chunk at least kMinChunk columns
constexpr int64_t kTargetBlocks = 2048;
constexpr int64_t kMinChunk = 2048;
constexpr int kFlagNan = 1;
constexpr int kFlagInvalid = 2;


// ---------------------------------------------------------------- 1. flags and positives

template <typename T>
__global__ void __launch_bounds__(kLossThreads)
    compact_kernel(const T* __restrict__ scores, TargetView tg, const int64_t* __restrict__ ign_idx,
                   const bool* __restrict__ ign_mask, const bool* __restrict__ bad_rows, int64_t N,
                   int32_t* __restrict__ cols, int32_t* __restrict__ meta) {
  __shared__ int warp_counts[kWarps];
  const int64_t i = blockIdx.x;
  const int64_t ign = ign_idx != nullptr ? ign_idx[i] : -1;
  const int64_t label = row_label(tg, i);
  const T* s = scores + i * N;
  int32_t* c = cols + i * N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int count = 0;
  int nan = 0;
  for (int64_t k0 = 0; k0 < N; k0 += kLossThreads) {
    const int64_t k = k0 + threadIdx.x;
    const int f = k < N ? column_flag(i, k, N, ign, ign_mask, tg, label) : 0;
    if (f != 0) nan |= isnan(s[k]) ? 1 : 0;
    const unsigned ballot = __ballot_sync(0xffffffffu, f == 2);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = count, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      total += warp_counts[w];
    }
    if (f == 2) c[before + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int32_t>(k);
    count += total;
    __syncthreads();  // warp_counts is rewritten by the next tile
  }
  nan = __syncthreads_or(nan);
  if (threadIdx.x == 0) {
    const bool bad = ign < -1 || ign >= N || (bad_rows != nullptr && bad_rows[i]);
    meta[2 * i] = count;
    meta[2 * i + 1] = (nan ? kFlagNan : 0) | (bad ? kFlagInvalid : 0);
  }
}

// ---------------------------------------------------------------- 2. rank sums per positive

template <int STEP, bool GRAD>
struct SumPlanes {
  // rank_all, rank_pos, then S1 (with the gradient) and S2 (sigmoid with the gradient)
  static constexpr int value = GRAD ? (STEP == kSigmoid ? 4 : 3) : 2;
};

// A positive's sums complete (rank_all and rank_pos with the self term, S1, S2): AP's share of
// the score (rank_pos / rank_all, returned) and, with the gradient, its coefficients a (plane A)
// and b (plane B, the sigmoid only: SupAP's gradient sweep needs no b) and -own at its column of
// the gradient row; np = |P_i|. One place for kernels 2 and 3.
template <typename T, int STEP, bool GRAD>
__device__ __forceinline__ T finish_ap(T ra, T rp, T s1, T s2, int64_t np, int64_t q, int32_t col, T* A, T* B,
                                       T* grad_row) {
  if (GRAD) {
    T a, b;
    ap_term_grad(rp, ra, T(1) / T(np), a, b);
    A[q] = a;
    if (STEP == kSigmoid) B[q] = b;
    grad_row[col] = -(STEP == kSigmoid ? a * s1 + b * s2 : a * s1);
  }
  return ap_term(rp, ra);
}

template <typename T, int STEP, bool GRAD, int EPI>
__global__ void __launch_bounds__(kLossThreads)
    sums_kernel(const T* __restrict__ scores, TargetView tg, const int64_t* __restrict__ ign_idx,
                const bool* __restrict__ ign_mask, const int32_t* __restrict__ cols, const int32_t* __restrict__ meta,
                int64_t Q, int64_t N, int64_t C, int64_t CH, StepParams<T> prm, T* __restrict__ work,
                T* __restrict__ part, T* __restrict__ rsum, T* __restrict__ grad) {
  constexpr int NB = SumPlanes<STEP, GRAD>::value;
  constexpr int M = NB * kTileP;
  // the sigmoid's sweep counted sigma(0) = 1/2 for j itself, where the rank has 1
  const T self = STEP == kSigmoid ? T(0.5) : T(0);
  __shared__ T red[M * kWarps];
  __shared__ T fin[M];  // a finished tile's sums, [b * kTileP + p]
  __shared__ T terms[kTileP];
  const int64_t i = blockIdx.x;
  const int64_t c = blockIdx.y;
  const int64_t count = meta[2 * i];
  if (count == 0 || meta[2 * i + 1] != 0) return;  // the whole block: no partial syncs
  const int64_t ign = ign_idx != nullptr ? ign_idx[i] : -1;
  const int64_t label = row_label(tg, i);
  const T* s = scores + i * N;
  const int32_t* pc = cols + i * N;
  const int64_t n_tiles = (count + kTileP - 1) / kTileP;
  const bool by_tiles = n_tiles >= C;
  const int64_t k_lo = by_tiles ? 0 : c * CH;
  const int64_t k_hi = by_tiles ? N : (k_lo + CH < N ? k_lo + CH : N);
  const int64_t pw = C * kTileP;  // the partials' row width (count < C * kTileP in that mode)
  T score_part = T(0);            // thread 0: this block's sum of AP terms, tiles in order
  for (int64_t t = by_tiles ? c : 0; t < n_tiles; t += by_tiles ? C : 1) {
    T sj[kTileP];
    bool ties = false;
#pragma unroll
    for (int p = 0; p < kTileP; ++p) {
      const int64_t q = t * kTileP + p;
      sj[p] = q < count ? s[pc[q]] : T(0);
      ties |= isinf(sj[p]);
    }
    T acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = T(0);
    for (int64_t k = k_lo + threadIdx.x; k < k_hi; k += kLossThreads) {
      const int f = column_flag(i, k, N, ign, ign_mask, tg, label);
      if (f == 0) continue;
      const T sk = s[k];
#pragma unroll
      for (int p = 0; p < kTileP; ++p) {
        const T draw = sk - sj[p];
        const T d = ties ? step_diff(sk, sj[p]) : draw;
        if (STEP == kSigmoid) {
          const T g = sigmoid_tau(d, prm.inv_tau);
          acc[p] += g;
          if (f == 2) acc[kTileP + p] += g;
          if (GRAD) {
            const T g1 = sigmoid_tau_grad(draw, prm.inv_tau);
            const T gd = ties ? tied_grad(draw, g1) : g1;
            acc[2 * kTileP + p] += gd;
            if (f == 2) acc[(NB - 1) * kTileP + p] += gd;
          }
        } else if (f == 2) {
          const T h = heaviside(d);
          acc[p] += h;
          acc[kTileP + p] += h;
        } else {
          acc[p] += suprank_neg(d, prm);
          if (GRAD) {
            const T g1 = suprank_neg_grad(draw, prm);
            acc[2 * kTileP + p] += ties ? tied_grad(draw, g1) : g1;
          }
        }
      }
    }
    const T total = block_sums<M, kLossThreads>(acc, red);
    if (!by_tiles) {
      if (threadIdx.x < M) {
        const int64_t b = threadIdx.x / kTileP, q = t * kTileP + threadIdx.x % kTileP;
        if (q < count) part[((i * C + c) * NB + b) * pw + q] = total;
      }
      continue;
    }
    // the tile's sums are complete: finish it here, so that rank_pos, S1 and S2 are never stored
    if (threadIdx.x < M) fin[threadIdx.x] = total;
    __syncthreads();
    if (threadIdx.x < kTileP) {
      const int p = threadIdx.x;
      const int64_t q = t * kTileP + p;
      T term = T(0);
      if (q < count) {
        const T ra = fin[p] + self;
        const T s1 = GRAD ? fin[2 * kTileP + p] : T(0);
        if (EPI == 0) {
          const T s2 = GRAD && STEP == kSigmoid ? fin[(NB - 1) * kTileP + p] : T(0);
          term = finish_ap<T, STEP, GRAD>(ra, fin[kTileP + p] + self, s1, s2, count, q, pc[q], work + i * N,
                                          work + (Q + i) * N, GRAD ? grad + i * N : nullptr);
        } else {
          // Recall@k: its coefficients need the row's hits (kernel 3); S1 waits at j's column
          work[i * N + q] = ra;
          if (GRAD) grad[i * N + pc[q]] = s1;
        }
      }
      terms[p] = term;
    }
    __syncthreads();
    if (EPI == 0 && threadIdx.x == 0)
      for (int p = 0; p < kTileP; ++p) score_part += terms[p];
  }
  if (EPI == 0 && by_tiles && threadIdx.x == 0) rsum[i * C + c] = score_part;
}

// ---------------------------------------------------------------- 3. epilogue

template <typename T, int EPI>
struct MakeEpilogue;

template <typename T>
struct MakeEpilogue<T, 0> {
  __device__ static ApEpilogue<T> make(const LossOptions<T>&, const int64_t*) { return ApEpilogue<T>{}; }
};

template <typename T>
struct MakeEpilogue<T, 1> {
  __device__ static RecallEpilogue<T> make(const LossOptions<T>& o, const int64_t* ks) {
    return RecallEpilogue<T>{ks, o.nk, o.inv_temp, o.clamp_hits};
  }
};

template <typename T, int STEP, bool GRAD, int EPI>
__global__ void __launch_bounds__(kLossThreads)
    epilogue_kernel(const int32_t* __restrict__ cols, const int32_t* __restrict__ meta, const LossOptions<T> opt,
                    int64_t Q, int64_t N, int64_t C, T* __restrict__ work, T* __restrict__ part,
                    const T* __restrict__ rsum, T* __restrict__ score, int64_t* __restrict__ n_pos,
                    T* __restrict__ grad) {
  constexpr int NB = SumPlanes<STEP, GRAD>::value;
  const T self = STEP == kSigmoid ? T(0.5) : T(0);
  __shared__ int64_t ks[kMaxKs];
  __shared__ T w[kMaxKs];
  const int64_t i = blockIdx.x;
  const int64_t count = meta[2 * i];
  const int flags = meta[2 * i + 1];
  if (threadIdx.x == 0) n_pos[i] = count;
  if (flags != 0 || count == 0) {
    if (threadIdx.x == 0) score[i] = flags != 0 ? T(NAN) : T(0);
    return;
  }
  if (EPI == 1)
    for (int64_t q = threadIdx.x; q < opt.nk; q += kLossThreads) ks[q] = opt.ks[q];
  const int64_t n_tiles = (count + kTileP - 1) / kTileP;
  const int64_t pw = C * kTileP;
  const int32_t* pc = cols + i * N;
  T* A = work + i * N;
  T* grad_row = GRAD ? grad + i * N : nullptr;
  if (n_tiles < C) {
    // a split row: the partials of the C chunk blocks, in the order c = 0..C-1, then finished
    // as kernel 2 finishes a whole tile; AP's terms wait in part's first slots for the sum
    for (int64_t p = threadIdx.x; p < count; p += kLossThreads) {
      T v[NB];
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        v[b] = T(0);
        for (int64_t c = 0; c < C; ++c) v[b] += part[((i * C + c) * NB + b) * pw + p];
      }
      const T s1 = GRAD ? v[2] : T(0);
      if (EPI == 0) {
        const T s2 = GRAD && STEP == kSigmoid ? v[NB - 1] : T(0);
        part[i * C * NB * pw + p] = finish_ap<T, STEP, GRAD>(v[0] + self, v[1] + self, s1, s2, count, p, pc[p], A,
                                                             work + (Q + i) * N, grad_row);
      } else {
        A[p] = v[0] + self;
        if (GRAD) grad_row[pc[p]] = s1;
      }
    }
  }
  __syncthreads();  // A, part and ks, written by the whole block, are read by thread 0
  if constexpr (EPI == 0) {
    if (threadIdx.x == 0) {
      T total = T(0);
      if (n_tiles < C)
        for (int64_t p = 0; p < count; ++p) total += part[i * C * NB * pw + p];
      else
        for (int64_t c = 0; c < C; ++c) total += rsum[i * C + c];
      score[i] = total / T(count);
    }
  } else {
    const auto epi = MakeEpilogue<T, EPI>::make(opt, ks);
    if (threadIdx.x == 0) {
      score[i] = epi.value(A, nullptr, count);
      if (GRAD)
        for (int64_t q = 0; q < opt.nk; ++q) w[q] = epi.weight(A, count, q);
    }
    if (!GRAD) return;
    __syncthreads();
    for (int64_t p = threadIdx.x; p < count; p += kLossThreads) {
      const T a = epi.coef(A[p], w);
      const int32_t col = pc[p];
      A[p] = a;
      grad_row[col] = -(a * grad_row[col]);  // S1 sat at the positive's column
    }
  }
}

// ---------------------------------------------------------------- 4. gradient rows

template <typename T, int STEP>
__global__ void __launch_bounds__(kLossThreads)
    grad_kernel(const T* __restrict__ scores, TargetView tg, const int64_t* __restrict__ ign_idx,
                const bool* __restrict__ ign_mask, const int32_t* __restrict__ cols, const int32_t* __restrict__ meta,
                int64_t Q, int64_t N, bool has_b, StepParams<T> prm, const T* __restrict__ work,
                T* __restrict__ grad) {
  __shared__ T s_sj[kLossThreads];
  __shared__ T s_a[kLossThreads];
  __shared__ T s_b[kLossThreads];
  const int64_t i = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kLossThreads + threadIdx.x;
  const int64_t count = meta[2 * i];
  const int flags = meta[2 * i + 1];
  const int64_t ign = ign_idx != nullptr ? ign_idx[i] : -1;
  const int f = k < N ? column_flag(i, k, N, ign, ign_mask, tg, row_label(tg, i)) : 0;
  T* out = grad + i * N + k;
  // the row's state is the same for the whole block: these returns skip no barrier
  if (flags & kFlagInvalid) {
    if (k < N) *out = T(NAN);
    return;
  }
  if (flags != 0) {
    if (k < N) *out = f != 0 && count > 0 ? T(NAN) : T(0);
    return;
  }
  if (count == 0) {
    if (k < N) *out = T(0);
    return;
  }
  const T* s = scores + i * N;
  // a_j in plane 0; b_j in plane 1 for the sigmoid AP only (Recall@k has b = 0)
  const T* a = work + i * N;
  const T* b = has_b ? work + (Q + i) * N : nullptr;
  const T sk = f != 0 ? s[k] : T(0);
  const bool ties = isinf(sk);  // only an infinite competitor ties with a positive at inf
  T acc = T(0);
  for (int64_t p0 = 0; p0 < count; p0 += kLossThreads) {
    const int64_t p = p0 + threadIdx.x;
    s_sj[threadIdx.x] = p < count ? s[cols[i * N + p]] : T(0);
    s_a[threadIdx.x] = p < count ? a[p] : T(0);
    s_b[threadIdx.x] = p < count && b != nullptr ? b[p] : T(0);
    __syncthreads();
    const int64_t n = count - p0 < kLossThreads ? count - p0 : kLossThreads;
    if (STEP == kSigmoid ? f != 0 : f == 1) {
      for (int64_t t = 0; t < n; ++t) {
        const T draw = sk - s_sj[t];
        if (STEP == kSigmoid) {
          const T g = sigmoid_tau_grad(draw, prm.inv_tau);
          acc += (f == 2 ? s_a[t] + s_b[t] : s_a[t]) * (ties ? tied_grad(draw, g) : g);
        } else {
          const T g = suprank_neg_grad(draw, prm);
          acc += s_a[t] * (ties ? tied_grad(draw, g) : g);
        }
      }
    }
    __syncthreads();
  }
  if (k < N) *out = f == 0 ? T(0) : f == 2 ? acc + *out : acc;
}

}  // namespace loss

using namespace loss;

LossPlan plan_loss(int64_t Q, int64_t N, int step, bool with_grad, int kind) {
  LossPlan p;
  const int64_t per_row = (kTargetBlocks + (Q > 0 ? Q : 1) - 1) / (Q > 0 ? Q : 1);
  const int64_t by_len = N / kMinChunk;
  p.splits = per_row < by_len ? per_row : by_len;
  if (p.splits < 1) p.splits = 1;
  p.chunk = (N + p.splits - 1) / p.splits;
  p.sums = with_grad ? (step == kSigmoid ? 4 : 3) : 2;
  // AP: the coefficients a (and b for the sigmoid) with the gradient, nothing without;
  // Recall@k: rank_all, overwritten by a
  p.planes = kind == 0 ? (with_grad ? (step == kSigmoid ? 2 : 1) : 0) : 1;
  p.part_elems = p.splits > 1 ? Q * p.splits * p.sums * p.splits * kTileP : 1;
  p.rsum_elems = Q * p.splits;
  return p;
}

template <typename T>
cudaError_t loss_forward(const ProblemView<T>& pr, const TargetView& target, const bool* bad_rows, int step,
                         StepParams<T> prm, const LossOptions<T>& opt, const LossPlan& plan, int32_t* cols,
                         int32_t* meta, T* work, T* part, T* rsum, T* score, int64_t* n_pos, T* grad,
                         cudaStream_t stream) {
  const int64_t Q = pr.Q, N = pr.N, C = plan.splits;
  if (Q == 0 || N == 0) return cudaSuccess;
  if (Q > 2147483647LL || C > 65535 || blocks_for(N, kLossThreads) > 65535u || N > 2147483647LL ||
      opt.nk > kMaxKs)
    return cudaErrorInvalidConfiguration;
  const bool with_grad = grad != nullptr;
  const unsigned q = static_cast<unsigned>(Q);
  compact_kernel<T><<<q, kLossThreads, 0, stream>>>(pr.scores, target, pr.ign_idx, pr.ign_mask, bad_rows, N, cols,
                                                     meta);
  dispatch_step(step, [&](auto kind) {
    constexpr int STEP = decltype(kind)::value;
    const dim3 gsum(q, static_cast<unsigned>(C));
    auto epilogue = [&](auto grad_tag) {
      constexpr bool GRAD = decltype(grad_tag)::value;
      if (opt.kind == 0) {
        sums_kernel<T, STEP, GRAD, 0><<<gsum, kLossThreads, 0, stream>>>(
            pr.scores, target, pr.ign_idx, pr.ign_mask, cols, meta, Q, N, C, plan.chunk, prm, work, part, rsum, grad);
        epilogue_kernel<T, STEP, GRAD, 0><<<q, kLossThreads, 0, stream>>>(cols, meta, opt, Q, N, C, work, part, rsum,
                                                                          score, n_pos, grad);
      } else {
        sums_kernel<T, STEP, GRAD, 1><<<gsum, kLossThreads, 0, stream>>>(
            pr.scores, target, pr.ign_idx, pr.ign_mask, cols, meta, Q, N, C, plan.chunk, prm, work, part, rsum, grad);
        epilogue_kernel<T, STEP, GRAD, 1><<<q, kLossThreads, 0, stream>>>(cols, meta, opt, Q, N, C, work, part, rsum,
                                                                          score, n_pos, grad);
      }
    };
    if (with_grad) {
      epilogue(std::integral_constant<bool, true>{});
      const dim3 ggrad(q, blocks_for(N, kLossThreads));
      grad_kernel<T, STEP><<<ggrad, kLossThreads, 0, stream>>>(pr.scores, target, pr.ign_idx, pr.ign_mask, cols, meta,
                                                               Q, N, STEP == kSigmoid && opt.kind == 0, prm, work,
                                                               grad);
    } else {
      epilogue(std::integral_constant<bool, false>{});
    }
  });
  return cudaGetLastError();
}

template cudaError_t loss_forward<float>(const ProblemView<float>&, const TargetView&, const bool*, int,
                                         StepParams<float>, const LossOptions<float>&, const LossPlan&, int32_t*,
                                         int32_t*, float*, float*, float*, float*, int64_t*, float*, cudaStream_t);
template cudaError_t loss_forward<double>(const ProblemView<double>&, const TargetView&, const bool*, int,
                                          StepParams<double>, const LossOptions<double>&, const LossPlan&, int32_t*,
                                          int32_t*, double*, double*, double*, double*, int64_t*, double*,
                                          cudaStream_t);

}  // namespace cuda
}  // namespace fastrank
