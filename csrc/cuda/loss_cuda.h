// Launchers of the fused CUDA loss kernels (ap_loss, recall_loss: loss.cu; histogram_ap_loss:
// histogram_loss.cu; graded_loss: graded_loss.cu): raw pointers, sizes
// and a stream, no torch types, so that loss.cu compiles with a plain `nvcc -c`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../problem.h"
#include "../step.h"

namespace fastrank {
namespace cuda {

// The most values of k one recall_loss call takes: they travel by value in a kernel argument
// (a host-to-device copy would synchronise the host and could not be captured in a CUDA graph).
constexpr int kMaxKs = 64;

// The scratch of one call, from the shape and the options only (never from the data):
//   cols  (Q, N) int32   the positives' columns of each row, in column order
//   meta  (Q, 2) int32   (positive count, flags) per row
//   work  (planes, Q, N) T   per-positive values: AP's coefficients (d score / d rank_all, and
//                            / d rank_pos for the sigmoid) with the gradient; Recall@k's rank_all,
//                            overwritten by its coefficient
//   part  part_elems T   partial sums of the split rows (Q, splits, sums, splits * kTileP)
//   rsum  rsum_elems T   AP: each block's sum of its finished tiles' terms (Q, splits)
struct LossPlan {
  int64_t splits;      // C: blocks per row of the sums kernel
  int64_t chunk;       // columns per block when a row's few positives are split by columns
  int64_t sums;        // sum planes: 2, + 1 (suprank) or 2 (sigmoid) with the gradient
  int64_t planes;      // work planes (0 to 2)
  int64_t part_elems;  // at least 1
  int64_t rsum_elems;  // Q * splits
};

LossPlan plan_loss(int64_t Q, int64_t N, int step, bool with_grad, int kind);

// The loss's options beyond the step: kind 0 = AP (ApEpilogue), 1 = Recall@k (RecallEpilogue
// with ks[0, nk), inv_temp = 1 / temp, clamp_hits).
template <typename T>
struct LossOptions {
  int kind;
  int64_t ks[kMaxKs];
  int64_t nk;
  T inv_temp;
  bool clamp_hits;
};

// One fused loss call: score (Q,), n_pos (Q,) and, when grad != nullptr, the gradient rows (Q, N).
// bad_rows (Q,) or nullptr: rows whose target is invalid (a NaN relevance; the glue's device
// pass), made NaN as an out-of-range ignore index is. Three launches, four with the gradient,
// all on `stream`; no host synchronisation. Returns the launch error, if any.
template <typename T>
cudaError_t loss_forward(const ProblemView<T>& pr, const TargetView& target, const bool* bad_rows, int step,
                         StepParams<T> prm, const LossOptions<T>& opt, const LossPlan& plan, int32_t* cols,
                         int32_t* meta, T* work, T* part, T* rsum, T* score, int64_t* n_pos, T* grad,
                         cudaStream_t stream);

// The most bins the fused histogram AP op takes on CUDA: a row's histograms live in shared memory,
// (2 * 8 + 4) * bins values (fastrank.histogram_ap runs larger ones on the two-pass kernels).
constexpr int64_t kMaxFusedBins = 256;

// The split of a fused histogram AP call, from the shape only: C = splits blocks per row of chunk
// columns each (C = 1 with enough rows: one launch, no scratch); with C > 1 the scratch holds
// scratch_elems values of T (partial histograms (Q, C, 2, L), with the gradient the per-bin
// derivatives (Q, 2, L)) and int_elems ints (partial counts (Q, C, 2), row states (Q, 2)).
struct HistLossPlan {
  int64_t splits;
  int64_t chunk;
  int64_t scratch_elems;  // at least 1
  int64_t int_elems;      // at least 1
};

HistLossPlan plan_histogram_loss(int64_t Q, int64_t N, int64_t bins, bool with_grad);

// One fused histogram AP call (histogram_loss.cu), kind 0 = FastAP, 1 = SoftBin, the bins as
// histogram_fwd's (v = scale * s + shift on centres 0..bins-1); outputs and bad_rows as
// loss_forward's. One launch on `stream` (three when the plan splits rows), no host
// synchronisation.
template <typename T>
cudaError_t histogram_loss_forward(const ProblemView<T>& pr, const TargetView& target, const bool* bad_rows,
                                   int64_t bins, T scale, T shift, bool open_ends, int kind,
                                   const HistLossPlan& plan, T* scratch, int* int_scratch, T* score,
                                   int64_t* n_pos, T* grad, cudaStream_t stream);

// The scratch of one fused graded loss call (graded_loss.cu), from the shape and the options only:
//   cols (Q, N) int32, meta (Q, 2) int32 as LossPlan's;
//   work (planes, Q, N) T: rank_all (then d score / d rank_all), rank_pos (then d score / d
//        rank_pos), with the gradient S1 and (sigmoid or hrank) S2, for NDCG the ideal place;
//   part part_elems T: partial sums of the split rows (Q, splits, planes, splits * tile).
struct GradedLossPlan {
  int64_t splits;
  int64_t chunk;
  int64_t planes;      // 2 to 5
  int64_t part_elems;  // at least 1
};

GradedLossPlan plan_graded_loss(int64_t Q, int64_t N, int step, bool with_grad, bool ndcg, bool hrank);

// One fused graded loss call, H-AP (ndcg = false) or NDCG: rel (Q, N) and key (Q, N) or nullptr
// (the relevance is the key) in the dtype of scores; hr the smoothed H-rank (suprank only).
// A relevance that is not finite, negative, in (0, rel_tiny) or >= rel_limit, or a key that is
// not finite, makes its query NaN (no error: that would need a sync). Outputs as loss_forward's.
// Three launches, four with the gradient, on `stream`; no host synchronisation.
template <typename T>
cudaError_t graded_loss_forward(const ProblemView<T>& pr, const T* rel, const T* key, int step, StepParams<T> prm,
                                HRankParams<T> hr, bool ndcg, T rel_limit, T rel_tiny, const GradedLossPlan& plan,
                                int32_t* cols, int32_t* meta, T* work, T* part, T* score, int64_t* n_pos, T* grad,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace fastrank
