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

TORCH_LIBRARY_IMPL(fastrank, CPU, m) {
  m.impl("histogram_fwd", &histogram_fwd_cpu);
  m.impl("histogram_bwd", &histogram_bwd_cpu);
}

}  // namespace cpu
}  // namespace fastrank
