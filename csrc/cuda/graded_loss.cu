// Fused CUDA graded loss kernels: graded_loss (H-AP kind 0, NDCG kind 1) from the dense relevance
// as given, the CUDA twin of the C++ op (cpu/graded_rank_sums.cpp, graded_loss_rows) and of the
// fused Triton kernels (triton_kernels/graded_loss.py), docs/design.md §2.4. No torch headers: the
// glue is loss_op.cpp. Step arithmetic from ../step.h, the epilogue terms (ap_term, ndcg_term and
// their derivatives) from ../epilogue.h; only the loop structure is here.
//
// Per call, whatever the data: three launches, four with the gradient, on the caller's stream, no
// host synchronisation, no float atomics (one writer per value, fixed summation order).
//
// 1. compact_kernel, grid (Q,): the ranked items of each row (valid, relevance > 0) in column
//    order into cols (Q, N) int32 and meta[i] = (count, flags): bit 1 = a NaN among the row's valid
//    scores; bit 2 = invalid input, the checks the CPU op raises on: a relevance anywhere in the
//    row that is not finite, negative, a positive subnormal or (NDCG) >= log2(max) of the dtype,
//    a key that is not finite, an ignore index outside [-1, N).
// 2. sums_kernel, grid (Q, C): per ranked item j (relevance r_j, ordering key q_j: the relevance
//    unless a key is given) over every valid k, j included, d = s_k - s_j, w = min(r_j, r_k):
//        sigmoid: rank_all_j = sum sigma(d),   rank_pos_j = sum w sigma(d)   (+ 1/2, + r_j / 2 in 3)
//                 S1_j = sum sigma'(d),        S2_j = sum w sigma'(d)
//        suprank: rank_all_j = sum [q_k >= q_j] H(d) + [q_k < q_j] H^-(d)
//                 rank_pos_j = sum w h(d), h = h+ (HAPPIER's smoothed H-rank, ../step.h) where
//                              hrank and q_k > q_j, H elsewhere
//                 S1_j = sum [q_k < q_j] H^-'(d),  S2_j = sum [q_k > q_j] w h+'(d) (hrank only)
//    and for NDCG j's place in the ideal ordering, #{k ranked: r_k > r_j, or r_k = r_j and
//    k < j} (the stable sort the CPU op makes). kTileP ranked items per sweep; the split of a
//    row across C blocks is that of loss.cu (tiles dealt round-robin, or chunks of columns into
//    partial sums that kernel 3 adds in the order c = 0..C-1).
// 3. epilogue_kernel, grid (Q,): the partials reduced; one thread sums the row's terms in order
//    (H-AP: sum_j ap_term / sum_j r_j; NDCG: DCG / IDCG with the gains divided by the row's
//    largest); with the gradient every thread takes ranked items: a_j = d score / d rank_all_j,
//    b_j = d score / d rank_pos_j over planes 0 and 1, -own_j = -(a_j S1_j + b_j S2_j) at j's
//    column of the gradient row.
// 4. grad_kernel, grid (Q, cdiv(N, kThreads)): per valid column k,
//        sigmoid: sum_j (a_j + b_j w) sigma'(s_k - s_j)
//        suprank: sum_j [q_k < q_j] a_j H^-'(s_k - s_j) + [q_k > q_j] b_j w h+'(s_k - s_j)
//    plus the -own_k kernel 3 left at a ranked column; 0 at a left-out column.
//
// Rows: no ranked item: score 0, zero gradient row. NaN row (bit 1): score NaN, gradient NaN at
// the valid columns when it has ranked items (0 without). Invalid row (bit 2): score NaN, all-NaN
// gradient row (where the CPU op raises; raising would need a sync).
//
// Memory beyond scores and gradient rows: the int32 columns and `planes` (Q, N) planes of T
// (rank_all, rank_pos, with the gradient S1 and, sigmoid or hrank, S2; NDCG's place), since the
// ranked count is known only on the device; plus the split partials. 64-bit offsets.
#include <cuda_runtime.h>

