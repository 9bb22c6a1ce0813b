// Fused CPU forward/backward of the graded rank-sums primitive (issue 9, docs/design.md §1.1
// with graded relevance): H-AP and NDCG surrogates.
//
// For ranked item j of query i (rel_j > 0) and every valid competitor k != j:
//   rank_all = 1     + sum_k g,   g = sigmoid: sigma;  suprank: H if rel_k >= rel_j else H^-
//   rank_pos = rel_j + sum_k min(rel_j, rel_k) h,   h = sigmoid: sigma;  suprank: H
//
// Layout of the work: per row, the valid items are sorted by relevance, descending
// (stable, so equal relevance keeps column order). For a ranked j the competitors then
// split into three runs, each a plain vectorisable loop with no per-pair branch on
// relevance:
//   [0, m)  rel_k >= rel_j (j itself included): weight rel_j, exact step H for suprank
//   [m, z)  0 < rel_k < rel_j:                  weight rel_k, H^- in rank_all
//   [z, nv) rel_k == 0:                          weight 0, so rank_pos skips them
// With binary relevance the middle run is empty and the other two are exactly the
// positive and negative runs of the binary kernel (cpu/rank_sums.cpp), in the same
// order, so the results are bit-identical to it.
//
// One query row per task, each output and gradient row written by one thread in a
// fixed order: deterministic, independent of the thread count, no atomics.
// Work: sum_i |P_i| * N_i pair evaluations, plus an O(N + P log P) arrangement per row.
// Extra memory: O(N) per thread.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "checks.h"
#include "cpu/loops.h"
#include "cpu/parallel.h"

namespace fastrank {
namespace cpu {
namespace {

template <typename T>
struct GradedProblem : ProblemView<T> {
  const T* rel;  // (Q, N) contiguous, >= 0
  StepParams<T> step;
};

// One row's valid items in decreasing relevance: scores s, relevance r, columns col,
// gradient accumulators g; order is scratch for the sort.
template <typename T>
struct SortedRow {
  static constexpr int64_t kBytesPerColumn = 3 * sizeof(T) + 2 * sizeof(int64_t) + 1;
  std::vector<T> s, r, g;
  std::vector<int64_t> col, order;
  std::vector<uint8_t> valid;
  int64_t nv = 0;  // valid items
  int64_t z = 0;   // items with relevance > 0 (a prefix, after the sort)
  explicit SortedRow(int64_t n) : s(n), r(n), g(n), col(n), order(n), valid(n) {}

  // Fills the row; returns true when a valid score is NaN (the row's outputs are then NaN).
  bool load(const GradedProblem<T>& pr, int64_t i) {
    const int64_t N = pr.N;
    const T* srow = pr.scores + i * N;
    const T* rrow = pr.rel + i * N;
    mark_valid_columns(pr, i, valid.data());
    // Only the relevant items need sorting (usually few next to N): they go first, in
    // decreasing relevance, then the irrelevant ones in column order.
    z = 0;
    for (int64_t k = 0; k < N; ++k) z += valid[k] && rrow[k] > T(0);
    int64_t nr = 0;
    nv = z;
    for (int64_t k = 0; k < N; ++k) {
      if (!valid[k]) continue;
      if (rrow[k] > T(0))
        order[nr++] = k;
      else
        order[nv++] = k;
    }
    // ties broken by column: the order of the stable sort, without its heap buffer
    std::sort(order.begin(), order.begin() + z,
              [rrow](int64_t a, int64_t b) { return rrow[a] > rrow[b] || (rrow[a] == rrow[b] && a < b); });
    bool has_nan = false;
    for (int64_t t = 0; t < nv; ++t) {
      const int64_t k = order[t];
      s[t] = srow[k];
      r[t] = rrow[k];
      col[t] = k;
      has_nan |= std::isnan(s[t]);
    }
    return has_nan;
  }

