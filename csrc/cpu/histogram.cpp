// Fused CPU soft histograms of histogram AP (FastAP, SoftBin): h_all and h_pos per
// query, O(Q * N) time and O(Q * L) output. One query row per task; each row's
// histogram and gradient have one writer, so results are deterministic.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/parallel.h"
#include "epilogue.h"
#include "histogram.h"

namespace fastrank {
namespace cpu {

constexpr const char* kOp = "fastrank cpu histogram";

template <typename T>
struct HistProblem : ProblemView<T> {
  int64_t L;  // bins
  T scale, shift;
  bool open_ends;
};

using ValidFlags = std::vector<uint8_t>;  // per-thread scratch: one byte per column

template <typename T>
static void hist_forward_rows(const HistProblem<T>& pr, ValidFlags& valid, T* h_all, T* h_pos, int64_t begin,
                              int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    mark_valid_columns(pr, i, valid.data());
    const T* s = pr.scores + i * pr.N;
    T* ha = h_all + i * pr.L;
    T* hp = h_pos + i * pr.L;
    bool nan_row = false;
    for (int64_t k = 0; k < pr.N; ++k) {
      if (!valid[k]) continue;
      const T v = pr.scale * s[k] + pr.shift;
      if (std::isnan(v)) {
        nan_row = true;
        break;
      }
      add_bin(ha, pr.L, soft_bin(v, pr.L, pr.open_ends));
    }
    if (nan_row) {  // a NaN score poisons its whole query, as in the references
      std::fill(ha, ha + pr.L, std::numeric_limits<T>::quiet_NaN());
      std::fill(hp, hp + pr.L, std::numeric_limits<T>::quiet_NaN());
      continue;
    }
    const int64_t* pidx = pr.pos_idx + i * pr.P;
    for (int64_t p = 0; p < pr.P; ++p) {
      if (pidx[p] < 0) continue;
      add_bin(hp, pr.L, soft_bin(pr.scale * s[pidx[p]] + pr.shift, pr.L, pr.open_ends));
    }
  }
}

template <typename T>
static void hist_backward_rows(const HistProblem<T>& pr, ValidFlags& valid, const T* g_all, const T* g_pos, T* grad,
                               int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    mark_valid_columns(pr, i, valid.data());
    const T* s = pr.scores + i * pr.N;
    const T* ga = g_all + i * pr.L;
    const T* gp = g_pos + i * pr.L;
    T* g = grad + i * pr.N;
    bool nan_row = false;
    for (int64_t k = 0; k < pr.N; ++k) {
      g[k] = T(0);
      if (!valid[k]) continue;
      const T v = pr.scale * s[k] + pr.shift;
      if (std::isnan(v)) {
        nan_row = true;
        continue;
      }
      g[k] = pr.scale * bin_grad(ga, pr.L, soft_bin(v, pr.L, pr.open_ends));
    }
    if (nan_row) {
      for (int64_t k = 0; k < pr.N; ++k) g[k] = valid[k] ? std::numeric_limits<T>::quiet_NaN() : T(0);
      continue;
    }
    const int64_t* pidx = pr.pos_idx + i * pr.P;
    for (int64_t p = 0; p < pr.P; ++p) {
      const int64_t j = pidx[p];
      if (j < 0) continue;
      g[j] += pr.scale * bin_grad(gp, pr.L, soft_bin(pr.scale * s[j] + pr.shift, pr.L, pr.open_ends));
    }
  }
}

template <typename T>
static HistProblem<T> make_hist_problem(const PackedProblem& pp, int64_t bins, double scale, double shift,
                                        bool open_ends) {
  return HistProblem<T>{problem_view<T>(pp), bins, T(scale), T(shift), open_ends};
}

// Query rows per at::parallel_for task: about 2^14 scores binned per task, at least one row.
static int64_t hist_rows_per_task(int64_t N) {
  return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, N));
}