#include "../epilogue.h"
#include "../step.h"
#include "common.cuh"
#include "loss_cuda.h"

namespace fastrank {
namespace cuda {
namespace graded_loss {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileP = 4;  // ranked items per sweep (up to 5 sums each)
constexpr int64_t kTargetBlocks = 2048;
constexpr int64_t kMinChunk = 2048;
constexpr int kFlagNan = 1;
constexpr int kFlagInvalid = 2;

// the work planes: rank_all (then a), rank_pos (then b), S1, S2, NDCG's place
template <int STEP, bool GRAD, bool NDCG, bool HRANK>
struct Planes {
  static constexpr bool kHasS2 = GRAD && (STEP == kSigmoid || HRANK);
  static constexpr int kS1 = 2;
  static constexpr int kS2 = 3;
  static constexpr int value = 2 + (GRAD ? 1 : 0) + (kHasS2 ? 1 : 0) + (NDCG ? 1 : 0);
  static constexpr int kPlace = value - 1;
};

template <typename T>
__device__ __forceinline__ T min_rel(T x, T y) {
  return x < y ? x : y;  // relevance is finite in a row that gets here (kernel 1 flags the others)
}

// ---------------------------------------------------------------- 1. flags and ranked items

template <typename T>
__global__ void __launch_bounds__(kThreads)
    compact_kernel(const T* __restrict__ scores, const T* __restrict__ rel, const T* __restrict__ key,
                   const int64_t* __restrict__ ign_idx, const bool* __restrict__ ign_mask, int64_t N, T limit,
                   T tiny, int32_t* __restrict__ cols, int32_t* __restrict__ meta) {
  __shared__ int warp_counts[kWarps];
  const int64_t i = blockIdx.x;
  const int64_t ign = ign_idx != nullptr ? ign_idx[i] : -1;
  const T* s = scores + i * N;
  const T* r = rel + i * N;
  const T* kr = key != nullptr ? key + i * N : nullptr;
  int32_t* c = cols + i * N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int count = 0;
  int nan = 0, bad = 0;
  for (int64_t k0 = 0; k0 < N; k0 += kThreads) {
    const int64_t k = k0 + threadIdx.x;
    bool ranked = false;
    if (k < N) {
      const T v = r[k];
      // as the CPU op's relevance_status: over the whole row, left-out items included
      bad |= (!isfinite(v) || v < T(0) || (v > T(0) && v < tiny) || v >= limit) ? 1 : 0;
      if (kr != nullptr) bad |= isfinite(kr[k]) ? 0 : 1;
      const bool valid = is_valid(i, k, N, ign, ign_mask);
      nan |= valid && isnan(s[k]) ? 1 : 0;
      ranked = valid && v > T(0);
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, ranked);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = count, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      total += warp_counts[w];
    }
    if (ranked) c[before + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int32_t>(k);
    count += total;
    __syncthreads();  // warp_counts is rewritten by the next tile
  }
  nan = __syncthreads_or(nan);
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    const bool invalid = bad || ign < -1 || ign >= N;
    meta[2 * i] = count;
    meta[2 * i + 1] = (nan ? kFlagNan : 0) | (invalid ? kFlagInvalid : 0);
  }
}

// ---------------------------------------------------------------- 2. sums per ranked item

template <typename T, int STEP, bool GRAD, bool NDCG, bool HRANK>
__global__ void __launch_bounds__(kThreads)
    sums_kernel(const T* __restrict__ scores, const T* __restrict__ rel, const T* __restrict__ key,
                const int64_t* __restrict__ ign_idx, const bool* __restrict__ ign_mask,
                const int32_t* __restrict__ cols, const int32_t* __restrict__ meta, int64_t Q, int64_t N, int64_t C,
                int64_t CH, StepParams<T> prm, HRankParams<T> hr, T* __restrict__ work, T* __restrict__ part) {
  using Pl = Planes<STEP, GRAD, NDCG, HRANK>;
  constexpr int NB = Pl::value;
  constexpr int M = NB * kTileP;
  __shared__ T red[M * kWarps];
  const int64_t i = blockIdx.x;
  const int64_t c = blockIdx.y;
  const int64_t count = meta[2 * i];
  if (count == 0 || meta[2 * i + 1] != 0) return;  // the whole block: no partial syncs
  const int64_t ign = ign_idx != nullptr ? ign_idx[i] : -1;
  const T* s = scores + i * N;
  const T* r = rel + i * N;
  const T* kr = (key != nullptr ? key : rel) + i * N;
  const int32_t* pc = cols + i * N;
  const int64_t plane = Q * N;
  const int64_t n_tiles = (count + kTileP - 1) / kTileP;
  const bool by_tiles = n_tiles >= C;
  const int64_t k_lo = by_tiles ? 0 : c * CH;
  const int64_t k_hi = by_tiles ? N : (k_lo + CH < N ? k_lo + CH : N);
  const int64_t pw = C * kTileP;  // the partials' row width (count < C * kTileP in that mode)
  for (int64_t t = by_tiles ? c : 0; t < n_tiles; t += by_tiles ? C : 1) {
    T sj[kTileP], rj[kTileP], kj[kTileP];
    int64_t jj[kTileP];
    bool ties = false;
#pragma unroll
    for (int p = 0; p < kTileP; ++p) {
      const int64_t q = t * kTileP + p;
      jj[p] = q < count ? pc[q] : -1;
      sj[p] = jj[p] >= 0 ? s[jj[p]] : T(0);
      rj[p] = jj[p] >= 0 ? r[jj[p]] : T(0);
      kj[p] = jj[p] >= 0 ? kr[jj[p]] : T(0);
      ties |= isinf(sj[p]);
    }
    T acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = T(0);
    for (int64_t k = k_lo + threadIdx.x; k < k_hi; k += kThreads) {
      if (!is_valid(i, k, N, ign, ign_mask)) continue;
      const T sk = s[k];
      const T rk = r[k];
      const T kk = kr[k];
#pragma unroll
      for (int p = 0; p < kTileP; ++p) {
        const T draw = sk - sj[p];
        const T d = ties ? step_diff(sk, sj[p]) : draw;
        const T w = min_rel(rj[p], rk);
        if (STEP == kSigmoid) {
          const T g = sigmoid_tau(d, prm.inv_tau);
          acc[p] += g;
          acc[kTileP + p] += w * g;
          if (GRAD) {
            const T g1 = sigmoid_tau_grad(draw, prm.inv_tau);
            const T gd = ties ? tied_grad(draw, g1) : g1;
            acc[Pl::kS1 * kTileP + p] += gd;
            acc[Pl::kS2 * kTileP + p] += w * gd;
          }
        } else {
          const T h = heaviside(d);
          const bool up = HRANK && kk > kj[p];
          acc[p] += kk >= kj[p] ? h : suprank_neg(d, prm);
          acc[kTileP + p] += w * (up ? hrank_plus(d, hr) : h);
          if (GRAD) {
            if (kk < kj[p]) {
              const T g1 = suprank_neg_grad(draw, prm);
              acc[Pl::kS1 * kTileP + p] += ties ? tied_grad(draw, g1) : g1;
            }
            if (Pl::kHasS2 && up) {
              const T g1 = hrank_plus_grad(d, hr);
              acc[Pl::kS2 * kTileP + p] += w * (ties ? tied_grad(draw, g1) : g1);
            }
          }
        }
        if (NDCG && rk > T(0) && (rk > rj[p] || (rk == rj[p] && k < jj[p]))) acc[Pl::kPlace * kTileP + p] += T(1);
      }
    }
    const T total = block_sums<M, kThreads>(acc, red);
    if (threadIdx.x < M) {
      const int64_t b = threadIdx.x / kTileP, q = t * kTileP + threadIdx.x % kTileP;
      if (q < count) {
        if (by_tiles)
          work[b * plane + i * N + q] = total;
        else
          part[((i * C + c) * NB + b) * pw + q] = total;
      }
    }
  }
}

// ---------------------------------------------------------------- 3. epilogue

template <typename T, int STEP, bool GRAD, bool NDCG, bool HRANK>
__global__ void __launch_bounds__(kThreads)
    epilogue_kernel(const T* __restrict__ rel, const int32_t* __restrict__ cols, const int32_t* __restrict__ meta,
                    int64_t Q, int64_t N, int64_t C, T* __restrict__ work, const T* __restrict__ part,
                    T* __restrict__ score, int64_t* __restrict__ n_pos, T* __restrict__ grad) {
  using Pl = Planes<STEP, GRAD, NDCG, HRANK>;
  constexpr int NB = Pl::value;
  // the sigmoid's sweep counted sigma(0) = 1/2 for j itself, where the ranks have 1 and r_j
  const T self = STEP == kSigmoid ? T(0.5) : T(0);
  __shared__ T norm[2];  // H-AP: 1 / sum_j r_j; NDCG: the gains' scale and IDCG
  const int64_t i = blockIdx.x;
  const int64_t count = meta[2 * i];
  const int flags = meta[2 * i + 1];
  if (threadIdx.x == 0) n_pos[i] = count;
  if (flags != 0 || count == 0) {
    if (threadIdx.x == 0) score[i] = flags != 0 ? T(NAN) : T(0);
    return;
  }
  const int64_t plane = Q * N;
  const int64_t n_tiles = (count + kTileP - 1) / kTileP;
  const int64_t pw = C * kTileP;
  const int32_t* pc = cols + i * N;
  const T* r = rel + i * N;
  T* row = work + i * N;
  if (n_tiles < C) {
    // a split row: the partials of the C chunk blocks, in the order c = 0..C-1
    for (int64_t p = threadIdx.x; p < count; p += kThreads) {
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        T v = T(0);
        for (int64_t c = 0; c < C; ++c) v += part[((i * C + c) * NB + b) * pw + p];
        row[b * plane + p] = v;
      }
    }
  }
  __syncthreads();  // the planes, written by the whole block, are read by thread 0
  if (threadIdx.x == 0) {
    T value = T(0);
    if (NDCG) {
      T top = T(0);
      for (int64_t p = 0; p < count; ++p) top = r[pc[p]] > top ? r[pc[p]] : top;
      top = ndcg_gain(top);
      top = top > T(0) ? top : T(1);
      T dcg = T(0), idcg = T(0);
      for (int64_t p = 0; p < count; ++p) {
        const T gn = ndcg_gain(r[pc[p]]) / top;
        dcg += ndcg_term(gn, row[p] + self);
        idcg += ndcg_term(gn, row[Pl::kPlace * plane + p] + T(1));
      }
      value = idcg > T(0) ? dcg / idcg : T(0);
      norm[0] = top;
      norm[1] = idcg;
    } else {
      T total = T(0);
      for (int64_t p = 0; p < count; ++p) {
        const T rj = r[pc[p]];
        total += rj;
        value += ap_term(row[plane + p] + self * rj, row[p] + self);
      }
      value /= total;
      norm[0] = T(1) / total;
    }
    score[i] = value;
  }
  if (!GRAD) return;
  __syncthreads();
  T* grad_row = grad + i * N;
  for (int64_t p = threadIdx.x; p < count; p += kThreads) {
    const int32_t col = pc[p];
    const T rj = r[col];
    const T ra = row[p] + self;
    T a, b;
    if (NDCG) {
      a = ndcg_term_grad(ndcg_gain(rj) / norm[0], ra, norm[1]);
      b = T(0);
    } else {
      ap_term_grad(row[plane + p] + self * rj, ra, norm[0], a, b);
    }
    const T s2 = Pl::kHasS2 ? row[Pl::kS2 * plane + p] : T(0);
    row[p] = a;
    row[plane + p] = b;
    grad_row[col] = -(a * row[Pl::kS1 * plane + p] + b * s2);
  }
}

// ---------------------------------------------------------------- 4. gradient rows

template <typename T, int STEP, bool HRANK>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const T* __restrict__ scores, const T* __restrict__ rel, const T* __restrict__ key,
                const int64_t* __restrict__ ign_idx, const bool* __restrict__ ign_mask,
                const int32_t* __restrict__ cols, const int32_t* __restrict__ meta, int64_t Q, int64_t N,
                StepParams<T> prm, HRankParams<T> hr, const T* __restrict__ work, T* __restrict__ grad) {
  // b_j matters to the sigmoid and to the H-rank (suprank's exact H has no gradient)
  constexpr bool kNeedB = STEP == kSigmoid || HRANK;
  __shared__ T s_sj[kThreads];
  __shared__ T s_rj[kThreads];
  __shared__ T s_kj[kThreads];
  __shared__ T s_a[kThreads];
  __shared__ T s_b[kThreads];
  const int64_t i = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t count = meta[2 * i];
  const int flags = meta[2 * i + 1];
  const int64_t ign = ign_idx != nullptr ? ign_idx[i] : -1;
  const bool valid = k < N && is_valid(i, k, N, ign, ign_mask);
  T* out = grad + i * N + k;
  // the row's state is the same for the whole block: these returns skip no barrier
  if (flags & kFlagInvalid) {
    if (k < N) *out = T(NAN);
    return;
  }
  if (flags != 0) {
    if (k < N) *out = valid && count > 0 ? T(NAN) : T(0);
    return;
  }
  if (count == 0) {
    if (k < N) *out = T(0);
    return;
  }
  const T* s = scores + i * N;
  const T* r = rel + i * N;
  const T* kr = (key != nullptr ? key : rel) + i * N;
  const T* A = work + i * N;
  const T* B = work + Q * N + i * N;
  const T sk = valid ? s[k] : T(0);
  const T rk = valid ? r[k] : T(0);
  const T kk = valid ? kr[k] : T(0);
  const bool ties = isinf(sk);  // only an infinite competitor ties with a ranked item at inf
  T acc = T(0);
  for (int64_t p0 = 0; p0 < count; p0 += kThreads) {
    const int64_t p = p0 + threadIdx.x;
    const int64_t j = p < count ? cols[i * N + p] : -1;
    // past the count: a = b = 0, and key -inf so that no key comparison of suprank holds
    s_sj[threadIdx.x] = j >= 0 ? s[j] : T(0);
    s_rj[threadIdx.x] = j >= 0 ? r[j] : T(0);
    s_kj[threadIdx.x] = j >= 0 ? kr[j] : T(-INFINITY);
    s_a[threadIdx.x] = j >= 0 ? A[p] : T(0);
    if (kNeedB) s_b[threadIdx.x] = j >= 0 ? B[p] : T(0);
    __syncthreads();
    const int64_t n = count - p0 < kThreads ? count - p0 : kThreads;
    if (valid) {
      for (int64_t t = 0; t < n; ++t)
        acc += graded_pair_grad<T, STEP>(sk, s_sj[t], rk, s_rj[t], kk, s_kj[t], s_a[t], s_b[t], ties, HRANK, prm, hr);
    }
    __syncthreads();
  }
  // a ranked column holds -own from kernel 3
  if (k < N) *out = !valid ? T(0) : rk > T(0) ? acc + *out : acc;
}

}  // namespace graded_loss

