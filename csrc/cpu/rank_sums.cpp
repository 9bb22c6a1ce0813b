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

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "epilogue.h"
#include "cpu/loops.h"
#include "cpu/loss_sweeps.h"
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
  // flag is padded (kFlagBytesPad zero bytes): the fused rows' last vector reads flags 0 there
  explicit RowBuffers(int64_t n)
      : spos(n), sneg(n), gpos(n), gneg(n), pcol(n), ncol(n), flag(n + kFlagBytesPad) {}
};

// Compacts row i's flagged items (flag 2: positive, 1: negative, 0: left out) into the
// buffers' runs, in column order, with their columns when kColumns (the fused loss rows walk
// the flags instead: 8 bytes less traffic per item). Returns true when a valid score is NaN:
// the whole row's output is then NaN, as in the references (a NaN competitor poisons every
// sum it enters).
template <typename T, bool kColumns = true>
static bool compact_flagged(const T* s, int64_t N, RowBuffers<T>& b, int64_t& np, int64_t& nn) {
  const uint8_t* flag = b.flag.data();
  np = nn = 0;
  bool has_nan = false;
  for (int64_t k = 0; k < N; ++k) {
    const T v = s[k];
    if (flag[k] == 2) {
      if (kColumns) b.pcol[np] = k;
      b.spos[np++] = v;
    } else if (flag[k] == 1) {
      if (kColumns) b.ncol[nn] = k;
      b.sneg[nn++] = v;
    } else {
      continue;
    }
    has_nan |= std::isnan(v);
  }
  return has_nan;
}

// Splits row i's valid items into its packed positives and the negatives (compact_flagged).
template <typename T>
static bool compact_row(const Problem<T>& pr, int64_t i, RowBuffers<T>& b, int64_t& np, int64_t& nn) {
  uint8_t* flag = b.flag.data();
  mark_valid_columns(pr, i, flag);
  const int64_t* pidx = pr.pos_idx + i * pr.P;
  for (int64_t p = 0; p < pr.P; ++p) {
    if (pidx[p] >= 0) flag[pidx[p]] = 2;
  }
  return compact_flagged(pr.scores + i * pr.N, pr.N, b, np, nn);
}

// rank_all and rank_pos of one ranked positive with score sj against row buffers b (np
// positives, nn negatives, sj among the positives). Inlined into each multiversioned caller.
template <typename T, int STEP>
FR_HD void rank_one(const StepParams<T>& st, T sj, const RowBuffers<T>& b, int64_t np, int64_t nn, T& ra, T& rp) {
  if (std::isinf(sj)) {
    // j and every equal score tie (step_diff): j's own term is still sigma(0) or H(0)
    if (STEP == kSigmoid) {
      auto sig = [st](T d) { return sigmoid_tau(d, st.inv_tau); };
      const T sp = tied_sum(sj, b.spos.data(), np, sig);
      rp = sp + T(0.5);
      ra = sp + tied_sum(sj, b.sneg.data(), nn, sig) + T(0.5);
    } else {
      const T hp = tied_sum(sj, b.spos.data(), np, [](T d) { return heaviside(d); });
      rp = hp;
      ra = hp + tied_sum(sj, b.sneg.data(), nn, [st](T d) { return suprank_neg(d, st); });
    }
    return;
  }
  if (STEP == kSigmoid) {
    // the runs include j itself, which adds sigma(0) = 1/2: 1 + sum_{k != j} = 1/2 + sum_k
    const T sp = sum_sigmoid(sj, b.spos.data(), np, st.inv_tau);
    const T sn = sum_sigmoid(sj, b.sneg.data(), nn, st.inv_tau);
    rp = sp + T(0.5);
    ra = sp + sn + T(0.5);
  } else {
    // H(0) = 1 for j itself supplies the "1 +"
    const T hp = run_sum_heaviside(sj, b.spos.data(), np);
    const T sn = sum_suprank_neg(sj, b.sneg.data(), nn, st);
    rp = hp;
    ra = hp + sn;
  }
}

