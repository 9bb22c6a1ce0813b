// Argument checks and contiguous copies shared by every op's torch glue (CPU and CUDA).
// Torch headers: for .cpp glue only, never for .cu files.
//
// The ops are public surface (torch.ops.fastrank.*): they check what the Python layer
// guarantees, cheaply (O(Q * P) beyond the index range pass), and raise ValueError /
// TypeError (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) naming the argument.
#pragma once

#include <torch/types.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "problem.h"
#include "step.h"

namespace fastrank {

// The packed problem every kernel takes (see fastrank/_problem.py), made contiguous.
struct PackedProblem {
  at::Tensor scores;                  // (Q, N) float32/float64
  at::Tensor pos_idx;                 // (Q, P) int64 in [-1, N)
  std::optional<at::Tensor> ign_idx;  // (Q,) int64 in [-1, N)
  std::optional<at::Tensor> ign_mask; // (Q, N) bool
};

// The kernels' view of a checked problem (its tensors contiguous, as check_problem returns them).
template <typename T>
ProblemView<T> problem_view(const PackedProblem& pp) {
  return ProblemView<T>{pp.scores.data_ptr<T>(),
                        pp.pos_idx.data_ptr<int64_t>(),
                        pp.ign_idx.has_value() ? pp.ign_idx->data_ptr<int64_t>() : nullptr,
                        pp.ign_mask.has_value() ? pp.ign_mask->data_ptr<bool>() : nullptr,
                        pp.scores.size(0),
                        pp.scores.size(1),
                        pp.pos_idx.size(1)};
}

inline void check_index_range(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  if (t.numel() == 0) return;
  const int64_t lo = t.min().item<int64_t>(), hi = t.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= -1 && hi < n, op, ": ", name, " entries must lie in [-1, N) with N = ", n, ", got [", lo, ", ",
              hi, "]");
}

// scores (Q, N) float32/float64 on `device`, and the ignore arguments of every op.
// check_values=false leaves the ignore index's range to the kernels (the CUDA loss ops flag an
// out-of-range entry in device memory: the range check's .item() would synchronise the host).
inline void check_scores_and_ignore(const char* op, c10::DeviceType device, const at::Tensor& scores,
                                    const std::optional<at::Tensor>& ign_idx,
                                    const std::optional<at::Tensor>& ign_mask, bool check_values = true) {
  TORCH_CHECK_VALUE(scores.device().type() == device, op, ": scores must be on ", device, ", got ", scores.device());
  TORCH_CHECK_VALUE(scores.dim() == 2, op, ": scores must be 2-D (Q, N), got shape ", scores.sizes());
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble, op,
              ": scores must be float32 or float64, got ", scores.scalar_type());
  const int64_t Q = scores.size(0), N = scores.size(1);
  if (ign_idx.has_value()) {
    const auto& t = *ign_idx;
    TORCH_CHECK_VALUE(t.device() == scores.device() && t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == Q, op,
                ": ignore_idx must be an int64 tensor of shape (", Q, ",) on the device of scores, got ",
                t.scalar_type(), " ", t.sizes(), " on ", t.device());
    if (check_values) check_index_range(op, "ignore_idx", t, N);
  }
  if (ign_mask.has_value()) {
    const auto& t = *ign_mask;
    TORCH_CHECK_VALUE(t.device() == scores.device() && t.scalar_type() == at::kBool && t.sizes() == scores.sizes(), op,
                ": ignore_mask must be a bool tensor of shape ", scores.sizes(), " on the device of scores, got ",
                t.scalar_type(), " ", t.sizes(), " on ", t.device());
  }
}

