// Fused CPU forward/backward of the rank-sums primitive (docs/design.md §1.1).
//
// One query row per task (at::parallel_for over queries): every row's output and
// gradient is written by exactly one thread in a fixed order, so results do not
// depend on the thread count and the backward is deterministic without atomics.
// Per row, the valid competitors are compacted into a run of positives and a run
// of negatives; each ranked positive then sweeps both runs with the vectorised
// loops of rank_sums_row.h. Work: sum_i |P_i| * N_i pair evaluations. Extra
// memory: O(N) per thread.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/loops.h"
#include "cpu/parallel.h"

namespace fastrank {
namespace cpu {

template <typename T>
struct Problem : ProblemView<T> {
  StepParams<T> step;
};

template <typename T>
struct RowBuffers {
  static constexpr int64_t kBytesPerColumn = 4 * sizeof(T) + 2 * sizeof(int64_t) + 1;
  std::vector<T> spos, sneg, gpos, gneg;
  std::vector<int64_t> pcol, ncol;
  std::vector<uint8_t> flag;
  explicit RowBuffers(int64_t n) : spos(n), sneg(n), gpos(n), gneg(n), pcol(n), ncol(n), flag(n) {}
};

// Splits row i's valid items into positives (flag 2) and negatives (flag 1).
// Returns true when a valid score is NaN: the whole row's output is then NaN,
// as in the references (a NaN competitor poisons every sum it enters).
template <typename T>
static bool compact_row(const Problem<T>& pr, int64_t i, RowBuffers<T>& b, int64_t& np, int64_t& nn) {
  const int64_t N = pr.N;
  const T* s = pr.scores + i * N;
  uint8_t* flag = b.flag.data();
  mark_valid_columns(pr, i, flag);
  const int64_t* pidx = pr.pos_idx + i * pr.P;
  for (int64_t p = 0; p < pr.P; ++p) {
    if (pidx[p] >= 0) flag[pidx[p]] = 2;
  }
  np = nn = 0;
  bool has_nan = false;
  for (int64_t k = 0; k < N; ++k) {
    const T v = s[k];
    if (flag[k] == 2) {
      b.spos[np] = v;
      b.pcol[np++] = k;
    } else if (flag[k] == 1) {
      b.sneg[nn] = v;
      b.ncol[nn++] = k;
    } else {
      continue;
    }
    has_nan |= std::isnan(v);
  }
  return has_nan;
}

template <typename T, int STEP>
FR_MULTIVERSION static void forward_rows(const Problem<T>* prp, RowBuffers<T>* bp, T* rank_all, T* rank_pos,
                                         int64_t begin, int64_t end) {
  const Problem<T>& pr = *prp;
  RowBuffers<T>& b = *bp;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t* pidx = pr.pos_idx + i * pr.P;
    T* ra = rank_all + i * pr.P;
    T* rp = rank_pos + i * pr.P;
    if (!row_has_ranked(pr, i)) continue;  // outputs are zero-initialised
    int64_t np, nn;
    const bool nan_row = compact_row(pr, i, b, np, nn);
    const T* s = pr.scores + i * pr.N;
    for (int64_t p = 0; p < pr.P; ++p) {
      const int64_t j = pidx[p];
      if (j < 0) continue;
      if (nan_row) {
        ra[p] = rp[p] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      const T sj = s[j];
      if (std::isinf(sj)) {
        // j and every equal score tie (step_diff): j's own term is still sigma(0) or H(0)
        const StepParams<T> st = pr.step;
        if (STEP == kSigmoid) {
          auto sig = [st](T d) { return sigmoid_tau(d, st.inv_tau); };
          const T sp = tied_sum(sj, b.spos.data(), np, sig);
          rp[p] = sp + T(0.5);
          ra[p] = sp + tied_sum(sj, b.sneg.data(), nn, sig) + T(0.5);
        } else {
          const T hp = tied_sum(sj, b.spos.data(), np, [](T d) { return heaviside(d); });
          rp[p] = hp;
          ra[p] = hp + tied_sum(sj, b.sneg.data(), nn, [st](T d) { return suprank_neg(d, st); });
        }
        continue;
      }
      if (STEP == kSigmoid) {
        // the runs include j itself, which adds sigma(0) = 1/2: 1 + sum_{k != j} = 1/2 + sum_k
        const T sp = sum_sigmoid(sj, b.spos.data(), np, pr.step.inv_tau);
        const T sn = sum_sigmoid(sj, b.sneg.data(), nn, pr.step.inv_tau);
        rp[p] = sp + T(0.5);
        ra[p] = sp + sn + T(0.5);
      } else {
        // H(0) = 1 for j itself supplies the "1 +"
        const T hp = run_sum_heaviside(sj, b.spos.data(), np);
        const T sn = sum_suprank_neg(sj, b.sneg.data(), nn, pr.step);
        rp[p] = hp;
        ra[p] = hp + sn;
      }
    }
  }
}

template <typename T, int STEP>
FR_MULTIVERSION static void backward_rows(const Problem<T>* prp, RowBuffers<T>* bp, const T* grad_all,
                                          const T* grad_pos, T* grad, int64_t begin, int64_t end) {
  const Problem<T>& pr = *prp;
  RowBuffers<T>& b = *bp;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t* pidx = pr.pos_idx + i * pr.P;
    const T* ga = grad_all + i * pr.P;
    const T* gp = grad_pos + i * pr.P;
    T* g = grad + i * pr.N;
    // the gradient is allocated uninitialised: each row is zeroed by the thread that
    // owns it, which also spreads the first-touch page faults of a large output
    std::fill(g, g + pr.N, T(0));
    if (!row_has_ranked(pr, i)) continue;
    int64_t np, nn;
    const bool nan_row = compact_row(pr, i, b, np, nn);
    if (nan_row) {
      for (int64_t k = 0; k < np; ++k) g[b.pcol[k]] = std::numeric_limits<T>::quiet_NaN();
      for (int64_t k = 0; k < nn; ++k) g[b.ncol[k]] = std::numeric_limits<T>::quiet_NaN();
      continue;
    }
    std::fill(b.gpos.begin(), b.gpos.begin() + np, T(0));
    std::fill(b.gneg.begin(), b.gneg.begin() + nn, T(0));
    const T* s = pr.scores + i * pr.N;
    for (int64_t p = 0; p < pr.P; ++p) {
      const int64_t j = pidx[p];
      if (j < 0) continue;
      const T sj = s[j];
      T tot = T(0);
      if (std::isinf(sj)) {
        // ties of infinities (j's own term included) carry no gradient
        const StepParams<T> st = pr.step;
        const T a = ga[p];
        if (STEP == kSigmoid) {
          auto dsig = [st](T d) { return sigmoid_tau_grad(d, st.inv_tau); };
          tot += tied_grad_run(sj, b.spos.data(), b.gpos.data(), np, a + gp[p], dsig);
          tot += tied_grad_run(sj, b.sneg.data(), b.gneg.data(), nn, a, dsig);
        } else {
          tot += tied_grad_run(sj, b.sneg.data(), b.gneg.data(), nn, a, [st](T d) { return suprank_neg_grad(d, st); });
        }
        g[j] -= tot;
        continue;
      }
      if (STEP == kSigmoid) {
        // self term (k = j) adds c to g[j] and subtracts it again: net zero
        const T a = ga[p], apb = ga[p] + gp[p];
        if (apb != T(0)) tot += grad_sigmoid(sj, b.spos.data(), b.gpos.data(), np, apb, pr.step.inv_tau);
        if (a != T(0)) tot += grad_sigmoid(sj, b.sneg.data(), b.gneg.data(), nn, a, pr.step.inv_tau);
      } else {
        // H carries no gradient: only negatives move, and only through rank_all
        const T a = ga[p];
        if (a != T(0)) tot += grad_suprank_neg(sj, b.sneg.data(), b.gneg.data(), nn, a, pr.step);
      }
      g[j] -= tot;
    }
    for (int64_t k = 0; k < np; ++k) g[b.pcol[k]] += b.gpos[k];
    for (int64_t k = 0; k < nn; ++k) g[b.ncol[k]] += b.gneg[k];
  }
}

// ---------------------------------------------------------------- torch glue

constexpr const char* kOp = "fastrank cpu rank_sums";

template <typename T>
static Problem<T> make_problem(const PackedProblem& pp, double tau, double rho, double delta, double start,
                               double offset) {
  return Problem<T>{problem_view<T>(pp), make_step_params<T>(tau, rho, delta, start, offset)};
}

static std::tuple<at::Tensor, at::Tensor> rank_sums_fwd_cpu(const at::Tensor& scores_in, const at::Tensor& pos_idx_in,
                                                          const std::optional<at::Tensor>& ign_idx_in,
                                                          const std::optional<at::Tensor>& ign_mask_in, int64_t step,
                                                          double tau, double rho, double delta, double start,
                                                          double offset) {
  const PackedProblem pp =
      check_problem(kOp, c10::DeviceType::CPU, scores_in, pos_idx_in, ign_idx_in, ign_mask_in);
  check_step(kOp, step, tau, rho, delta, start, offset, pp.scores.scalar_type());
  check_packed_contract(kOp, pp);
  at::Tensor rank_all = at::zeros(pp.pos_idx.sizes(), pp.scores.options());
  at::Tensor rank_pos = at::zeros(pp.pos_idx.sizes(), pp.scores.options());
  AT_DISPATCH_FLOATING_TYPES(pp.scores.scalar_type(), "fastrank_rank_sums_fwd_cpu", [&] {
    const Problem<scalar_t> pr = make_problem<scalar_t>(pp, tau, rho, delta, start, offset);
    scalar_t* ra = rank_all.data_ptr<scalar_t>();
    scalar_t* rp = rank_pos.data_ptr<scalar_t>();
    parallel_step_rows<RowBuffers<scalar_t>>(kOp, step, pr, [&](auto kind, auto& buf, int64_t b, int64_t e) {
      forward_rows<scalar_t, decltype(kind)::value>(&pr, &buf, ra, rp, b, e);
    });
  });
  return {rank_all, rank_pos};
}

static at::Tensor rank_sums_bwd_cpu(const at::Tensor& grad_all_in, const at::Tensor& grad_pos_in, const at::Tensor& scores_in,
                                   const at::Tensor& pos_idx_in, const std::optional<at::Tensor>& ign_idx_in,
                                   const std::optional<at::Tensor>& ign_mask_in, int64_t step, double tau, double rho,
                                   double delta, double start, double offset) {
  const PackedProblem pp =
      check_problem(kOp, c10::DeviceType::CPU, scores_in, pos_idx_in, ign_idx_in, ign_mask_in);
  check_step(kOp, step, tau, rho, delta, start, offset, pp.scores.scalar_type());
  check_packed_contract(kOp, pp);
  const OutputGrads og = check_rank_sums_grads(kOp, grad_all_in, grad_pos_in, pp);
  at::Tensor grad = at::empty(pp.scores.sizes(), pp.scores.options());
  AT_DISPATCH_FLOATING_TYPES(pp.scores.scalar_type(), "fastrank_rank_sums_bwd_cpu", [&] {
    const Problem<scalar_t> pr = make_problem<scalar_t>(pp, tau, rho, delta, start, offset);
    const scalar_t* ga = og.all.data_ptr<scalar_t>();
    const scalar_t* gp = og.pos.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    parallel_step_rows<RowBuffers<scalar_t>>(kOp, step, pr, [&](auto kind, auto& buf, int64_t b, int64_t e) {
      backward_rows<scalar_t, decltype(kind)::value>(&pr, &buf, ga, gp, g, b, e);
    });
  });
  return grad;
}

TORCH_LIBRARY_IMPL(fastrank, CPU, m) {
  m.impl("rank_sums_fwd", &rank_sums_fwd_cpu);
  m.impl("rank_sums_bwd", &rank_sums_bwd_cpu);
}

}  // namespace cpu
}  // namespace fastrank