// The backward of rank_one given d L / d rank_all = a and d L / d rank_pos = bp: adds each
// competitor's share to b.gpos / b.gneg and returns the sum to subtract from j's gradient.
template <typename T, int STEP>
FR_HD T grad_one(const StepParams<T>& st, T sj, RowBuffers<T>& b, int64_t np, int64_t nn, T a, T bp) {
  T tot = T(0);
  if (std::isinf(sj)) {
    // ties of infinities (j's own term included) carry no gradient
    if (STEP == kSigmoid) {
      auto dsig = [st](T d) { return sigmoid_tau_grad(d, st.inv_tau); };
      tot += tied_grad_run(sj, b.spos.data(), b.gpos.data(), np, a + bp, dsig);
      tot += tied_grad_run(sj, b.sneg.data(), b.gneg.data(), nn, a, dsig);
    } else {
      tot += tied_grad_run(sj, b.sneg.data(), b.gneg.data(), nn, a, [st](T d) { return suprank_neg_grad(d, st); });
    }
    return tot;
  }
  if (STEP == kSigmoid) {
    // self term (k = j) adds c to g[j] and subtracts it again: net zero
    const T apb = a + bp;
    if (apb != T(0)) tot += grad_sigmoid(sj, b.spos.data(), b.gpos.data(), np, apb, st.inv_tau);
    if (a != T(0)) tot += grad_sigmoid(sj, b.sneg.data(), b.gneg.data(), nn, a, st.inv_tau);
  } else {
    // H carries no gradient: only negatives move, and only through rank_all
    if (a != T(0)) tot += grad_suprank_neg(sj, b.sneg.data(), b.gneg.data(), nn, a, st);
  }
  return tot;
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
      rank_one<T, STEP>(pr.step, s[j], b, np, nn, ra[p], rp[p]);
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
      g[j] -= grad_one<T, STEP>(pr.step, s[j], b, np, nn, ga[p], gp[p]);
    }
    for (int64_t k = 0; k < np; ++k) g[b.pcol[k]] += b.gpos[k];
    for (int64_t k = 0; k < nn; ++k) g[b.ncol[k]] += b.gneg[k];
  }
}

// ---------------------------------------------------------------- fused loss ops
//
// One task per block of query rows, each row in one pass while it is in cache (docs/design.md
// §2.4): its positives found from the target as given (labels or dense relevance, no packing),
// its rank sums, the loss's score of the row (an epilogue of csrc/epilogue.h: AP, Recall@k) and,
// with_grad, the gradient row d score_i / d s_i. Autograd multiplies the rows by grad_output
// (query i's score depends on row i alone).
//
// A row is swept in place against blocks of up to four positives (loss_sweeps.h): nothing is
// compacted but the row's few positives. With the gradient, the forward sweep also sums each
// positive's step derivatives (its own share of the gradient) and, while the row's |P_i| x N
// derivatives fit kDerivativeBytes per thread, stores them, so that the gradient sweep only
// multiplies and adds, writing the row once in column order; beyond the budget that sweep
// recomputes them. A row with an infinite positive, whose ties need step_diff, takes the
// compacted runs of the two-pass kernels (rank_one / grad_one). All give the same products
// c_k = coef * step'(d), so the same gradient.

template <typename T>
struct LossProblem : ProblemView<T> {
  StepParams<T> step;
  TargetView target;
};

template <typename T>
struct LossBuffers : RowBuffers<T> {
  static constexpr int64_t kBytesPerColumn = RowBuffers<T>::kBytesPerColumn + 6 * sizeof(T);
  std::vector<T> ra, rp, d_all, d_pos, dsum_all, dsum_pos;  // per ranked positive
  std::vector<T> der;  // the stored derivatives, rows padded_row(N) apart, at most kDerivativeBytes
  explicit LossBuffers(int64_t n)
      : RowBuffers<T>(n), ra(n), rp(n), d_all(n), d_pos(n), dsum_all(n), dsum_pos(n),
        der(derivative_elems<T>(n, padded_row(n))) {}
};