inline PackedProblem check_problem(const char* op, c10::DeviceType device, const at::Tensor& scores,
                                   const at::Tensor& pos_idx, const std::optional<at::Tensor>& ign_idx,
                                   const std::optional<at::Tensor>& ign_mask) {
  check_scores_and_ignore(op, device, scores, ign_idx, ign_mask);
  const int64_t Q = scores.size(0), N = scores.size(1);
  TORCH_CHECK_VALUE(pos_idx.device() == scores.device(), op, ": pos_idx must be on the device of scores (",
              scores.device(), "), got ", pos_idx.device());
  TORCH_CHECK_VALUE(pos_idx.scalar_type() == at::kLong && pos_idx.dim() == 2 && pos_idx.size(0) == Q, op,
              ": pos_idx must be int64 of shape (Q, P) with Q = ", Q, ", got ", pos_idx.scalar_type(), " ",
              pos_idx.sizes());
  check_index_range(op, "pos_idx", pos_idx, N);
  PackedProblem p{scores.contiguous(), pos_idx.contiguous(), std::nullopt, std::nullopt};
  if (ign_idx.has_value()) p.ign_idx = ign_idx->contiguous();
  if (ign_mask.has_value()) p.ign_mask = ign_mask->contiguous();
  return p;
}

// The problem of a fused loss op: the target as the user gave it, not packed. Exactly one of
// a label pair (query_labels (Q,), gallery_labels (N,), integers: positive = same label) or a
// dense relevance (Q, N) (positive = > 0, NaN rejected) is given; made int64 / bool contiguous.
// check_values=false: no pass over the data that syncs the host (the relevance's NaN scan, the
// ignore index's range); the caller flags those on the device instead (the CUDA loss ops).
struct TargetProblem {
  at::Tensor scores;
  std::optional<at::Tensor> qlab, glab;  // int64
  std::optional<at::Tensor> pos_mask;     // bool (Q, N)
  std::optional<at::Tensor> ign_idx, ign_mask;
};

inline TargetProblem check_target_problem(const char* op, c10::DeviceType device, const at::Tensor& scores,
                                          const std::optional<at::Tensor>& qlab,
                                          const std::optional<at::Tensor>& glab,
                                          const std::optional<at::Tensor>& relevance,
                                          const std::optional<at::Tensor>& ign_idx,
                                          const std::optional<at::Tensor>& ign_mask, bool check_values = true) {
  check_scores_and_ignore(op, device, scores, ign_idx, ign_mask, check_values);
  const int64_t Q = scores.size(0), N = scores.size(1);
  const bool labels = qlab.has_value() || glab.has_value();
  TORCH_CHECK_VALUE(labels != relevance.has_value() && qlab.has_value() == glab.has_value(), op,
                    ": give either query_labels and gallery_labels, or relevance");
  TargetProblem t{scores.contiguous(), std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt};
  if (labels) {
    auto check = [&](const char* name, const at::Tensor& l, int64_t n) {
      TORCH_CHECK_TYPE(at::isIntegralType(l.scalar_type(), /*includeBool=*/false), op, ": ", name,
                       " must be an integer tensor, got ", l.scalar_type());
      TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == n && l.device() == scores.device(), op, ": ", name,
                        " must have shape (", n, ",) on the device of scores, got ", l.sizes(), " on ", l.device());
      return l.to(at::kLong).contiguous();
    };
    t.qlab = check("query_labels", *qlab, Q);
    t.glab = check("gallery_labels", *glab, N);
  } else {
    const at::Tensor& r = *relevance;
    TORCH_CHECK_VALUE(r.sizes() == scores.sizes() && r.device() == scores.device(), op,
                      ": relevance must have the shape of scores ", scores.sizes(), " on its device, got ", r.sizes(),
                      " on ", r.device());
    TORCH_CHECK_TYPE(!at::isComplexType(r.scalar_type()), op, ": relevance must be bool, integer or floating, got ",
                     r.scalar_type());
    if (check_values && at::isFloatingType(r.scalar_type()) && r.numel() > 0)
      TORCH_CHECK_VALUE(!r.isnan().any().item<bool>(), op, ": relevance contains NaN");
    t.pos_mask = (r.scalar_type() == at::kBool ? r : r.gt(0)).contiguous();
  }
  if (ign_idx.has_value()) t.ign_idx = ign_idx->contiguous();
  if (ign_mask.has_value()) t.ign_mask = ign_mask->contiguous();
  return t;
}

