// Argument checks and contiguous copies shared by every op's torch glue (CPU and CUDA).
// Torch headers: for .cpp glue only, never for .cu files.
#pragma once

#include <torch/types.h>

#include <cmath>
#include <limits>
#include <optional>

#include "step.h"

namespace fastrank {

// The packed problem every kernel takes (see fastrank/_problem.py), made contiguous.
struct PackedProblem {
  at::Tensor scores;                  // (Q, N) float32/float64
  at::Tensor pos_idx;                 // (Q, P) int64 in [-1, N)
  std::optional<at::Tensor> ign_idx;  // (Q,) int64 in [-1, N)
  std::optional<at::Tensor> ign_mask; // (Q, N) bool
};

inline void check_index_range(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  if (t.numel() == 0) return;
  const int64_t lo = t.min().item<int64_t>(), hi = t.max().item<int64_t>();
  TORCH_CHECK(lo >= -1 && hi < n, op, ": ", name, " entries must lie in [-1, N) with N = ", n, ", got [", lo, ", ",
              hi, "]");
}

inline PackedProblem check_problem(const char* op, c10::DeviceType device, const at::Tensor& scores,
                                   const at::Tensor& pos_idx, const std::optional<at::Tensor>& ign_idx,
                                   const std::optional<at::Tensor>& ign_mask) {
  TORCH_CHECK(scores.device().type() == device, op, ": scores must be on ", device, ", got ", scores.device());
  TORCH_CHECK(scores.dim() == 2, op, ": scores must be 2-D (Q, N), got shape ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble, op,
              ": scores must be float32 or float64, got ", scores.scalar_type());
  const int64_t Q = scores.size(0), N = scores.size(1);
  TORCH_CHECK(pos_idx.device() == scores.device(), op, ": pos_idx must be on the device of scores (",
              scores.device(), "), got ", pos_idx.device());
  TORCH_CHECK(pos_idx.scalar_type() == at::kLong && pos_idx.dim() == 2 && pos_idx.size(0) == Q, op,
              ": pos_idx must be int64 of shape (Q, P) with Q = ", Q, ", got ", pos_idx.scalar_type(), " ",
              pos_idx.sizes());
  check_index_range(op, "pos_idx", pos_idx, N);
  if (ign_idx.has_value()) {
    const auto& t = *ign_idx;
    TORCH_CHECK(t.device() == scores.device() && t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == Q, op,
                ": ignore_idx must be an int64 tensor of shape (", Q, ",) on the device of scores, got ",
                t.scalar_type(), " ", t.sizes(), " on ", t.device());
    check_index_range(op, "ignore_idx", t, N);
  }
  if (ign_mask.has_value()) {
    const auto& t = *ign_mask;
    TORCH_CHECK(t.device() == scores.device() && t.scalar_type() == at::kBool && t.sizes() == scores.sizes(), op,
                ": ignore_mask must be a bool tensor of shape ", scores.sizes(), " on the device of scores, got ",
                t.scalar_type(), " ", t.sizes(), " on ", t.device());
  }
  PackedProblem p{scores.contiguous(), pos_idx.contiguous(), std::nullopt, std::nullopt};
  if (ign_idx.has_value()) p.ign_idx = ign_idx->contiguous();
  if (ign_mask.has_value()) p.ign_mask = ign_mask->contiguous();
  return p;
}

// The step id and temperature of the rank-sums ops (binary and graded).
inline void check_step(const char* op, int64_t step, double tau) {
  TORCH_CHECK(step == kSigmoid || step == kSupRank, op, ": unknown step id ", step);
  TORCH_CHECK(tau > 0, op, ": tau must be > 0, got ", tau);
}

// Rows holding a NaN among their valid scores (nullopt when no score is NaN); `valid_out`
// gets the (Q, N) valid mask when a NaN row exists. One device sync (the any()).
inline std::optional<at::Tensor> nan_rows(const at::Tensor& scores, const std::optional<at::Tensor>& ign_idx,
                                          const std::optional<at::Tensor>& ign_mask, at::Tensor* valid_out) {
  at::Tensor bad = at::isnan(scores);
  if (!bad.any().item<bool>()) return std::nullopt;
  const int64_t Q = scores.size(0), N = scores.size(1);
  // one spare column N takes the scatter of ign_idx = -1 (no ignored item)
  at::Tensor valid = at::ones({Q, N + 1}, scores.options().dtype(at::kBool));
  if (ign_idx.has_value()) {
    at::Tensor col = at::where(*ign_idx >= 0, *ign_idx, at::full_like(*ign_idx, N)).unsqueeze(1);
    valid.scatter_(1, col, false);
  }
  valid = valid.slice(1, 0, N);
  if (ign_mask.has_value()) valid = valid & ign_mask->logical_not();
  *valid_out = valid;
  return (bad & valid).any(1);
}

// Kernels whose clamps or exact steps could hide a NaN (the CUDA ones) make the rows that
// hold one NaN explicitly, as the CPU kernels do: the ranked (non-hole) outputs of the
// forward ...
inline void fill_nan_rows_forward(const PackedProblem& pp, at::Tensor& out0, at::Tensor& out1) {
  at::Tensor valid;
  if (auto rows = nan_rows(pp.scores, pp.ign_idx, pp.ign_mask, &valid)) {
    const at::Tensor fill = rows->unsqueeze(1) & (pp.pos_idx >= 0);
    out0.masked_fill_(fill, std::numeric_limits<double>::quiet_NaN());
    out1.masked_fill_(fill, std::numeric_limits<double>::quiet_NaN());
  }
}

// ... and the gradient at the valid entries of those rows that rank something.
inline void fill_nan_rows_backward(const PackedProblem& pp, at::Tensor& grad) {
  at::Tensor valid;
  if (auto rows = nan_rows(pp.scores, pp.ign_idx, pp.ign_mask, &valid)) {
    const at::Tensor has_pos = (pp.pos_idx >= 0).any(1);
    grad.masked_fill_((*rows & has_pos).unsqueeze(1) & valid, std::numeric_limits<double>::quiet_NaN());
  }
}

// Graded relevance (Q, N) next to the packed problem: same shape, device and dtype as
// scores (the Python layer casts it), finite and >= 0. Returns a contiguous copy.
// Checking values costs one pass over (Q, N), small next to the O(Q P N) kernels, and
// keeps a direct torch.ops call from turning a negative or NaN relevance into a number.
// `values = false` skips the value pass: for a backward, whose forward checked the same tensor.
inline at::Tensor check_relevance(const char* op, const at::Tensor& relevance, const at::Tensor& scores,
                                  bool values = true) {
  TORCH_CHECK(relevance.device() == scores.device(), op, ": relevance must be on the device of scores (",
              scores.device(), "), got ", relevance.device());
  TORCH_CHECK(relevance.sizes() == scores.sizes(), op, ": relevance must have the shape of scores ", scores.sizes(),
              ", got ", relevance.sizes());
  TORCH_CHECK(relevance.scalar_type() == scores.scalar_type(), op, ": relevance must have the dtype of scores (",
              scores.scalar_type(), "), got ", relevance.scalar_type());
  if (values && relevance.numel() > 0) {
    // one reduction pass; aminmax propagates NaN (isfinite().all() would take three)
    const auto mm = at::aminmax(relevance);
    const double lo = std::get<0>(mm).item<double>(), hi = std::get<1>(mm).item<double>();
    TORCH_CHECK(std::isfinite(lo) && std::isfinite(hi), op, ": relevance must be finite (no NaN or inf)");
    TORCH_CHECK(lo >= 0.0, op, ": relevance must be >= 0, got a minimum of ", lo);
  }
  return relevance.contiguous();
}

}  // namespace fastrank
