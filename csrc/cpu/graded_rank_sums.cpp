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
#include "epilogue.h"
#include "cpu/loops.h"
#include "cpu/parallel.h"

namespace fastrank {
namespace cpu {
namespace {

template <typename T>
struct GradedProblem : ProblemView<T> {
  const T* rel;  // (Q, N) contiguous, >= 0
  StepParams<T> step;
  const T* key = nullptr;  // (Q, N) contiguous ordering key, or nullptr: the relevance
  HRankParams<T> hrank{false, T(0), T(0), T(0)};
  // a key or the H-rank: the per-pair path (graded_generic_one), not the relevance-sorted runs
  bool generic() const { return key != nullptr || hrank.on; }
};

// One row's valid items in decreasing relevance: scores s, relevance r, columns col,
// gradient accumulators g; order is scratch for the sort.
template <typename T>
struct SortedRow {
  static constexpr int64_t kBytesPerColumn = 4 * sizeof(T) + 2 * sizeof(int64_t) + 1;
  std::vector<T> s, r, g, kv;  // kv: the ordering key, when the problem has one
  std::vector<int64_t> col, order;
  std::vector<uint8_t> valid;
  int64_t nv = 0;  // valid items
  int64_t z = 0;   // items with relevance > 0 (a prefix, after the sort)
  const T* keys = nullptr;  // the sorted keys: kv, or r when the key is the relevance
  explicit SortedRow(int64_t n) : s(n), r(n), g(n), kv(n), col(n), order(n), valid(n) {}

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
    keys = r.data();
    if (pr.key != nullptr) {
      const T* krow = pr.key + i * N;
      for (int64_t t = 0; t < nv; ++t) kv[t] = krow[order[t]];
      keys = kv.data();
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

// rank_all and rank_pos of the ranked item with score sj and relevance rj against the sorted
// row. Inlined into each multiversioned caller.
template <typename T, int STEP>
FR_HD void graded_one(const SortedRow<T>& row, const StepParams<T>& st, T sj, T rj, T& ra, T& rp) {
  const int64_t m = std::min(row.boundary(rj), row.z);
  if (std::isinf(sj)) {
    graded_forward_tied<T, STEP>(row, st, sj, rj, m, ra, rp);
    return;
  }
  const T* sv = row.s.data();
  const T* rv = row.r.data();
  T mid = T(0), wmid = T(0);
  if (STEP == kSigmoid) {
    // j itself sits in [0, m) and adds sigma(0) = 1/2: 1 + sum_{k != j} = 1/2 + sum_k
    const T hi = sum_sigmoid(sj, sv, m, st.inv_tau);
    run_sum_sigmoid_w(sj, sv + m, rv + m, row.z - m, st.inv_tau, mid, wmid);
    const T lo = sum_sigmoid(sj, sv + row.z, row.nv - row.z, st.inv_tau);
    rp = rj * (hi + T(0.5)) + wmid;
    ra = hi + (mid + lo) + T(0.5);
  } else {
    // H(0) = 1 for j itself supplies the "1 +" and the "rel_j +"
    const T hi = run_sum_heaviside(sj, sv, m);
    run_sum_suprank_w(sj, sv + m, rv + m, row.z - m, st, mid, wmid);
    const T lo = sum_suprank_neg(sj, sv + row.z, row.nv - row.z, st);
    rp = rj * hi + wmid;
    ra = hi + (mid + lo);
  }
}

// The backward of graded_one given d L / d rank_all = a and d L / d rank_pos = b: adds each
// competitor's share to gv (sorted positions) and returns the sum to subtract from j's gradient.
template <typename T, int STEP>
FR_HD T graded_grad_one(const SortedRow<T>& row, const StepParams<T>& st, T sj, T rj, T a, T b, T* gv) {
  const int64_t m = std::min(row.boundary(rj), row.z);
  if (std::isinf(sj)) return graded_backward_tied<T, STEP>(row, st, sj, rj, m, a, b, gv);
  const T* sv = row.s.data();
  const T* rv = row.r.data();
  T tot = T(0);
  if (STEP == kSigmoid) {
    // the self term (k = j, in [0, m)) adds c to g[j] and takes it back through tot
    const T hi_coef = a + b * rj;
    if (hi_coef != T(0)) tot += grad_sigmoid(sj, sv, gv, m, hi_coef, st.inv_tau);
    if (a != T(0) || b != T(0))
      tot += run_grad_sigmoid_w(sj, sv + m, rv + m, gv + m, row.z - m, a, b, st.inv_tau);
    if (a != T(0)) tot += grad_sigmoid(sj, sv + row.z, gv + row.z, row.nv - row.z, a, st.inv_tau);
  } else {
    // H carries no gradient: only less relevant competitors move, through rank_all
    if (a != T(0)) tot += grad_suprank_neg(sj, sv + m, gv + m, row.nv - m, a, st);
  }
  return tot;
}

// The per-pair path, for an ordering key apart from the relevance or the smoothed H-rank: the
// runs above order competitors by relevance, which is no longer the comparison, so each pair
// compares keys itself (key_k >= key_j: H, else H^- in rank_all; with the H-rank, key_k > key_j:
// h+ in rank_pos) and weighs rank_pos by min(rel_j, rel_k). Scalar, over the sorted row; j's own
// term is one of the pairs (a tie: H(0) = 1 supplies the "1 +" and the "rel_j +"; sigma(0) = 1/2
// is completed below). step_diff / tied_grad throughout, so infinite scores need no other loop.
template <typename T, int STEP>
void graded_generic_one(const SortedRow<T>& row, const StepParams<T>& st, const HRankParams<T>& hr, T sj, T rj, T kj,
                        T& ra, T& rp) {
  T all = T(0), pos = T(0);
  for (int64_t t = 0; t < row.nv; ++t) {
    const T d = step_diff(row.s[t], sj);
    const T w = row.r[t] < rj ? row.r[t] : rj;
    if (STEP == kSigmoid) {
      const T v = sigmoid_tau(d, st.inv_tau);
      all += v;
      pos += w * v;
    } else {
      const T h = heaviside(d);
      all += row.keys[t] >= kj ? h : suprank_neg(d, st);
      pos += w * (hr.on && row.keys[t] > kj ? hrank_plus(d, hr) : h);
    }
  }
  ra = STEP == kSigmoid ? all + T(0.5) : all;
  rp = STEP == kSigmoid ? pos + rj * T(0.5) : pos;
}

// Its backward given d L / d rank_all = a and d L / d rank_pos = b: adds each competitor's share
// to gv (sorted positions) and returns the sum to subtract from j's gradient.
template <typename T, int STEP>
T graded_generic_grad_one(const SortedRow<T>& row, const StepParams<T>& st, const HRankParams<T>& hr, T sj, T rj,
                          T kj, T a, T b, T* gv) {
  T tot = T(0);
  for (int64_t t = 0; t < row.nv; ++t) {
    const T draw = row.s[t] - sj;
    const T d = step_diff(row.s[t], sj);
    const T w = row.r[t] < rj ? row.r[t] : rj;
    T c;
    if (STEP == kSigmoid) {
      c = (a + b * w) * tied_grad(draw, sigmoid_tau_grad(d, st.inv_tau));
    } else {
      c = row.keys[t] < kj ? a * tied_grad(draw, suprank_neg_grad(d, st)) : T(0);
      if (hr.on && row.keys[t] > kj) c += b * w * tied_grad(draw, hrank_plus_grad(d, hr));
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
    const T* key = pr.key != nullptr ? pr.key + i * pr.N : rel;
    for (int64_t p = 0; p < pr.P; ++p) {
      const int64_t j = pidx[p];
      if (j < 0) continue;
      if (nan_row) {
        ra[p] = rp[p] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      if (pr.generic())
        graded_generic_one<T, STEP>(row, pr.step, pr.hrank, s[j], rel[j], key[j], ra[p], rp[p]);
      else
        graded_one<T, STEP>(row, pr.step, s[j], rel[j], ra[p], rp[p]);
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
    const T* key = pr.key != nullptr ? pr.key + i * pr.N : rel;
    for (int64_t p = 0; p < pr.P; ++p) {
      const int64_t j = pidx[p];
      if (j < 0) continue;
      g[j] -= pr.generic() ? graded_generic_grad_one<T, STEP>(row, pr.step, pr.hrank, s[j], rel[j], key[j], ga[p],
                                                              gp[p], row.g.data())
                           : graded_grad_one<T, STEP>(row, pr.step, s[j], rel[j], ga[p], gp[p], row.g.data());
    }
    for (int64_t t = 0; t < row.nv; ++t) g[row.col[t]] += row.g[t];
  }
}

// ---------------------------------------------------------------- fused loss op (H-AP, NDCG)
//
// docs/design.md §2.4: one task per block of query rows, each row in one pass while it is in
// cache: its relevance checked, its ranked items found from the dense relevance as given (no
// packing), sorted (SortedRow), their rank sums, the row's H-AP or NDCG (a graded epilogue of
// csrc/epilogue.h, which takes the ranked items in the sorted order: NDCG's ideal ordering) and,
// with the gradient, d score_i / d s_i through graded_grad_one. Autograd multiplies the rows by
// grad_output (query i's score depends on row i alone).

template <typename T>
struct GradedLossProblem : GradedProblem<T> {
  T rel_limit;  // relevance must stay below it (NDCG: the gain 2^rel - 1 finite in T), else inf
};

template <typename T>
struct LossRow : SortedRow<T> {
  static constexpr int64_t kBytesPerColumn = SortedRow<T>::kBytesPerColumn + 4 * sizeof(T);
  std::vector<T> ra, rp, d_all, d_pos;  // per ranked item, in the sorted order
  std::vector<T> der;                   // the stored derivatives, at most kDerivativeBytes
  explicit LossRow(int64_t n) : SortedRow<T>(n), ra(n), rp(n), d_all(n), d_pos(n), der(derivative_elems<T>(n)) {}
};

// With the gradient, as the binary loss_rows of cpu/rank_sums.cpp: the forward sweep stores each
// term's step derivative at der (the row's nv sorted positions; SupRank only [m, nv), H has no
// gradient) and the gradient sweep multiplies and adds, while the row's z x nv derivatives fit
// the buffer and no ranked score is infinite (those take the tied loops, which recompute).

// graded_one, its derivatives stored
template <typename T, int STEP>
FR_HD void graded_one_stored(const SortedRow<T>& row, const StepParams<T>& st, T sj, T rj, T* der, T& ra, T& rp) {
  const int64_t m = std::min(row.boundary(rj), row.z);
  const T* sv = row.s.data();
  const T* rv = row.r.data();
  T mid = T(0), wmid = T(0);
  if (STEP == kSigmoid) {
    const T hi = sum_store_sigmoid(sj, sv, der, m, st.inv_tau);
    run_sum_store_sigmoid_w(sj, sv + m, rv + m, der + m, row.z - m, st.inv_tau, mid, wmid);
    const T lo = sum_store_sigmoid(sj, sv + row.z, der + row.z, row.nv - row.z, st.inv_tau);
    rp = rj * (hi + T(0.5)) + wmid;
    ra = hi + (mid + lo) + T(0.5);
  } else {
    const T hi = run_sum_heaviside(sj, sv, m);
    run_sum_store_suprank_w(sj, sv + m, rv + m, der + m, row.z - m, st, mid, wmid);
    const T lo = sum_store_suprank_neg(sj, sv + row.z, der + row.z, row.nv - row.z, st);
    rp = rj * hi + wmid;
    ra = hi + (mid + lo);
  }
}

// graded_grad_one from the derivatives graded_one_stored left at der
template <typename T, int STEP>
FR_HD T graded_grad_one_stored(const SortedRow<T>& row, T rj, const T* der, T a, T b, T* gv) {
  const int64_t m = std::min(row.boundary(rj), row.z);
  const T* rv = row.r.data();
  T tot = T(0);
  if (STEP == kSigmoid) {
    const T hi_coef = a + b * rj;
    if (hi_coef != T(0)) tot += run_grad_stored(der, gv, m, hi_coef);
    if (a != T(0) || b != T(0)) tot += run_grad_stored_w(der + m, rv + m, gv + m, row.z - m, a, b);
    if (a != T(0)) tot += run_grad_stored(der + row.z, gv + row.z, row.nv - row.z, a);
  } else {
    if (a != T(0)) tot += run_grad_stored(der + m, gv + m, row.nv - m, a);
  }
  return tot;
}

// Why a row's relevance is refused (0: accepted), in the order of the Python checks
// (fastrank.core.validate.check_relevance, fastrank.graded._check_gain_range)
enum RelevanceStatus : uint8_t { kRelOk = 0, kRelNotFinite, kRelNegative, kRelSubnormal, kRelTooLarge, kKeyNotFinite };

template <typename T>
inline bool all_finite(const T* v, int64_t n) {
  bool ok = true;
  for (int64_t k = 0; k < n; ++k) ok &= std::abs(v[k]) <= std::numeric_limits<T>::max();
  return ok;
}

// One pass over the whole row, ignored items included, as the Python layer checks them
template <typename T>
inline uint8_t relevance_status(const T* r, int64_t n, T limit) {
  bool not_finite = false, negative = false, subnormal = false, too_large = false;
  for (int64_t k = 0; k < n; ++k) {
    const T v = r[k];
    not_finite |= !(std::abs(v) <= std::numeric_limits<T>::max());
    negative |= v < T(0);
    subnormal |= v > T(0) && v < std::numeric_limits<T>::min();
    too_large |= v >= limit;
  }
  return not_finite ? kRelNotFinite : negative ? kRelNegative : subnormal ? kRelSubnormal
                                                              : too_large ? kRelTooLarge : kRelOk;
}

template <typename T, int STEP, typename Epilogue>
FR_MULTIVERSION void graded_loss_rows(const GradedLossProblem<T>* prp, const Epilogue* epp, LossRow<T>* rowp,
                                      T* score, int64_t* n_pos, T* grad, uint8_t* status, int64_t begin,
                                      int64_t end) {
  const GradedLossProblem<T>& pr = *prp;
  const Epilogue& epi = *epp;
  LossRow<T>& row = *rowp;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int64_t i = begin; i < end; ++i) {
    T* g = grad ? grad + i * pr.N : nullptr;
    if (g) std::fill(g, g + pr.N, T(0));  // first touch by the owning thread
    n_pos[i] = 0;
    score[i] = T(0);
    status[i] = relevance_status(pr.rel + i * pr.N, pr.N, pr.rel_limit);
    if (status[i] == kRelOk && pr.key != nullptr && !all_finite(pr.key + i * pr.N, pr.N)) status[i] = kKeyNotFinite;
    if (status[i] != kRelOk) continue;  // the call raises once every row is done
    const bool nan_row = row.load(pr, i);
    const int64_t z = row.z;
    n_pos[i] = z;
    if (nan_row) {
      // NaN in -> NaN out, also for a query without relevant items; its gradient row is NaN
      // at the valid items when the score depends on them (z > 0), as the two-pass path gives
      score[i] = nan;
      if (g && z > 0)
        for (int64_t t = 0; t < row.nv; ++t) g[row.col[t]] = nan;
      continue;
    }
    if (z == 0) continue;
    const int64_t nv = row.nv;
    // the per-pair path (a key, the H-rank) recomputes in its gradient sweep
    bool stored = g != nullptr && !pr.generic() && z <= static_cast<int64_t>(row.der.size()) / std::max<int64_t>(1, nv);
    for (int64_t t = 0; stored && t < z; ++t) stored = !std::isinf(row.s[t]);
    for (int64_t t = 0; t < z; ++t) {
      if (pr.generic())
        graded_generic_one<T, STEP>(row, pr.step, pr.hrank, row.s[t], row.r[t], row.keys[t], row.ra[t], row.rp[t]);
      else if (stored)
        graded_one_stored<T, STEP>(row, pr.step, row.s[t], row.r[t], row.der.data() + t * nv, row.ra[t], row.rp[t]);
      else
        graded_one<T, STEP>(row, pr.step, row.s[t], row.r[t], row.ra[t], row.rp[t]);
    }
    score[i] = epi.value(row.ra.data(), row.rp.data(), row.r.data(), z);
    if (!g) continue;
    epi.grad(row.ra.data(), row.rp.data(), row.r.data(), z, row.d_all.data(), row.d_pos.data());
    T* gv = row.g.data();
    std::fill(gv, gv + row.nv, T(0));
    for (int64_t t = 0; t < z; ++t) {
      const T tot =
          pr.generic()
              ? graded_generic_grad_one<T, STEP>(row, pr.step, pr.hrank, row.s[t], row.r[t], row.keys[t],
                                                 row.d_all[t], row.d_pos[t], gv)
          : stored ? graded_grad_one_stored<T, STEP>(row, row.r[t], row.der.data() + t * nv, row.d_all[t],
                                                     row.d_pos[t], gv)
                   : graded_grad_one<T, STEP>(row, pr.step, row.s[t], row.r[t], row.d_all[t], row.d_pos[t], gv);
      gv[t] -= tot;
    }
    for (int64_t t = 0; t < nv; ++t) g[row.col[t]] = gv[t];
  }
}

template <typename T>
GradedProblem<T> make_problem(const PackedProblem& pp, const at::Tensor& rel, const std::optional<at::Tensor>& key,
                              double tau, double rho, double delta, double start, double offset, bool hrank,
                              double beta, double gamma, double leak) {
  GradedProblem<T> pr{problem_view<T>(pp), rel.data_ptr<T>(), make_step_params<T>(tau, rho, delta, start, offset)};
  pr.key = key ? key->data_ptr<T>() : nullptr;
  pr.hrank = make_hrank_params<T>(hrank, beta, gamma, leak);
  return pr;
}

constexpr const char* kOp = "fastrank cpu graded_rank_sums";

std::tuple<at::Tensor, at::Tensor> graded_rank_sums_fwd_cpu(
    const at::Tensor& scores, const at::Tensor& relevance, const std::optional<at::Tensor>& key_in,
    const at::Tensor& pos_idx, const std::optional<at::Tensor>& ign_idx, const std::optional<at::Tensor>& ign_mask,
    int64_t step, double tau, double rho, double delta, double start, double offset, bool hrank, double beta,
    double gamma, double leak) {
  const PackedProblem pp = check_problem(kOp, c10::DeviceType::CPU, scores, pos_idx, ign_idx, ign_mask);
  const at::Tensor rel = check_relevance(kOp, relevance, pp.scores);
  const std::optional<at::Tensor> key = check_key(kOp, key_in, pp.scores, /*check_values=*/true);
  check_step(kOp, step, tau, rho, delta, start, offset, pp.scores.scalar_type());
  check_hrank(kOp, step, hrank, beta, gamma, leak);
  check_packed_contract(kOp, pp, &rel);
  at::Tensor rank_all = at::zeros(pp.pos_idx.sizes(), pp.scores.options());
  at::Tensor rank_pos = at::zeros(pp.pos_idx.sizes(), pp.scores.options());
  AT_DISPATCH_FLOATING_TYPES(pp.scores.scalar_type(), "fastrank_graded_rank_sums_fwd_cpu", [&] {
    const GradedProblem<scalar_t> pr =
        make_problem<scalar_t>(pp, rel, key, tau, rho, delta, start, offset, hrank, beta, gamma, leak);
    scalar_t* ra = rank_all.data_ptr<scalar_t>();
    scalar_t* rp = rank_pos.data_ptr<scalar_t>();
    parallel_step_rows<SortedRow<scalar_t>>(kOp, step, pr, [&](auto kind, auto& row, int64_t b, int64_t e) {
      graded_forward_rows<scalar_t, decltype(kind)::value>(&pr, &row, ra, rp, b, e);
    });
  });
  return {rank_all, rank_pos};
}

at::Tensor graded_rank_sums_bwd_cpu(const at::Tensor& grad_all_in, const at::Tensor& grad_pos_in,
                                    const at::Tensor& scores, const at::Tensor& relevance,
                                    const std::optional<at::Tensor>& key_in, const at::Tensor& pos_idx,
                                    const std::optional<at::Tensor>& ign_idx,
                                    const std::optional<at::Tensor>& ign_mask, int64_t step, double tau, double rho,
                                    double delta, double start, double offset, bool hrank, double beta, double gamma,
                                    double leak) {
  const PackedProblem pp = check_problem(kOp, c10::DeviceType::CPU, scores, pos_idx, ign_idx, ign_mask);
  const at::Tensor rel = check_relevance(kOp, relevance, pp.scores);
  const std::optional<at::Tensor> key = check_key(kOp, key_in, pp.scores, /*check_values=*/true);
  check_step(kOp, step, tau, rho, delta, start, offset, pp.scores.scalar_type());
  check_hrank(kOp, step, hrank, beta, gamma, leak);
  check_packed_contract(kOp, pp, &rel);
  const OutputGrads og = check_rank_sums_grads(kOp, grad_all_in, grad_pos_in, pp);
  at::Tensor grad = at::empty(pp.scores.sizes(), pp.scores.options());
  AT_DISPATCH_FLOATING_TYPES(pp.scores.scalar_type(), "fastrank_graded_rank_sums_bwd_cpu", [&] {
    const GradedProblem<scalar_t> pr =
        make_problem<scalar_t>(pp, rel, key, tau, rho, delta, start, offset, hrank, beta, gamma, leak);
    const scalar_t* ga = og.all.data_ptr<scalar_t>();
    const scalar_t* gp = og.pos.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    parallel_step_rows<SortedRow<scalar_t>>(kOp, step, pr, [&](auto kind, auto& row, int64_t b, int64_t e) {
      graded_backward_rows<scalar_t, decltype(kind)::value>(&pr, &row, ga, gp, g, b, e);
    });
  });
  return grad;
}

// H-AP (kind 0) or NDCG (kind 1) per query, its number of ranked items and, with_grad, the
// gradient rows; relevance (Q, N) in the dtype of scores, its values checked in the rows' pass
enum GradedLossKind : int64_t { kHap = 0, kNdcg = 1 };

constexpr const char* kLossOp = "fastrank cpu graded_loss";

std::tuple<at::Tensor, at::Tensor, at::Tensor> graded_loss_cpu(
    const at::Tensor& scores_in, const at::Tensor& relevance_in, const std::optional<at::Tensor>& key_in,
    const std::optional<at::Tensor>& ign_idx, const std::optional<at::Tensor>& ign_mask, int64_t step, double tau,
    double rho, double delta, double start, double offset, bool hrank, double beta, double gamma, double leak,
    int64_t kind, bool with_grad) {
  check_scores_and_ignore(kLossOp, c10::DeviceType::CPU, scores_in, ign_idx, ign_mask);
  check_relevance_layout(kLossOp, relevance_in, scores_in);
  // the key's values are checked in the rows' pass (kKeyNotFinite)
  const std::optional<at::Tensor> key = check_key(kLossOp, key_in, scores_in, /*check_values=*/false);
  check_step(kLossOp, step, tau, rho, delta, start, offset, scores_in.scalar_type());
  check_hrank(kLossOp, step, hrank, beta, gamma, leak);
  TORCH_CHECK_VALUE(kind == kHap || kind == kNdcg, kLossOp, ": kind must be ", int64_t(kHap), " (H-AP) or ",
                    int64_t(kNdcg), " (NDCG), got ", kind);
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor rel = relevance_in.contiguous();
  const std::optional<at::Tensor> idx = ign_idx ? std::optional<at::Tensor>(ign_idx->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> mask = ign_mask ? std::optional<at::Tensor>(ign_mask->contiguous()) : std::nullopt;
  const int64_t Q = scores.size(0), N = scores.size(1);
  at::Tensor score = at::empty({Q}, scores.options());
  at::Tensor n_pos = at::empty({Q}, scores.options().dtype(at::kLong));
  at::Tensor grad = empty_grad_rows(with_grad ? Q : 0, N, scores.options());
  std::vector<uint8_t> status(static_cast<size_t>(Q), kRelOk);
  // NDCG's gain 2^rel - 1 must be finite in the dtype: rel < log2(max)
  const double limit = kind == kNdcg ? std::log2(dtype_max(scores.scalar_type())) : std::numeric_limits<double>::infinity();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "fastrank_graded_loss_cpu", [&] {
    using T = scalar_t;
    const ProblemView<T> view{scores.data_ptr<T>(), nullptr, idx ? idx->data_ptr<int64_t>() : nullptr,
                              mask ? mask->data_ptr<bool>() : nullptr, Q, N, 0};
    GradedLossProblem<T> pr{{view, rel.data_ptr<T>(), make_step_params<T>(tau, rho, delta, start, offset)},
                            T(limit)};
    pr.key = key ? key->data_ptr<T>() : nullptr;
    pr.hrank = make_hrank_params<T>(hrank, beta, gamma, leak);
    T* sc = score.data_ptr<T>();
    int64_t* np = n_pos.data_ptr<int64_t>();
    T* g = with_grad ? grad.data_ptr<T>() : nullptr;
    auto run = [&](const auto& epi) {
      // the ranked items are unknown before the rows are read: tasks sized for N per row
      dispatch_step(step, [&](auto step_kind) {
        parallel_rows<LossRow<T>>(kLossOp, Q, rows_per_task(N, N), N, LossRow<T>::kBytesPerColumn,
                                  [&](LossRow<T>& row, int64_t b, int64_t e) {
                                    graded_loss_rows<T, decltype(step_kind)::value>(&pr, &epi, &row, sc, np, g,
                                                                                    status.data(), b, e);
                                  });
      });
    };
    if (kind == kHap)
      run(HapEpilogue<T>{});
    else
      run(NdcgEpilogue<T>{});
  });
  const auto bad = std::find_if(status.begin(), status.end(), [](uint8_t v) { return v != kRelOk; });
  if (bad != status.end()) {
    const int64_t i = bad - status.begin();
    const at::Tensor row = rel[i];
    const bool single = scores.scalar_type() == at::kFloat;
    const char* dtype = single ? "float32" : "float64";
    TORCH_CHECK_VALUE(*bad != kRelNotFinite, kLossOp, ": relevance must be finite (no NaN or inf), got one in row ",
                      i);
    TORCH_CHECK_VALUE(*bad != kKeyNotFinite, kLossOp, ": `key` must be finite (no NaN or inf), got one in row ", i);
    TORCH_CHECK_VALUE(*bad != kRelNegative, kLossOp, ": relevance must be >= 0 (0 = irrelevant), got a minimum of ",
                      row.min().item<double>(), " in row ", i);
    TORCH_CHECK_VALUE(*bad != kRelSubnormal, kLossOp, ": relevance has positive values below the smallest normal ",
                      dtype, " in row ", i, " (they lose their precision); rescale the relevance",
                      single ? " or pass float64 scores" : "");
    TORCH_CHECK_VALUE(false, kLossOp, ": relevance up to ", row.max().item<double>(), " in row ", i,
                      " overflows the gain 2^rel - 1 of NDCG in ", dtype, " (needs rel < ", limit,
                      "); rescale the relevance", single ? " or pass float64 scores" : "");
  }
  return {score, n_pos, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrank, CPU, m) {
  m.impl("graded_rank_sums_fwd", &graded_rank_sums_fwd_cpu);
  m.impl("graded_rank_sums_bwd", &graded_rank_sums_bwd_cpu);
  m.impl("graded_loss", &graded_loss_cpu);
}

}  // namespace cpu
}  // namespace fastrank