// The kernels' view of a loss problem: no pos_idx (P = 0), each row finds its positives.
template <typename T>
ProblemView<T> problem_view(const TargetProblem& tp) {
  return ProblemView<T>{tp.scores.data_ptr<T>(),
                        nullptr,
                        tp.ign_idx.has_value() ? tp.ign_idx->data_ptr<int64_t>() : nullptr,
                        tp.ign_mask.has_value() ? tp.ign_mask->data_ptr<bool>() : nullptr,
                        tp.scores.size(0),
                        tp.scores.size(1),
                        0};
}

// The target's pointers, as the CPU row tasks read them (problem.h)
inline TargetView target_view(const TargetProblem& tp) {
  return TargetView{tp.qlab ? tp.qlab->data_ptr<int64_t>() : nullptr,
                         tp.glab ? tp.glab->data_ptr<int64_t>() : nullptr,
                         tp.pos_mask ? tp.pos_mask->data_ptr<bool>() : nullptr};
}

// The largest finite value of the compute dtype: every parameter reaches the kernels in it.
inline double dtype_max(at::ScalarType dtype) {
  return dtype == at::kDouble ? std::numeric_limits<double>::max() : double(std::numeric_limits<float>::max());
}

// The step of the rank-sums ops (binary and graded). The kernels multiply by 1/tau in T, so
// tau must lie in [1/max, max] of T (float32: [2.9e-39, 3.4e38]): otherwise 1/tau or tau is
// inf or 0 there and a tie (0 * inf) turns NaN. The other parameters must be finite in T;
// rho and delta >= 0, as the public functions require.
inline void check_step(const char* op, int64_t step, double tau, double rho, double delta, double start,
                       double offset, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(step == kSigmoid || step == kSupRank, op, ": step must be ", int64_t(kSigmoid), " (sigmoid) or ",
                    int64_t(kSupRank), " (suprank), got ", step);
  const double big = dtype_max(dtype);
  TORCH_CHECK_VALUE(tau >= 1.0 / big && tau <= big, op, ": tau must lie in [", 1.0 / big, ", ", big, "] for ",
                    dtype, " scores (tau and 1/tau finite), got ", tau);
  TORCH_CHECK_VALUE(rho >= 0 && rho <= big, op, ": rho must be finite and >= 0 in ", dtype, ", got ", rho);
  TORCH_CHECK_VALUE(delta >= 0 && delta <= big, op, ": delta must be finite and >= 0 in ", dtype, ", got ", delta);
  TORCH_CHECK_VALUE(std::abs(start) <= big, op, ": start must be finite in ", dtype, ", got ", start);
  TORCH_CHECK_VALUE(std::abs(offset) <= big, op, ": offset must be finite in ", dtype, ", got ", offset);
}

// k of Recall@k: a non-empty list of integers >= 1
inline std::vector<int64_t> check_ks(const char* op, c10::IntArrayRef ks) {
  TORCH_CHECK_VALUE(!ks.empty(), op, ": ks must be a non-empty list of integers >= 1");
  for (const int64_t k : ks) TORCH_CHECK_VALUE(k >= 1, op, ": every k in ks must be >= 1, got ", k);
  return ks.vec();
}

// The bin map v = scale * s + shift of the histogram ops: a non-finite scale or shift in T
// makes NaN of every score, a zero scale NaN of an infinite one.
inline void check_histogram(const char* op, int64_t bins, int64_t max_bins, double scale, double shift,
                            at::ScalarType dtype) {
  TORCH_CHECK_VALUE(bins >= 2 && bins <= max_bins, op, ": bins must lie in [2, ", max_bins, "], got ", bins);
  const double big = dtype_max(dtype);
  TORCH_CHECK_VALUE(std::abs(scale) > 0 && std::abs(scale) <= big, op, ": scale must be non-zero and finite in ",
                    dtype, ", got ", scale);
  TORCH_CHECK_VALUE(std::abs(shift) <= big, op, ": shift must be finite in ", dtype, ", got ", shift);
}