// The positives of a flagged row, in column order: their scores to spos, columns to pcol. The
// flags are scanned eight at a time (a flag 2 has bit 1 set): most rows have few positives.
template <typename T>
static int64_t collect_positives(const T* s, const uint8_t* flag, int64_t N, T* spos, int64_t* pcol) {
  int64_t np = 0;
  int64_t k = 0;
  for (; k + 8 <= N; k += 8) {
    uint64_t w;
    std::memcpy(&w, flag + k, sizeof(w));
    if ((w & 0x0202020202020202ull) == 0) continue;
    for (int64_t l = k; l < k + 8; ++l)
      if (flag[l] == 2) {
        spos[np] = s[l];
        pcol[np++] = l;
      }
  }
  for (; k < N; ++k)
    if (flag[k] == 2) {
      spos[np] = s[k];
      pcol[np++] = k;
    }
  return np;
}

// The forward sweep of the positives sj[0, NB) (loss_sweeps.h), its sums to the per-positive
// arrays; returns the sweep's NaN report
template <typename T, bool kVector, int STEP, int NB>
static bool forward_block(const T* s, const uint8_t* f, int64_t N, const T* sj, const StepParams<T>& st, bool grad,
                          bool store, T* all, T* dall, T* der, int64_t stride) {
  BlockSums<T, NB> o;
  const bool nan = !grad  ? sweep_forward<T, kVector, STEP, NB, false, false>(s, f, N, sj, st, &o, der, stride)
                   : store ? sweep_forward<T, kVector, STEP, NB, true, true>(s, f, N, sj, st, &o, der, stride)
                           : sweep_forward<T, kVector, STEP, NB, true, false>(s, f, N, sj, st, &o, der, stride);
  for (int p = 0; p < NB; ++p) {
    all[p] = o.all[p];
    dall[p] = o.dall[p];
  }
  return nan;
}

// Blocks of four positives, then two, then one
inline int block_of(int64_t left) { return left >= 4 ? 4 : left >= 2 ? 2 : 1; }