static std::tuple<at::Tensor, at::Tensor> histogram_fwd_cpu(const at::Tensor& scores_in, const at::Tensor& pos_idx_in,
                                                          const std::optional<at::Tensor>& ign_idx_in,
                                                          const std::optional<at::Tensor>& ign_mask_in, int64_t bins,
                                                          double scale, double shift, bool open_ends) {
  const PackedProblem pp =
      check_problem(kOp, c10::DeviceType::CPU, scores_in, pos_idx_in, ign_idx_in, ign_mask_in);
  check_histogram(kOp, bins, std::numeric_limits<int64_t>::max(), scale, shift, pp.scores.scalar_type());
  check_packed_contract(kOp, pp);
  at::Tensor h_all = at::zeros({pp.scores.size(0), bins}, pp.scores.options());
  at::Tensor h_pos = at::zeros({pp.scores.size(0), bins}, pp.scores.options());
  AT_DISPATCH_FLOATING_TYPES(pp.scores.scalar_type(), "fastrank_histogram_fwd_cpu", [&] {
    const auto pr = make_hist_problem<scalar_t>(pp, bins, scale, shift, open_ends);
    scalar_t* ha = h_all.data_ptr<scalar_t>();
    scalar_t* hp = h_pos.data_ptr<scalar_t>();
    parallel_rows<ValidFlags>(kOp, pr.Q, hist_rows_per_task(pr.N), pr.N, 1, [&](auto& valid, int64_t b, int64_t e) {
      hist_forward_rows(pr, valid, ha, hp, b, e);
    });
  });
  return {h_all, h_pos};
}

static at::Tensor histogram_bwd_cpu(const at::Tensor& grad_all_in, const at::Tensor& grad_pos_in,
                                   const at::Tensor& scores_in, const at::Tensor& pos_idx_in,
                                   const std::optional<at::Tensor>& ign_idx_in,
                                   const std::optional<at::Tensor>& ign_mask_in, int64_t bins, double scale,
                                   double shift, bool open_ends) {
  const PackedProblem pp =
      check_problem(kOp, c10::DeviceType::CPU, scores_in, pos_idx_in, ign_idx_in, ign_mask_in);
  check_histogram(kOp, bins, std::numeric_limits<int64_t>::max(), scale, shift, pp.scores.scalar_type());
  check_packed_contract(kOp, pp);
  const OutputGrads og = check_histogram_grads(kOp, grad_all_in, grad_pos_in, pp, bins);
  at::Tensor grad = at::empty(pp.scores.sizes(), pp.scores.options());  // every element written by its row's task
  AT_DISPATCH_FLOATING_TYPES(pp.scores.scalar_type(), "fastrank_histogram_bwd_cpu", [&] {
    const auto pr = make_hist_problem<scalar_t>(pp, bins, scale, shift, open_ends);
    const scalar_t* ga = og.all.data_ptr<scalar_t>();
    const scalar_t* gp = og.pos.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    parallel_rows<ValidFlags>(kOp, pr.Q, hist_rows_per_task(pr.N), pr.N, 1, [&](auto& valid, int64_t b, int64_t e) {
      hist_backward_rows(pr, valid, ga, gp, g, b, e);
    });
  });
  return grad;
}

// ---------------------------------------------------------------- fused loss op
//
// histogram_ap_loss (docs/design.md §2.4): one task per block of rows; each row flags its own
// positives from the target as given, builds h_all and h_pos in one sweep, takes the AP and its
// derivative per bin from the epilogue (csrc/epilogue.h: FastApEpilogue, SoftBinEpilogue) and,
// with_grad, sweeps the row again while it is in cache: a score touches at most two bins, so
// d AP / d s_k = scale * sum over its bins of d AP / d h * w'(v_k), with the bins' derivatives
// summed (A + B) for a positive.

constexpr int64_t kFastAp = 0, kSoftBin = 1;

template <typename T>
struct HistLossProblem : ProblemView<T> {
  int64_t L;
  T scale, shift;
  bool open_ends;
  TargetView target;
};

// Per thread: the row's flags (N bytes, flag_row), each column's gradient slot (N int32, below)
// and the bin values: kHistCopies partial copies of h_all and one of h_pos, each padded to L + 3
// (bins -1 .. L + 1, so a score's two bins, lo and lo + 1 with lo in [-1, L], are added without a
// range test); h_all, h_pos, the epilogue's d_all, d_pos; then the gradient sweep's slope table D.
// Why copies: clustered scores hit the same bins, and with one copy each add waits for the
// previous one's store. A score's lower and upper bin go to different copies (even, odd): two
// adds to adjacent slots of one copy are merged by the compiler into an 8-byte store, which
// the next score's overlapping 8-byte load cannot take from the store buffer (a stall).
constexpr int64_t kHistCopies = 4;
inline int64_t hist_loss_bin_values(int64_t L) { return (kHistCopies + 3) * (L + 3) + 4 * L + 1; }