// The incoming gradients of a backward op: floating (they are cast to the dtype of scores; a
// complex, bool or integer gradient would be cast silently), the given shape, on the device of scores.
// Returns them cast to the dtype of scores, contiguous.
struct OutputGrads {
  at::Tensor all, pos;
};

inline OutputGrads check_output_grads(const char* op, const char* name_all, const at::Tensor& g_all,
                                      const char* name_pos, const at::Tensor& g_pos, at::IntArrayRef shape,
                                      const at::Tensor& scores) {
  auto check = [&](const char* name, const at::Tensor& g) {
    TORCH_CHECK_TYPE(at::isFloatingType(g.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
                     g.scalar_type());
    TORCH_CHECK_VALUE(g.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", g.sizes());
    TORCH_CHECK_VALUE(g.device() == scores.device(), op, ": ", name, " must be on the device of scores (",
                      scores.device(), "), got ", g.device());
  };
  check(name_all, g_all);
  check(name_pos, g_pos);
  return {g_all.to(scores.scalar_type()).contiguous(), g_pos.to(scores.scalar_type()).contiguous()};
}

// ... of the rank-sums ops (binary and graded): grad_rank_all, grad_rank_pos of the shape of pos_idx
inline OutputGrads check_rank_sums_grads(const char* op, const at::Tensor& g_all, const at::Tensor& g_pos,
                                         const PackedProblem& pp) {
  return check_output_grads(op, "grad_rank_all", g_all, "grad_rank_pos", g_pos, pp.pos_idx.sizes(), pp.scores);
}

// ... of the histogram ops: grad_h_all, grad_h_pos of shape (Q, bins)
inline OutputGrads check_histogram_grads(const char* op, const at::Tensor& g_all, const at::Tensor& g_pos,
                                         const PackedProblem& pp, int64_t bins) {
  const std::vector<int64_t> shape = {pp.scores.size(0), bins};
  return check_output_grads(op, "grad_h_all", g_all, "grad_h_pos", g_pos, shape, pp.scores);
}

// The packed contract fastrank/_problem.py guarantees, for direct calls: within a row each ranked
// column appears once and is not left out (ignore_idx / ignore_mask), and with graded relevance
// it has relevance > 0. Otherwise the backends disagree (a ranked item counted twice, or ranked
// while ignored). O(Q * P log P) on (Q, P) tensors. CPU tensors only: on CUDA each check would
// add a host synchronisation, which the CUDA path avoids (its callers are the Python layer).
inline void check_packed_contract(const char* op, const PackedProblem& pp, const at::Tensor* relevance = nullptr) {
  if (!pp.scores.is_cpu() || pp.pos_idx.numel() == 0) return;
  const at::Tensor& idx = pp.pos_idx;
  const at::Tensor has = idx >= 0;
  const at::Tensor col = idx.clamp_min(0);
  auto first_row = [](const at::Tensor& bad) { return bad.any(1).nonzero().min().item<int64_t>(); };
  if (pp.ign_idx.has_value()) {
    const at::Tensor bad = has & (idx == pp.ign_idx->unsqueeze(1));
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), op, ": pos_idx ranks the column ignore_idx leaves out (row ",
                      first_row(bad), ")");
  }
  if (pp.ign_mask.has_value()) {
    const at::Tensor bad = has & pp.ign_mask->gather(1, col);
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), op, ": pos_idx ranks a column ignore_mask leaves out (row ",
                      first_row(bad), ")");
  }
  if (idx.size(1) > 1) {
    const at::Tensor sorted = std::get<0>(idx.sort(1));
    const at::Tensor hi = sorted.slice(1, 1), lo = sorted.slice(1, 0, -1);
    const at::Tensor bad = (hi == lo) & (hi >= 0);
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), op, ": pos_idx holds a column twice in a row (row ", first_row(bad),
                      ")");
  }
  if (relevance != nullptr) {
    const at::Tensor bad = has & (relevance->gather(1, col) <= 0);
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), op, ": pos_idx ranks an item of relevance 0 (row ", first_row(bad),
                      "); ranked items need relevance > 0");
  }
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
// The backward checks too: a direct call need not pass the tensor its forward checked.
// check_relevance_layout: the device, shape and dtype only (the fused graded loss op checks the
// values in its own pass over the rows).
inline void check_relevance_layout(const char* op, const at::Tensor& relevance, const at::Tensor& scores) {
  TORCH_CHECK_VALUE(relevance.device() == scores.device(), op, ": relevance must be on the device of scores (",
              scores.device(), "), got ", relevance.device());
  TORCH_CHECK_VALUE(relevance.sizes() == scores.sizes(), op, ": relevance must have the shape of scores ", scores.sizes(),
              ", got ", relevance.sizes());
  TORCH_CHECK_TYPE(relevance.scalar_type() == scores.scalar_type(), op, ": relevance must have the dtype of scores (",
              scores.scalar_type(), "), got ", relevance.scalar_type());
}