// One row with finite positives (np > 0), swept in place. Returns false when a valid score is
// NaN (nothing written then: the caller makes the row NaN).
template <typename T, bool kVector, int STEP, typename Epilogue>
static bool swept_row(const LossProblem<T>& pr, const Epilogue& epi, LossBuffers<T>& b, int64_t i, int64_t np,
                      T* score, T* g) {
  const T* s = pr.scores + i * pr.N;
  const int64_t N = pr.N, stride = padded_row(N);
  const uint8_t* f = b.flag.data();
  const T* sp = b.spos.data();
  const bool store = g != nullptr && np <= static_cast<int64_t>(b.der.size()) / stride;
  T *ra = b.ra.data(), *rp = b.rp.data(), *da = b.dsum_all.data(), *dp = b.dsum_pos.data();
  bool nan = false;
  for (int64_t p = 0; p < np;) {
    const int nb = block_of(np - p);
    T* der = b.der.data() + (store ? p * stride : 0);
    const bool grad = g != nullptr;
    nan |= nb == 4   ? forward_block<T, kVector, STEP, 4>(s, f, N, sp + p, pr.step, grad, store, ra + p, da + p,
                                                         der, stride)
           : nb == 2 ? forward_block<T, kVector, STEP, 2>(s, f, N, sp + p, pr.step, grad, store, ra + p, da + p,
                                                         der, stride)
                     : forward_block<T, kVector, STEP, 1>(s, f, N, sp + p, pr.step, grad, store, ra + p, da + p,
                                                         der, stride);
    p += nb;
  }
  if (nan) return false;
  for (int64_t p = 0; p < np; ++p) {
    T pos, dpos;
    positive_sums<T, kVector, STEP>(sp, np, sp[p], pr.step, &pos, &dpos);
    if (STEP == kSigmoid) {
      // the sums include the positive's own term sigma(0) = 1/2: 1 + sum_{k != j} = 1/2 + sum_k
      ra[p] += T(0.5);
      rp[p] = pos + T(0.5);
      dp[p] = dpos;
    } else {
      // H(0) = 1 of the own term supplies the "1 +"
      ra[p] += pos;
      rp[p] = pos;
    }
  }
  *score = epi.value(ra, rp, np);
  if (!g) return true;
  T *a = b.d_all.data(), *bp = b.d_pos.data();
  epi.grad(ra, rp, np, a, bp);
  // the gradient row in blocks of positives, the first block writing it
  const T inv_tau = pr.step.inv_tau;
  T* c = b.ra.data();  // free again: the epilogue has consumed it
  // (the stored sweep's coefficients: the stored terms of both steps are 1/tau short)
  for (int64_t p = 0; p < np; ++p) c[p] = a[p] * inv_tau;
  for (int64_t p = 0; p < np;) {
    const int nb = block_of(np - p);
    const bool first = p == 0;
    if (store) {
      const T* der = b.der.data() + p * stride;
      if (nb == 4)
        sweep_grad_stored<T, kVector, STEP, 4>(N, der, stride, c + p, first, g, da + p, pr.step);
      else if (nb == 2)
        sweep_grad_stored<T, kVector, STEP, 2>(N, der, stride, c + p, first, g, da + p, pr.step);
      else
        sweep_grad_stored<T, kVector, STEP, 1>(N, der, stride, c + p, first, g, da + p, pr.step);
    } else {
      if (nb == 4)
        sweep_grad_recompute<T, kVector, STEP, 4>(s, f, N, sp + p, pr.step, a + p, first, g);
      else if (nb == 2)
        sweep_grad_recompute<T, kVector, STEP, 2>(s, f, N, sp + p, pr.step, a + p, first, g);
      else
        sweep_grad_recompute<T, kVector, STEP, 1>(s, f, N, sp + p, pr.step, a + p, first, g);
    }
    p += nb;
  }
  // the positives' columns: the sigmoid's rank_pos share, then each positive's own share (the sum
  // of the shares it gave the others, its own term included, which the sweep also gave it: they
  // cancel)
  const int64_t* pcol = b.pcol.data();
  for (int64_t q = 0; q < np; ++q) {
    T& gq = g[pcol[q]];
    if (STEP == kSigmoid) {
      gq += positive_grad(sp, np, sp[q], bp, inv_tau);
      gq -= (a[q] * da[q] + bp[q] * dp[q]) * inv_tau;
    } else {
      gq -= store ? a[q] * da[q] * inv_tau : a[q] * da[q];
    }
  }
  return true;
}

// A row with an infinite positive: the compacted runs and the scalar tied loops of the two-pass
// kernels. Returns false when a valid score is NaN.
template <typename T, int STEP, typename Epilogue>
static bool compacted_row(const LossProblem<T>& pr, const Epilogue& epi, LossBuffers<T>& b, int64_t i, T* score,
                          T* g) {
  int64_t np, nn;
  if (compact_flagged<T, false>(pr.scores + i * pr.N, pr.N, b, np, nn)) return false;
  for (int64_t p = 0; p < np; ++p) rank_one<T, STEP>(pr.step, b.spos[p], b, np, nn, b.ra[p], b.rp[p]);
  *score = epi.value(b.ra.data(), b.rp.data(), np);
  if (!g) return true;
  epi.grad(b.ra.data(), b.rp.data(), np, b.d_all.data(), b.d_pos.data());
  std::fill(b.gpos.begin(), b.gpos.begin() + np, T(0));
  std::fill(b.gneg.begin(), b.gneg.begin() + nn, T(0));
  // each positive's own share, subtracted once every positive has added to the others
  T* own = b.ra.data();  // free again: the epilogue has consumed it
  for (int64_t p = 0; p < np; ++p)
    own[p] = grad_one<T, STEP>(pr.step, b.spos[p], b, np, nn, b.d_all[p], b.d_pos[p]);
  for (int64_t p = 0; p < np; ++p) b.gpos[p] -= own[p];
  const uint8_t* flag = b.flag.data();
  for (int64_t k = 0, pi = 0, ni = 0; k < pr.N; ++k) {
    const uint8_t fk = flag[k];
    g[k] = fk == 2 ? b.gpos[pi++] : fk == 1 ? b.gneg[ni++] : T(0);
  }
  return true;
}

