// Whole-row sweeps of the fused AP / Recall@k loss ops (docs/design.md §2.4).
//
// A row is swept in place, in column order, against a block of NB of its ranked positives at a
// time: every loaded score serves NB positives, and the row's flags (flag_row: 2 positive,
// 1 negative, 0 left out) select per lane which sums a term enters. Nothing is compacted: the
// negatives are never copied, and the gradient row is written once, in column order, by the
// gradient sweep (only the positives' own shares are patched afterwards).
//
// The forward sweep of one block gives per positive p (d = s_k - s_p, k over the row):
//   all[p] = sum_{k valid} g_k(d)          (sigmoid: sigma; SupRank: H^- for negatives, H for positives)
//   pos[p] = sum_{k positive} g_k(d)       (sigmoid: sigma; SupRank: H)
// and, with the gradient, the sums of the step derivatives the gradient needs for p's own
// share (dall = sum_{valid} g', dpos = sum_{positive} g'), or instead of dall each term's sigma
// stored to der[p * stride + k] for the gradient sweep, which forms g' from it and sums the g'
// on the way (see "What is stored" below). It also reports a NaN among the row's valid
// scores (the caller makes the row NaN: a NaN does not always survive the steps, e.g. H^- with
// rho = 0).
//
// What is stored: the term's sigma w, not its slope. The slope needs a clamp test and, for
// SupRank, a choice of branch, whose selects crowd the vector units the sigmoid already keeps
// busy; in the gradient sweep, which waits on its loads, they are nearly free. Measured on the
// project's 2-core AMD EPYC (one row of N = 16384 against 4 positives, float32, AVX-512 clone),
// storing the slope made the forward sweep 1.27-1.31x (SupRank) and 1.12-1.22x (sigmoid) the
// forward-only sweep; storing sigma, 1.19-1.21x and 1.03-1.11x (bench/sweep_loop.py). The
// gradient sweep then takes
//   sigmoid:  u = w (1 - w), 0 where w is at the clamp's floor sigma(-kClamp)
//   SupRank:  the same up to delta; beyond delta the forward stored w + 2 (w <= 1, so a stored
//             value above 1 marks the branch) and the slope is rho tau
// (0 where the item carries no gradient: the forward stored 0, and 0 (1 - 0) = 0). The clamp
// test on w instead of on d differs from the references' autograd only where sigma rounds to
// its floor without d / tau being below -kClamp: a term of sigma(-kClamp) ~ 2e-22 left out.
//
// The lanes: LaneOps<T, kVector> abstracts one vector of W scores (vec.h's 8 floats) or one
// scalar (float64, and float32 under FASTRANK_CPU_PORTABLE=1), with the step arithmetic of
// step.h op for op, so the loops below are written once. A row's ranked positives are finite
// here: a row with an infinite positive takes the compacted path of rank_sums.cpp (its ties
// need step_diff).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/parallel.h"
#include "cpu/vec.h"
#include "step.h"