// The graded ops' ordering key (optional, (Q, N), the layout of relevance); returns it contiguous.
// check_values (the two-pass ops, whose callers may be direct): finite. The fused graded loss op
// checks the values in its own pass.
inline std::optional<at::Tensor> check_key(const char* op, const std::optional<at::Tensor>& key,
                                           const at::Tensor& scores, bool check_values) {
  if (!key.has_value()) return std::nullopt;
  TORCH_CHECK_VALUE(key->device() == scores.device(), op, ": key must be on the device of scores (", scores.device(),
                    "), got ", key->device());
  TORCH_CHECK_VALUE(key->sizes() == scores.sizes(), op, ": key must have the shape of scores ", scores.sizes(),
                    ", got ", key->sizes());
  TORCH_CHECK_TYPE(key->scalar_type() == scores.scalar_type(), op, ": key must have the dtype of scores (",
                   scores.scalar_type(), "), got ", key->scalar_type());
  if (check_values && key->numel() > 0)
    TORCH_CHECK_VALUE(at::isfinite(*key).all().item<bool>(), op, ": `key` must be finite (no NaN or inf)");
  return key->contiguous();
}

// HAPPIER's smoothed H-rank parameters: only with the suprank step (it replaces SupRank's exact
// step in rank_pos), beta and leak finite and >= 0, gamma finite
inline void check_hrank(const char* op, int64_t step, bool hrank, double beta, double gamma, double leak) {
  if (!hrank) return;
  TORCH_CHECK_VALUE(step == 1, op, ": the smoothed H-rank (hrank=True) needs step 1 (suprank), got ", step);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0, op, ": beta must be finite and >= 0, got ", beta);
  TORCH_CHECK_VALUE(std::isfinite(leak) && leak >= 0, op, ": leak must be finite and >= 0, got ", leak);
  TORCH_CHECK_VALUE(std::isfinite(gamma), op, ": gamma must be finite, got ", gamma);
}

inline at::Tensor check_relevance(const char* op, const at::Tensor& relevance, const at::Tensor& scores) {
  check_relevance_layout(op, relevance, scores);
  if (relevance.numel() > 0) {
    // one reduction pass; aminmax propagates NaN (isfinite().all() would take three)
    const auto mm = at::aminmax(relevance);
    const double lo = std::get<0>(mm).item<double>(), hi = std::get<1>(mm).item<double>();
    TORCH_CHECK_VALUE(std::isfinite(lo) && std::isfinite(hi), op, ": relevance must be finite (no NaN or inf)");
    TORCH_CHECK_VALUE(lo >= 0.0, op, ": relevance must be >= 0, got a minimum of ", lo);
  }
  return relevance.contiguous();
}

}  // namespace fastrank