template <typename T, int STEP, typename Epilogue>
static void loss_rows(const LossProblem<T>* prp, const Epilogue* epp, LossBuffers<T>* bp, T* score, int64_t* n_pos,
                      T* grad, int64_t begin, int64_t end) {
  const LossProblem<T>& pr = *prp;
  const Epilogue& epi = *epp;
  LossBuffers<T>& b = *bp;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const bool vector = std::is_same<T, float>::value && float_loops() != FloatLoops::kPortable;
  uint8_t* flag = b.flag.data();
  for (int64_t i = begin; i < end; ++i) {
    const T* s = pr.scores + i * pr.N;
    flag_row_mv<T>(pr, pr.target, i, flag);
    const int64_t np = collect_positives(s, flag, pr.N, b.spos.data(), b.pcol.data());
    n_pos[i] = np;
    T* g = grad ? grad + i * pr.N : nullptr;
    bool ok;
    if (np == 0) {
      ok = vector ? row_has_nan<T, kVectorLanes<T>>(s, flag, pr.N) == false : !row_has_nan<T, false>(s, flag, pr.N);
      score[i] = T(0);
      if (g) std::fill(g, g + pr.N, T(0));
    } else if (std::any_of(b.spos.data(), b.spos.data() + np, [](T v) { return std::isinf(v); })) {
      ok = compacted_row<T, STEP>(pr, epi, b, i, score + i, g);
    } else {
      ok = vector ? swept_row<T, kVectorLanes<T>, STEP>(pr, epi, b, i, np, score + i, g)
                  : swept_row<T, false, STEP>(pr, epi, b, i, np, score + i, g);
    }
    if (!ok) {
      // NaN in -> NaN out, also for a query without positives; its gradient row is NaN at the
      // valid items when the score depends on them (np > 0), as the two-pass path gives
      score[i] = nan;
      if (g)
        for (int64_t k = 0; k < pr.N; ++k) g[k] = np > 0 && flag[k] != 0 ? nan : T(0);
    }
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

// The loss ops' common glue: checks the target and the step, allocates (score (Q,), number of
// ranked positives (Q,) int64, gradient rows (Q, N) or (0, N) without with_grad) and runs
// loss_rows with the epilogue make_epilogue(scalar_t{}) builds for the dtype.
template <typename MakeEpilogue>
static std::tuple<at::Tensor, at::Tensor, at::Tensor> run_loss_op(
    const char* op, const at::Tensor& scores_in, const std::optional<at::Tensor>& qlab_in,
    const std::optional<at::Tensor>& glab_in, const std::optional<at::Tensor>& relevance_in,
    const std::optional<at::Tensor>& ign_idx_in, const std::optional<at::Tensor>& ign_mask_in, int64_t step,
    double tau, double rho, double delta, double start, double offset, bool with_grad, const MakeEpilogue& make_epilogue) {
  const TargetProblem tp =
      check_target_problem(op, c10::DeviceType::CPU, scores_in, qlab_in, glab_in, relevance_in, ign_idx_in, ign_mask_in);
  check_step(op, step, tau, rho, delta, start, offset, tp.scores.scalar_type());
  const int64_t Q = tp.scores.size(0), N = tp.scores.size(1);
  at::Tensor score = at::empty({Q}, tp.scores.options());
  at::Tensor n_pos = at::empty({Q}, tp.scores.options().dtype(at::kLong));
  at::Tensor grad = empty_grad_rows(with_grad ? Q : 0, N, tp.scores.options());
  AT_DISPATCH_FLOATING_TYPES(tp.scores.scalar_type(), "fastrank_loss_cpu", [&] {
    const LossProblem<scalar_t> pr{problem_view<scalar_t>(tp),
                                   make_step_params<scalar_t>(tau, rho, delta, start, offset), target_view(tp)};
    const auto epi = make_epilogue(scalar_t{});
    scalar_t* sc = score.data_ptr<scalar_t>();
    int64_t* np = n_pos.data_ptr<int64_t>();
    scalar_t* g = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
    // P is unknown before the rows are flagged: the tasks are sized for N positives per row
    // (rows_per_task(N, N) rows, at least one)
    dispatch_step(step, [&](auto kind) {
      parallel_rows<LossBuffers<scalar_t>>(op, Q, rows_per_task(N, N), N, LossBuffers<scalar_t>::kBytesPerColumn,
                                           [&](auto& buf, int64_t b, int64_t e) {
                                             loss_rows<scalar_t, decltype(kind)::value>(&pr, &epi, &buf, sc, np, g, b,
                                                                                        e);
                                           });
    });
  });
  return {score, n_pos, grad};
}

// AP (Smooth-AP with step 0, SupAP with step 1)
static std::tuple<at::Tensor, at::Tensor, at::Tensor> ap_loss_cpu(
    const at::Tensor& scores, const std::optional<at::Tensor>& qlab, const std::optional<at::Tensor>& glab,
    const std::optional<at::Tensor>& relevance, const std::optional<at::Tensor>& ign_idx,
    const std::optional<at::Tensor>& ign_mask, int64_t step, double tau, double rho, double delta, double start,
    double offset, bool with_grad) {
  return run_loss_op("fastrank cpu ap_loss", scores, qlab, glab, relevance, ign_idx, ign_mask, step, tau, rho, delta,
                     start, offset, with_grad, [](auto zero) { return ApEpilogue<decltype(zero)>{}; });
}

// Recall@k surrogates (SupRank's; Patel et al.'s with clamp_hits)
static std::tuple<at::Tensor, at::Tensor, at::Tensor> recall_loss_cpu(
    const at::Tensor& scores, const std::optional<at::Tensor>& qlab, const std::optional<at::Tensor>& glab,
    const std::optional<at::Tensor>& relevance, const std::optional<at::Tensor>& ign_idx,
    const std::optional<at::Tensor>& ign_mask, int64_t step, double tau, double rho, double delta, double start,
    double offset, c10::IntArrayRef ks, double temp, bool clamp_hits, bool with_grad) {
  constexpr const char* op = "fastrank cpu recall_loss";
  const std::vector<int64_t> kv = check_ks(op, ks);
  TORCH_CHECK_VALUE(temp > 0, op, ": temp must be > 0, got ", temp);
  const double big = dtype_max(scores.scalar_type());
  return run_loss_op(op, scores, qlab, glab, relevance, ign_idx, ign_mask, step, tau, rho, delta, start, offset,
                     with_grad, [&](auto zero) {
                       using T = decltype(zero);
                       // times 1/temp, capped at sqrt(max): see fastrank/recall.py
                       return RecallEpilogue<T>{kv.data(), int64_t(kv.size()), T(std::min(1.0 / temp, std::sqrt(big))),
                                                clamp_hits};
                     });
}

TORCH_LIBRARY_IMPL(fastrank, CPU, m) {
  m.impl("rank_sums_fwd", &rank_sums_fwd_cpu);
  m.impl("rank_sums_bwd", &rank_sums_bwd_cpu);
  m.impl("ap_loss", &ap_loss_cpu);
  m.impl("recall_loss", &recall_loss_cpu);
}

}  // namespace cpu
}  // namespace fastrank