// The gradient sweep as one gather: a score whose bins are lo, lo + 1 (slot j = lo + 1 of the
// padded tables) with t > 0 has d AP / d v = G[j + 1] - G[j] (its weights' slopes are +1 and -1,
// so this is exactly the two-term sum), G = d_all for a negative, d_all + d_pos for a positive;
// t = 0 (a bin centre, an open end, outside the support) has slope 0. The forward records each
// column's slot in `code` (the zero slot 2 * Lp for those and for left-out columns), so the
// gradient row is g[k] = scale * D[code[k]]: no flag, no bin arithmetic, no branch.
template <typename T>
FR_MULTIVERSION void gather_grad_row(const T* D, const int32_t* code, T scale, T* g, int64_t n) {
  for (int64_t k = 0; k < n; ++k) g[k] = scale * D[code[k]];
}

// Not multiversioned: the x86-64-v3/v4 clones would contract scale * s + shift into an FMA, whose
// v differs from the naive backend's by an ulp, enough to move a score off a bin centre (a kink).
template <typename T, typename Epilogue>
static void hist_loss_rows(const HistLossProblem<T>* prp, const Epilogue* epp, uint8_t* flag, int32_t* code,
                           T* bins, T* score, int64_t* n_pos, T* grad, int64_t begin, int64_t end) {
  const HistLossProblem<T>& pr = *prp;
  const int64_t L = pr.L, N = pr.N, Lp = L + 3;
  const int32_t zero_slot = static_cast<int32_t>(2 * Lp);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  T* copies = bins;                        // kHistCopies x Lp
  T* hp_pad = bins + kHistCopies * Lp;     // Lp
  T* ha = hp_pad + Lp;
  T* hp = ha + L;
  T* d_all = hp + L;
  T* d_pos = d_all + L;
  T* D = d_pos + L;  // 2 * Lp + 1: the slopes of negatives, of positives, then the zero slot
  for (int64_t i = begin; i < end; ++i) {
    flag_row_mv<T>(pr, pr.target, i, flag);
    const T* s = pr.scores + i * N;
    T* g = grad ? grad + i * N : nullptr;
    std::fill(copies, copies + (kHistCopies + 1) * Lp, T(0));
    int64_t np = 0;
    bool nan_row = false;
    for (int64_t k = 0; k < N; ++k) {
      if (!flag[k]) {
        code[k] = zero_slot;
        continue;
      }
      const T v = pr.scale * s[k] + pr.shift;
      if (std::isnan(v)) {
        nan_row = true;
        break;
      }
      const SoftBin<T> b = soft_bin(v, L, pr.open_ends);
      T* h = copies + (k & 1) * 2 * Lp + (b.lo + 1);
      h[0] += b.w_lo;
      h[Lp + 1] += b.w_hi;
      const bool pos = flag[k] == 2;
      if (pos) {
        hp_pad[b.lo + 1] += b.w_lo;
        hp_pad[b.lo + 2] += b.w_hi;
        ++np;
      }
      code[k] = b.d_hi != T(0) ? static_cast<int32_t>((pos ? Lp : 0) + b.lo + 1) : zero_slot;
    }
    if (nan_row) {
      // NaN in -> NaN out, also for a query without positives; its gradient row is NaN at the
      // valid items when the AP depends on them (np > 0), as for the other fused loss ops
      np = 0;
      for (int64_t k = 0; k < N; ++k) np += flag[k] == 2;
      n_pos[i] = np;
      score[i] = nan;
      if (g) {
        for (int64_t k = 0; k < N; ++k) g[k] = np > 0 && flag[k] ? nan : T(0);
      }
      continue;
    }
    n_pos[i] = np;
    if (np == 0) {  // no positive: AP 0, a constant
      score[i] = T(0);
      if (g) std::fill(g, g + N, T(0));
      continue;
    }
    // the copies summed in a fixed order (deterministic), the bins in [0, L) kept
    for (int64_t l = 0; l < L; ++l) {
      T acc = copies[l + 1];
      for (int64_t c = 1; c < kHistCopies; ++c) acc += copies[c * Lp + l + 1];
      ha[l] = acc;
      hp[l] = hp_pad[l + 1];
    }
    score[i] = epp->value(ha, hp, L, np);
    if (!g) continue;
    epp->grad(ha, hp, L, np, d_all, d_pos);
    // G padded to slots 0 .. L + 2 (bins -1 .. L + 1, zero outside [0, L)); D[j] = G[j + 1] - G[j]
    for (int64_t j = 0; j < Lp - 1; ++j) {
      const int64_t l = j - 1;  // the bin of slot j
      const T neg_j = l >= 0 && l < L ? d_all[l] : T(0), neg_n = l + 1 < L ? d_all[l + 1] : T(0);
      const T pos_j = l >= 0 && l < L ? d_all[l] + d_pos[l] : T(0);
      const T pos_n = l + 1 < L ? d_all[l + 1] + d_pos[l + 1] : T(0);
      D[j] = neg_n - neg_j;
      D[Lp + j] = pos_n - pos_j;
    }
    D[Lp - 1] = D[2 * Lp - 1] = D[2 * Lp] = T(0);
    gather_grad_row<T>(D, code, pr.scale, g, N);
  }
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> histogram_ap_loss_cpu(
    const at::Tensor& scores_in, const std::optional<at::Tensor>& qlab_in, const std::optional<at::Tensor>& glab_in,
    const std::optional<at::Tensor>& relevance_in, const std::optional<at::Tensor>& ign_idx_in,
    const std::optional<at::Tensor>& ign_mask_in, int64_t bins, double scale, double shift, bool open_ends,
    int64_t kind, bool with_grad) {
  constexpr const char* op = "fastrank cpu histogram_ap_loss";
  const TargetProblem tp = check_target_problem(op, c10::DeviceType::CPU, scores_in, qlab_in, glab_in, relevance_in,
                                                ign_idx_in, ign_mask_in);
  // the scratch holds ~9 values per bin per thread, and a column's gradient slot (< 2 * bins + 7)
  // is an int32: bins beyond 2^30 could not be allocated anyway
  check_histogram(op, bins, int64_t(1) << 30, scale, shift, tp.scores.scalar_type());
  TORCH_CHECK_VALUE(kind == kFastAp || kind == kSoftBin, op, ": kind must be ", kFastAp, " (fastap) or ", kSoftBin,
                    " (softbin), got ", kind);
  const int64_t Q = tp.scores.size(0), N = tp.scores.size(1);
  at::Tensor score = at::empty({Q}, tp.scores.options());
  at::Tensor n_pos = at::empty({Q}, tp.scores.options().dtype(at::kLong));
  at::Tensor grad = empty_grad_rows(with_grad ? Q : 0, N, tp.scores.options());  // every row written by its task
  AT_DISPATCH_FLOATING_TYPES(tp.scores.scalar_type(), "fastrank_histogram_ap_loss_cpu", [&] {
    using T = scalar_t;
    const HistLossProblem<T> pr{problem_view<T>(tp), bins, T(scale), T(shift), open_ends, target_view(tp)};
    T* sc = score.data_ptr<T>();
    int64_t* np = n_pos.data_ptr<int64_t>();
    T* g = with_grad ? grad.data_ptr<T>() : nullptr;
    const int64_t grain = hist_rows_per_task(N);
    const int64_t n_tasks = tasks(Q, grain);
    // both scratch kinds allocated before the parallel region (thread_scratch)
    auto flags = thread_scratch<std::vector<uint8_t>>(op, n_tasks, N, 1);
    auto codes = thread_scratch<std::vector<int32_t>>(op, n_tasks, N, sizeof(int32_t));
    auto values = thread_scratch<std::vector<T>>(op, n_tasks, hist_loss_bin_values(bins), sizeof(T));
    auto rows = [&](const auto& epi) {
      at::parallel_for(0, Q, grain, [&](int64_t b, int64_t e) {
        hist_loss_rows(&pr, &epi, my_scratch(flags).data(), my_scratch(codes).data(), my_scratch(values).data(), sc,
                       np, g, b, e);
      });
    };
    if (kind == kFastAp)
      rows(FastApEpilogue<T>{});
    else
      rows(SoftBinEpilogue<T>{});
  });
  return {score, n_pos, grad};
}

TORCH_LIBRARY_IMPL(fastrank, CPU, m) {
  m.impl("histogram_fwd", &histogram_fwd_cpu);
  m.impl("histogram_bwd", &histogram_bwd_cpu);
  m.impl("histogram_ap_loss", &histogram_ap_loss_cpu);
}

}  // namespace cpu
}  // namespace fastrank