namespace fastrank {
namespace cpu {

#define FR_LANE inline __attribute__((always_inline))

// The widest lane count of any LaneOps: the flags buffer is padded by this many zero bytes and
// the stored derivatives' rows are this many elements apart at least, so a row's last vector
// reads flags 0 (no lane enters a sum) and stores whole vectors.
constexpr int64_t kMaxLanes = vec::W;

// Bytes a row's flag buffer holds past its n flags: kMaxLanes zeros that the last vector reads,
// and as many more that LaneOps::flags loads and drops.
constexpr int64_t kFlagBytesPad = 2 * kMaxLanes;

inline int64_t padded_row(int64_t n) { return (n + kMaxLanes - 1) / kMaxLanes * kMaxLanes; }

template <typename T, bool kVector>
struct LaneOps;

// The lanes a dtype's fast loops take: float32 has the vector lanes, float64 the scalar ones
template <typename T>
constexpr bool kVectorLanes = std::is_same<T, float>::value;

// One scalar per "vector": float64, and the portable float32 loops
template <typename T>
struct LaneOps<T, false> {
  using V = T;
  using Flags = int32_t;
  static constexpr int64_t W = 1;
  static FR_LANE V zero() { return T(0); }
  static FR_LANE V splat(T x) { return x; }
  static FR_LANE V load(const T* p) { return *p; }
  static FR_LANE V load_n(const T* p, int64_t) { return *p; }
  static FR_LANE void store(T* p, V v) { *p = v; }
  static FR_LANE void store_n(T* p, V v, int64_t) { *p = v; }
  static FR_LANE Flags flags(const uint8_t* f) { return *f; }
  static FR_LANE T hsum(V v) { return v; }
  static FR_LANE V keep_first(V v, int64_t) { return v; }
  static FR_LANE bool any(bool m) { return m; }
  static FR_LANE bool any(int m) { return m != 0; }
  static FR_LANE V sigmoid(V d, T inv_tau) { return sigmoid_tau(d, inv_tau); }
  // suprank_neg of step.h given sig = sigma(d)
  static FR_LANE V suprank_from_sigmoid(V d, V sig, const StepParams<T>& p) {
    const T lin = (p.rho == T(0) ? T(0) : p.rho * (d - p.delta)) + p.offset;
    const T mid = p.start + sig;
    return d <= T(0) ? sig : (d <= p.delta ? mid : lin);
  }
  static FR_LANE V heaviside(V d) { return fastrank::heaviside(d); }
};

// Eight float32 lanes (vec.h)
template <>
struct LaneOps<float, true> {
  using V = vec::F;
  using Flags = vec::I;
  static constexpr int64_t W = vec::W;
  static FR_LANE V zero() { return V{}; }
  static FR_LANE V splat(float x) { return vec::splat(x); }
  static FR_LANE V load(const float* p) { return vec::load(p); }
  static FR_LANE V load_n(const float* p, int64_t n) { return vec::load_part(p, n, 0.0f); }
  static FR_LANE void store(float* p, V v) { vec::store(p, v); }
  static FR_LANE void store_n(float* p, V v, int64_t n) { vec::store_part(p, v, n); }
  // W flag bytes widened to int32 lanes. GCC 12 turns __builtin_convertvector of 8 bytes into
  // ~20 scalar extracts and inserts; this is one 16-byte load (the buffer has kFlagBytesPad
  // readable bytes past n), a lane permute, a variable shift and an and.
  static FR_LANE Flags flags(const uint8_t* f) {
    static_assert(W == 8, "flags: written for 8 lanes");
    typedef uint32_t U4 __attribute__((vector_size(16)));
    typedef uint32_t U8 __attribute__((vector_size(32)));
    U4 w;
    std::memcpy(&w, f, sizeof(w));
    const U8 v = __builtin_shufflevector(w, w, 0, 0, 0, 0, 1, 1, 1, 1);
    const U8 shift{0, 8, 16, 24, 0, 8, 16, 24};
    return (Flags)((v >> shift) & 0xffu);
  }
  static FR_LANE float hsum(V v) { return vec::hsum(v); }
  static FR_LANE V keep_first(V v, int64_t m) { return m == W ? v : vec::first_lanes(v, m); }
  static FR_LANE bool any(Flags m) {
    for (int64_t l = 0; l < W; ++l)
      if (m[l]) return true;
    return false;
  }
  static FR_LANE V sigmoid(V d, float inv_tau) { return vec::sigmoid(d, inv_tau); }
  static FR_LANE V suprank_from_sigmoid(V d, V sig, const StepParams<float>& p) {
    return vec::suprank_from_sigmoid(d, sig, p);
  }
  static FR_LANE V heaviside(V d) { return d >= 0.0f ? vec::splat(1.0f) : V{}; }
};

// A lane mask of L (a comparison's result: bool for one scalar, an int32 vector for vec.h)
template <typename L>
using Mask = decltype(typename L::Flags{} != 0);

// H^-'(d) from w = sigma(d): rho beyond delta, else w (1 - w) / tau, 0 below the clamp (the
// references' autograd of their sigmoid; above the clamp w is 1)
template <typename L, typename V, typename T>
inline __attribute__((always_inline)) V suprank_slope(V d, V w, const StepParams<T>& st) {
  const V u = d * st.inv_tau < T(-kClamp) ? L::zero() : (w - w * w) * st.inv_tau;
  return d > st.delta ? L::splat(st.rho) : u;
}

// The sums of one block of positives
template <typename T, int NB>
struct BlockSums {
  T all[NB], dall[NB];
};

// One vector of columns of sweep_forward: the terms of x (flags fl) against the NB positives vj,
// into the accumulators (and, with kStore, to der_k[p * stride]). Inlined into both of the
// sweep's loops, so that the loop over whole vectors carries no partial-load branch.
template <typename L, int STEP, int NB, bool kGrad, bool kStore, typename T, typename V, typename Fl, typename M>
FR_LANE void forward_columns(V x, Fl fl, const V* vj, const StepParams<T>& st, V beyond, V* all, V* dall, M& nan,
                             T* der_k, int64_t stride) {
  const V z = L::zero();
  const T lo = T(-kClamp);
  const auto valid = fl != 0;
  nan = nan | (valid & (x != x));
  for (int p = 0; p < NB; ++p) {
    const V d = x - vj[p];
    if (STEP == kSigmoid) {
      const V w = valid ? L::sigmoid(d, st.inv_tau) : z;
      all[p] += w;
      if (kGrad) {
        if (kStore) {
          L::store(der_k + p * stride, w);
        } else {
          const V wg = d * st.inv_tau < lo ? z : w;
          dall[p] += wg - wg * wg;
        }
      }
    } else {
      const auto is_neg = fl == 1;
      const V w = L::sigmoid(d, st.inv_tau);
      all[p] += is_neg ? L::suprank_from_sigmoid(d, w, st) : z;
      if (kGrad) {
        if (kStore) {
          // (written as an add of a masked constant: a select here cost ~6% of the sweep)
          L::store(der_k + p * stride, is_neg ? w + (d > st.delta ? beyond : z) : z);
        } else {
          dall[p] += is_neg ? suprank_slope<L>(d, w, st) : z;
        }
      }
    }
  }
}

// The forward sweep of row s[0, n) (flags f, padded) against the NB positives sj[0, NB):
//   sigmoid:  all[p] = sum_{k valid} sigma(d),  and with kGrad  dall[p] = sum_{k valid} u(d)
//   SupRank:  all[p] = sum_{k negative} H^-(d), and with kGrad  dall[p] = sum_{k negative} H^-'(d)
// where u = w (1 - w) for w = sigma(d), 0 below the clamp (sigma' = u / tau, as the references'
// autograd of their sigmoid computes it). With kStore, dall is left to sweep_grad_stored: each
// term's w goes to der[p * stride + k] for every column (0 where the term carries no gradient;
// SupRank: w + 2 beyond delta), as the header says. The positives' own terms against each other
// (sigmoid: rank_pos; SupRank: H in both sums) come from positive_sums. Returns true when a
// valid score of the row is NaN.
template <typename T, bool kVector, int STEP, int NB, bool kGrad, bool kStore>
FR_MULTIVERSION __attribute__((noinline)) bool sweep_forward(const T* s, const uint8_t* f, int64_t n, const T* sj,
                                                             StepParams<T> st, BlockSums<T, NB>* out, T* der,
                                                             int64_t stride) {
  using L = LaneOps<T, kVector>;
  using V = typename L::V;
  constexpr int64_t W = L::W;
  const V z = L::zero();
  const V beyond = L::splat(T(2));
  V vj[NB], all[NB], dall[NB];
  for (int p = 0; p < NB; ++p) {
    vj[p] = L::splat(sj[p]);
    all[p] = dall[p] = z;
  }
  Mask<L> nan{};
  int64_t k = 0;
  for (; k + W <= n; k += W)
    forward_columns<L, STEP, NB, kGrad, kStore>(L::load(s + k), L::flags(f + k), vj, st, beyond, all, dall, nan,
                                                der + k, stride);
  if (k < n)
    forward_columns<L, STEP, NB, kGrad, kStore>(L::load_n(s + k, n - k), L::flags(f + k), vj, st, beyond, all, dall,
                                                nan, der + k, stride);
  for (int p = 0; p < NB; ++p) {
    out->all[p] = L::hsum(all[p]);
    out->dall[p] = L::hsum(dall[p]);
  }
  return L::any(nan);
}

// The positives' terms against each other, over the compacted run sp[0, np) (few, usually):
// for the positive sj, *pos = sum_q sigma(d) and *dpos = sum_q u(d) (sigmoid; rank_pos and its
// share of the derivative sums), or *pos = sum_q H(d) (SupRank: the exact step of positives in
// both sums, without gradient).
template <typename T, bool kVector, int STEP>
FR_MULTIVERSION __attribute__((noinline)) void positive_sums(const T* sp, int64_t np, T sj, StepParams<T> st, T* pos,
                                                             T* dpos) {
  using L = LaneOps<T, kVector>;
  using V = typename L::V;
  constexpr int64_t W = L::W;
  const V z = L::zero(), vj = L::splat(sj);
  const T lo = T(-kClamp);
  V acc = z, dacc = z;
  for (int64_t k = 0; k < np; k += W) {
    const int64_t m = std::min<int64_t>(W, np - k);
    const V x = m == W ? L::load(sp + k) : L::load_n(sp + k, m);
    const V d = x - vj;
    // (lanes past the run hold d = -sj: keep_first takes their terms out)
    if (STEP == kSigmoid) {
      const V w = L::sigmoid(d, st.inv_tau);
      const V wg = d * st.inv_tau < lo ? z : w;
      acc += L::keep_first(w, m);
      dacc += L::keep_first(wg - wg * wg, m);
    } else {
      acc += L::keep_first(L::heaviside(d), m);
    }
  }
  *pos = L::hsum(acc);
  *dpos = L::hsum(dacc);
}

// The gradient row's share of the NB positives whose stored terms start at der (rows `stride`
// apart), through rank_all: g[k] += sum_p c_p t_p(k) with c_p = a_p / tau and t the slope formed
// from the stored value (header: u for the sigmoid, tau H^-' for SupRank; a = d score /
// d rank_all), starting from 0 when `first`. Every column is written. Also dall[p] =
// sum_k t_p(k), the sum sweep_forward left to it (lane by lane in column order, as there). (The
// sigmoid's rank_pos share, at the positives' columns only, is added by the caller:
// positive_grad.)
template <typename T, bool kVector, int STEP, int NB>
FR_MULTIVERSION __attribute__((noinline)) void sweep_grad_stored(int64_t n, const T* der, int64_t stride,
                                                                 const T* c, bool first, T* g, T* dall,
                                                                 StepParams<T> st) {
  using L = LaneOps<T, kVector>;
  using V = typename L::V;
  constexpr int64_t W = L::W;
  const V z = L::zero(), one = L::splat(T(1)), rho_tau = L::splat(st.rho / st.inv_tau);
  // sigma at the clamp's floor, computed as the forward's lanes compute a clamped one
  const V w_lo = L::sigmoid(L::splat(T(-kClamp)), T(1));
  V cv[NB], sum[NB];
  for (int p = 0; p < NB; ++p) {
    cv[p] = L::splat(c[p]);
    sum[p] = L::zero();
  }
  for (int64_t k = 0; k < n; k += W) {
    V acc = L::zero();
    for (int p = 0; p < NB; ++p) {
      const V v = L::load(der + p * stride + k);
      V dv = v <= w_lo ? z : v - v * v;
      if (STEP != kSigmoid) dv = v > one ? rho_tau : dv;
      sum[p] += dv;
      acc += cv[p] * dv;
    }
    const int64_t m = std::min<int64_t>(W, n - k);
    if (!first) acc += m == W ? L::load(g + k) : L::load_n(g + k, m);
    if (m == W)
      L::store(g + k, acc);
    else
      L::store_n(g + k, acc, m);
  }
  for (int p = 0; p < NB; ++p) dall[p] = L::hsum(sum[p]);
}

// The sigmoid's rank_pos share of the gradient at the positive sq: sum_p b_p u(sq - sp[p]) / tau
// over the run of positives (b = d score / d rank_pos)
template <typename T>
inline T positive_grad(const T* sp, int64_t np, T sq, const T* b, T inv_tau) {
  T acc = T(0);
  for (int64_t p = 0; p < np; ++p) {
    const T d = sq - sp[p];
    const T w = d * inv_tau < T(-kClamp) ? T(0) : sigmoid_tau(d, inv_tau);
    acc += b[p] * (w - w * w);
  }
  return acc * inv_tau;
}

// The gradient row's share of the NB positives sj[0, NB), the terms recomputed (rows whose
// derivatives exceed the budget): g[k] = (first ? 0 : g[k]) + that share, as sweep_grad_stored
// (a = d score / d rank_all).
template <typename T, bool kVector, int STEP, int NB>
FR_MULTIVERSION __attribute__((noinline)) void sweep_grad_recompute(const T* s, const uint8_t* f, int64_t n,
                                                                    const T* sj, StepParams<T> st, const T* a,
                                                                    bool first, T* g) {
  using L = LaneOps<T, kVector>;
  using V = typename L::V;
  constexpr int64_t W = L::W;
  const V z = L::zero();
  const T lo = T(-kClamp);
  V vj[NB];
  for (int p = 0; p < NB; ++p) vj[p] = L::splat(sj[p]);
  for (int64_t k = 0; k < n; k += W) {
    const int64_t m = std::min<int64_t>(W, n - k);
    const V x = m == W ? L::load(s + k) : L::load_n(s + k, m);
    const auto fl = L::flags(f + k);
    V acc = z;
    for (int p = 0; p < NB; ++p) {
      const V d = x - vj[p];
      if (STEP == kSigmoid) {
        const V w = (fl != 0) & (d * st.inv_tau >= lo) ? L::sigmoid(d, st.inv_tau) : z;
        acc += L::splat(a[p]) * (w - w * w);
      } else {
        acc += L::splat(a[p]) * (fl == 1 ? suprank_slope<L>(d, L::sigmoid(d, st.inv_tau), st) : z);
      }
    }
    if (STEP == kSigmoid) acc *= st.inv_tau;
    if (!first) acc += m == W ? L::load(g + k) : L::load_n(g + k, m);
    if (m == W)
      L::store(g + k, acc);
    else
      L::store_n(g + k, acc, m);
  }
}

// A NaN among the valid scores of row s[0, n) (a row without positives: no sweep saw it)
template <typename T, bool kVector>
FR_MULTIVERSION __attribute__((noinline)) bool row_has_nan(const T* s, const uint8_t* f, int64_t n) {
  using L = LaneOps<T, kVector>;
  using V = typename L::V;
  constexpr int64_t W = L::W;
  Mask<L> nan{};
  for (int64_t k = 0; k < n; k += W) {
    const int64_t m = std::min<int64_t>(W, n - k);
    const V x = m == W ? L::load(s + k) : L::load_n(s + k, m);
    nan = nan | ((L::flags(f + k) != 0) & (x != x));
  }
  return L::any(nan);
}

#undef FR_LANE

}  // namespace cpu
}  // namespace fastrank