  // First position whose relevance is below rel_j: the end of the run [0, m).
  int64_t boundary(T rel_j) const {
    return std::partition_point(r.begin(), r.begin() + nv, [rel_j](T v) { return v >= rel_j; }) - r.begin();
  }
};

// A ranked item at +-inf: one scalar sweep over the sorted row with step_diff, so that every
// equal score ties (j's own term included); the runs' weights as in the vectorised path.
template <typename T, int STEP>
void graded_forward_tied(const SortedRow<T>& row, const StepParams<T>& st, T sj, T rj, int64_t m, T& ra, T& rp) {
  T all = T(0), pos = T(0);
  for (int64_t t = 0; t < row.nv; ++t) {
    const T d = step_diff(row.s[t], sj);
    if (STEP == kSigmoid) {
      const T v = sigmoid_tau(d, st.inv_tau);
      all += v;
      pos += (t < m ? rj : (t < row.z ? row.r[t] : T(0))) * v;
    } else if (t < m) {
      const T h = heaviside(d);
      all += h;
      pos += rj * h;
    } else {
      all += suprank_neg(d, st);
      if (t < row.z) pos += row.r[t] * heaviside(d);
    }
  }
  // sigmoid: j's own term is sigma(0) = 1/2 of the "1 +" and half of the "rel_j +"
  ra = STEP == kSigmoid ? all + T(0.5) : all;
  rp = STEP == kSigmoid ? pos + rj * T(0.5) : pos;
}

template <typename T, int STEP>
T graded_backward_tied(const SortedRow<T>& row, const StepParams<T>& st, T sj, T rj, int64_t m, T a, T b, T* gv) {
  T tot = T(0);
  for (int64_t t = STEP == kSigmoid ? 0 : m; t < row.nv; ++t) {
    const T d = row.s[t] - sj;
    const T dd = step_diff(row.s[t], sj);
    T c;
    if (STEP == kSigmoid) {
      const T coef = a + b * (t < m ? rj : (t < row.z ? row.r[t] : T(0)));
      c = coef * tied_grad(d, sigmoid_tau_grad(dd, st.inv_tau));
    } else {
      c = a * tied_grad(d, suprank_neg_grad(dd, st));
    }
    gv[t] += c;
    tot += c;
  }
  return tot;
}

template <typename T, int STEP>
FR_MULTIVERSION void graded_forward_rows(const GradedProblem<T>* prp, SortedRow<T>* rowp, T* rank_all, T* rank_pos,
                                         int64_t begin, int64_t end) {
  const GradedProblem<T>& pr = *prp;
  SortedRow<T>& row = *rowp;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t* pidx = pr.pos_idx + i * pr.P;
    T* ra = rank_all + i * pr.P;
    T* rp = rank_pos + i * pr.P;
    if (!row_has_ranked(pr, i)) continue;  // outputs are zero-initialised
    const bool nan_row = row.load(pr, i);
    const T* s = pr.scores + i * pr.N;
    const T* rel = pr.rel + i * pr.N;
    for (int64_t p = 0; p < pr.P; ++p) {
      const int64_t j = pidx[p];
      if (j < 0) continue;
      if (nan_row) {
        ra[p] = rp[p] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      const T sj = s[j], rj = rel[j];
      const int64_t m = std::min(row.boundary(rj), row.z);
      if (std::isinf(sj)) {
        graded_forward_tied<T, STEP>(row, pr.step, sj, rj, m, ra[p], rp[p]);
        continue;
      }
      const T* sv = row.s.data();
      const T* rv = row.r.data();
      T mid = T(0), wmid = T(0);
      if (STEP == kSigmoid) {
        // j itself sits in [0, m) and adds sigma(0) = 1/2: 1 + sum_{k != j} = 1/2 + sum_k
        const T hi = sum_sigmoid(sj, sv, m, pr.step.inv_tau);
        run_sum_sigmoid_w(sj, sv + m, rv + m, row.z - m, pr.step.inv_tau, mid, wmid);
        const T lo = sum_sigmoid(sj, sv + row.z, row.nv - row.z, pr.step.inv_tau);
        rp[p] = rj * (hi + T(0.5)) + wmid;
        ra[p] = hi + (mid + lo) + T(0.5);
      } else {
        // H(0) = 1 for j itself supplies the "1 +" and the "rel_j +"
        const T hi = run_sum_heaviside(sj, sv, m);
        run_sum_suprank_w(sj, sv + m, rv + m, row.z - m, pr.step, mid, wmid);
        const T lo = sum_suprank_neg(sj, sv + row.z, row.nv - row.z, pr.step);
        rp[p] = rj * hi + wmid;
        ra[p] = hi + (mid + lo);
      }
    }
  }
}

template <typename T, int STEP>
FR_MULTIVERSION void graded_backward_rows(const GradedProblem<T>* prp, SortedRow<T>* rowp, const T* grad_all,
                                          const T* grad_pos, T* grad, int64_t begin, int64_t end) {
  const GradedProblem<T>& pr = *prp;
  SortedRow<T>& row = *rowp;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t* pidx = pr.pos_idx + i * pr.P;
    const T* ga = grad_all + i * pr.P;
    const T* gp = grad_pos + i * pr.P;
    T* g = grad + i * pr.N;
    std::fill(g, g + pr.N, T(0));  // first touch by the owning thread
    if (!row_has_ranked(pr, i)) continue;
    const bool nan_row = row.load(pr, i);
    if (nan_row) {
      for (int64_t t = 0; t < row.nv; ++t) g[row.col[t]] = std::numeric_limits<T>::quiet_NaN();
      continue;
    }
    std::fill(row.g.begin(), row.g.begin() + row.nv, T(0));
    const T* s = pr.scores + i * pr.N;
    const T* rel = pr.rel + i * pr.N;
    const T* sv = row.s.data();
    const T* rv = row.r.data();
    T* gv = row.g.data();
    for (int64_t p = 0; p < pr.P; ++p) {
      const int64_t j = pidx[p];
      if (j < 0) continue;
      const T sj = s[j], rj = rel[j];
      const int64_t m = std::min(row.boundary(rj), row.z);
      const T a = ga[p];
      T tot = T(0);
      if (std::isinf(sj)) {
        g[j] -= graded_backward_tied<T, STEP>(row, pr.step, sj, rj, m, a, gp[p], gv);
        continue;
      }
      if (STEP == kSigmoid) {
        // the self term (k = j, in [0, m)) adds c to g[j] and takes it back through tot
        const T b = gp[p], hi_coef = a + b * rj;
        if (hi_coef != T(0)) tot += grad_sigmoid(sj, sv, gv, m, hi_coef, pr.step.inv_tau);
        if (a != T(0) || b != T(0))
          tot += run_grad_sigmoid_w(sj, sv + m, rv + m, gv + m, row.z - m, a, b, pr.step.inv_tau);
        if (a != T(0)) tot += grad_sigmoid(sj, sv + row.z, gv + row.z, row.nv - row.z, a, pr.step.inv_tau);
      } else {
        // H carries no gradient: only less relevant competitors move, through rank_all
        if (a != T(0)) tot += grad_suprank_neg(sj, sv + m, gv + m, row.nv - m, a, pr.step);
      }
      g[j] -= tot;
    }
    for (int64_t t = 0; t < row.nv; ++t) g[row.col[t]] += gv[t];
  }
}

template <typename T>
GradedProblem<T> make_problem(const PackedProblem& pp, const at::Tensor& rel, double tau, double rho, double delta,
                              double start, double offset) {
  return GradedProblem<T>{problem_view<T>(pp), rel.data_ptr<T>(), make_step_params<T>(tau, rho, delta, start, offset)};
}

constexpr const char* kOp = "fastrank cpu graded_rank_sums";

std::tuple<at::Tensor, at::Tensor> graded_rank_sums_fwd_cpu(const at::Tensor& scores, const at::Tensor& relevance,
                                                            const at::Tensor& pos_idx,
                                                            const std::optional<at::Tensor>& ign_idx,
                                                            const std::optional<at::Tensor>& ign_mask, int64_t step,
                                                            double tau, double rho, double delta, double start,
                                                            double offset) {
  const PackedProblem pp = check_problem(kOp, c10::DeviceType::CPU, scores, pos_idx, ign_idx, ign_mask);
  const at::Tensor rel = check_relevance(kOp, relevance, pp.scores);
  check_step(kOp, step, tau, rho, delta, start, offset, pp.scores.scalar_type());
  check_packed_contract(kOp, pp, &rel);
  at::Tensor rank_all = at::zeros(pp.pos_idx.sizes(), pp.scores.options());
  at::Tensor rank_pos = at::zeros(pp.pos_idx.sizes(), pp.scores.options());
  AT_DISPATCH_FLOATING_TYPES(pp.scores.scalar_type(), "fastrank_graded_rank_sums_fwd_cpu", [&] {
    const GradedProblem<scalar_t> pr = make_problem<scalar_t>(pp, rel, tau, rho, delta, start, offset);
    scalar_t* ra = rank_all.data_ptr<scalar_t>();
    scalar_t* rp = rank_pos.data_ptr<scalar_t>();
    parallel_step_rows<SortedRow<scalar_t>>(kOp, step, pr, [&](auto kind, auto& row, int64_t b, int64_t e) {
      graded_forward_rows<scalar_t, decltype(kind)::value>(&pr, &row, ra, rp, b, e);
    });
  });
  return {rank_all, rank_pos};
}

at::Tensor graded_rank_sums_bwd_cpu(const at::Tensor& grad_all_in, const at::Tensor& grad_pos_in,
                                    const at::Tensor& scores, const at::Tensor& relevance, const at::Tensor& pos_idx,
                                    const std::optional<at::Tensor>& ign_idx,
                                    const std::optional<at::Tensor>& ign_mask, int64_t step, double tau, double rho,
                                    double delta, double start, double offset) {
  const PackedProblem pp = check_problem(kOp, c10::DeviceType::CPU, scores, pos_idx, ign_idx, ign_mask);
  const at::Tensor rel = check_relevance(kOp, relevance, pp.scores);
  check_step(kOp, step, tau, rho, delta, start, offset, pp.scores.scalar_type());
  check_packed_contract(kOp, pp, &rel);
  const OutputGrads og = check_rank_sums_grads(kOp, grad_all_in, grad_pos_in, pp);
  at::Tensor grad = at::empty(pp.scores.sizes(), pp.scores.options());
  AT_DISPATCH_FLOATING_TYPES(pp.scores.scalar_type(), "fastrank_graded_rank_sums_bwd_cpu", [&] {
    const GradedProblem<scalar_t> pr = make_problem<scalar_t>(pp, rel, tau, rho, delta, start, offset);
    const scalar_t* ga = og.all.data_ptr<scalar_t>();
    const scalar_t* gp = og.pos.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    parallel_step_rows<SortedRow<scalar_t>>(kOp, step, pr, [&](auto kind, auto& row, int64_t b, int64_t e) {
      graded_backward_rows<scalar_t, decltype(kind)::value>(&pr, &row, ga, gp, g, b, e);
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrank, CPU, m) {
  m.impl("graded_rank_sums_fwd", &graded_rank_sums_fwd_cpu);
  m.impl("graded_rank_sums_bwd", &graded_rank_sums_bwd_cpu);
}

}  // namespace cpu
}  // namespace fastrank