GradedLossPlan plan_graded_loss(int64_t Q, int64_t N, int step, bool with_grad, bool ndcg, bool hrank) {
  using namespace graded_loss;
  GradedLossPlan p;
  const int64_t per_row = (kTargetBlocks + (Q > 0 ? Q : 1) - 1) / (Q > 0 ? Q : 1);
  const int64_t by_len = N / kMinChunk;
  p.splits = per_row < by_len ? per_row : by_len;
  if (p.splits < 1) p.splits = 1;
  p.chunk = (N + p.splits - 1) / p.splits;
  const bool s2 = with_grad && (step == kSigmoid || hrank);
  p.planes = 2 + (with_grad ? 1 : 0) + (s2 ? 1 : 0) + (ndcg ? 1 : 0);
  p.part_elems = p.splits > 1 ? Q * p.splits * p.planes * p.splits * kTileP : 1;
  return p;
}

template <typename T>
cudaError_t graded_loss_forward(const ProblemView<T>& pr, const T* rel, const T* key, int step, StepParams<T> prm,
                                HRankParams<T> hr, bool ndcg, T rel_limit, T rel_tiny, const GradedLossPlan& plan,
                                int32_t* cols, int32_t* meta, T* work, T* part, T* score, int64_t* n_pos, T* grad,
                                cudaStream_t stream) {
  using namespace graded_loss;
  const int64_t Q = pr.Q, N = pr.N, C = plan.splits;
  if (Q == 0 || N == 0) return cudaSuccess;
  if (Q > 2147483647LL || C > 65535 || blocks_for(N, kThreads) > 65535u || N > 2147483647LL)
    return cudaErrorInvalidConfiguration;
  if (hr.on && step != kSupRank) return cudaErrorInvalidValue;
  const bool with_grad = grad != nullptr;
  const unsigned q = static_cast<unsigned>(Q);
  compact_kernel<T><<<q, kThreads, 0, stream>>>(pr.scores, rel, key, pr.ign_idx, pr.ign_mask, N, rel_limit, rel_tiny,
                                                cols, meta);
  const dim3 gsum(q, static_cast<unsigned>(C));
  const dim3 ggrad(q, blocks_for(N, kThreads));
  // every (step, gradient, NDCG, H-rank) variant a constexpr; the H-rank exists for suprank only
  auto launch = [&](auto step_tag, auto grad_tag, auto ndcg_tag, auto hrank_tag) {
    constexpr int STEP = decltype(step_tag)::value;
    constexpr bool GRAD = decltype(grad_tag)::value;
    constexpr bool NDCG = decltype(ndcg_tag)::value;
    constexpr bool HRANK = decltype(hrank_tag)::value;
    sums_kernel<T, STEP, GRAD, NDCG, HRANK><<<gsum, kThreads, 0, stream>>>(
        pr.scores, rel, key, pr.ign_idx, pr.ign_mask, cols, meta, Q, N, C, plan.chunk, prm, hr, work, part);
    epilogue_kernel<T, STEP, GRAD, NDCG, HRANK><<<q, kThreads, 0, stream>>>(rel, cols, meta, Q, N, C, work, part,
                                                                           score, n_pos, grad);
    if (GRAD)
      grad_kernel<T, STEP, HRANK><<<ggrad, kThreads, 0, stream>>>(pr.scores, rel, key, pr.ign_idx, pr.ign_mask, cols,
                                                                  meta, Q, N, prm, hr, work, grad);
  };
  using True = std::integral_constant<bool, true>;
  using False = std::integral_constant<bool, false>;
  auto with_flags = [&](auto step_tag, auto hrank_tag) {
    if (with_grad)
      ndcg ? launch(step_tag, True{}, True{}, hrank_tag) : launch(step_tag, True{}, False{}, hrank_tag);
    else
      ndcg ? launch(step_tag, False{}, True{}, hrank_tag) : launch(step_tag, False{}, False{}, hrank_tag);
  };
  if (step == kSigmoid)
    with_flags(std::integral_constant<int, kSigmoid>{}, False{});
  else if (hr.on)
    with_flags(std::integral_constant<int, kSupRank>{}, True{});
  else
    with_flags(std::integral_constant<int, kSupRank>{}, False{});
  return cudaGetLastError();
}

template cudaError_t graded_loss_forward<float>(const ProblemView<float>&, const float*, const float*, int,
                                                StepParams<float>, HRankParams<float>, bool, float, float,
                                                const GradedLossPlan&, int32_t*, int32_t*, float*, float*, float*,
                                                int64_t*, float*, cudaStream_t);
template cudaError_t graded_loss_forward<double>(const ProblemView<double>&, const double*, const double*, int,
                                                 StepParams<double>, HRankParams<double>, bool, double, double,
                                                 const GradedLossPlan&, int32_t*, int32_t*, double*, double*,
                                                 double*, int64_t*, double*, cudaStream_t);

}  // namespace cuda
}  // namespace fastrank
