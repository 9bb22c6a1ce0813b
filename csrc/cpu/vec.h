// The float32 step loops written on 8-lane vectors (GCC vector extensions): the fused loss
// sweeps (loss_sweeps.h) on every x86 clone, and the two-pass loops on every CPU without the
// hand-written AVX-512 loops of loops.h: AVX2 (x86-64-v3 clone, one ymm per vector), baseline
// x86-64 (two xmm) and other architectures.
//
// Why: GCC does not vectorise the scalar loops of rank_sums_row.h for AVX2. The clamp of
// sigma's argument lets it thread the clamped lanes to a constant result, and the branches it
// makes stop the vectoriser ("control flow in loop"); only AVX-512's masked code escapes that.
// On a 2-core AMD EPYC (AVX2, no AVX-512) the scalar loops ran 0.1-0.2 G pairs/s per thread.
// Written on explicit vectors, the select is a blend and nothing branches.
//
// The arithmetic is that of csrc/step.h, op for op (same clamp, range reduction, polynomial,
// exponent trick, division), so a lane gives what the scalar function gives up to the FMA
// contraction GCC applies to both; NaN differences give NaN terms, as there. Lane order and the
// final reduction are fixed: results are deterministic on a given machine.
#pragma once

#include <cstdint>
#include <cstring>

#include "step.h"

namespace fastrank {
namespace cpu {
namespace vec {

constexpr int64_t W = 8;
typedef float F __attribute__((vector_size(W * sizeof(float))));
typedef int32_t I __attribute__((vector_size(W * sizeof(int32_t))));

#define FR_VEC inline __attribute__((always_inline))

FR_VEC F splat(float x) { return F{} + x; }
FR_VEC F load(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FR_VEC void store(float* p, F v) { std::memcpy(p, &v, sizeof(v)); }
// the first n < W lanes from p; the others hold `fill` (a value every step maps to a finite number)
FR_VEC F load_part(const float* p, int64_t n, float fill) {
  F v = splat(fill);
  for (int64_t l = 0; l < n; ++l) v[l] = p[l];
  return v;
}
FR_VEC void store_part(float* p, F v, int64_t n) {
  for (int64_t l = 0; l < n; ++l) p[l] = v[l];
}
// lanes [0, n) kept, the others 0
FR_VEC F first_lanes(F v, int64_t n) {
  I lane;
  for (int l = 0; l < W; ++l) lane[l] = l;
  return lane < I{} + int32_t(n) ? v : F{};
}
FR_VEC float hsum(F v) {
  // pairwise, in a fixed order
  float h[W];
  std::memcpy(h, &v, sizeof(h));
  for (int64_t w = W / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) h[l] += h[l + w];
  return h[0];
}

// exp_clamped of step.h
FR_VEC F exp_clamped(F x) {
  const F t = x * 1.44269504088896341f;
  const F n = (t + 12582912.0f) - 12582912.0f;
  const F r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  F p = splat(1.98412698412698413e-04f);
  p = p * r + 1.38888888888888889e-03f;
  p = p * r + 8.33333333333333333e-03f;
  p = p * r + 4.16666666666666667e-02f;
  p = p * r + 1.66666666666666667e-01f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  return p * (F)bits;  // GCC vector casts reinterpret the bits
}

// clamp_x of step.h: a NaN lane compares false and passes
FR_VEC F clamp_x(F x) {
  const float c = float(kClamp);
  x = x < -c ? splat(-c) : x;
  return x > c ? splat(c) : x;
}

FR_VEC F sigmoid(F d, float inv_tau) { return 1.0f / (1.0f + exp_clamped(-clamp_x(d * inv_tau))); }

// sigma and its derivative from one exp: *grad = e sigma^2 / tau, 0 outside the clamp
FR_VEC F sigmoid_and_grad(F d, float inv_tau, F* grad) {
  const F xr = d * inv_tau;
  const F e = exp_clamped(-clamp_x(xr));
  const F s = 1.0f / (1.0f + e);
  const float c = float(kClamp);
  *grad = (xr > c) | (xr < -c) ? F{} : e * s * s * inv_tau;
  return s;
}

FR_VEC F sigmoid_grad(F d, float inv_tau) {
  F g;
  sigmoid_and_grad(d, inv_tau, &g);
  return g;
}

// suprank_neg of step.h, from sigma
FR_VEC F suprank_from_sigmoid(F d, F sig, const StepParams<float>& p) {
  // rho = 0 takes the offset whatever d is (inf * 0 would be NaN), as a blend on a mask the loop
  // hoists: a scalar test here branched in every iteration and split the loop's registers
  const F rho = splat(p.rho);
  const F lin = rho == 0.0f ? splat(p.offset) : rho * (d - p.delta) + p.offset;
  const F mid = p.start + sig;
  return d <= 0.0f ? sig : (d <= p.delta ? mid : lin);
}

FR_VEC F suprank_neg(F d, const StepParams<float>& p) { return suprank_from_sigmoid(d, sigmoid(d, p.inv_tau), p); }

// H^- and its derivative (rho beyond delta) from one exp
FR_VEC F suprank_neg_and_grad(F d, const StepParams<float>& p, F* grad) {
  F g;
  const F sig = sigmoid_and_grad(d, p.inv_tau, &g);
  *grad = d > p.delta ? splat(p.rho) : g;
  return suprank_from_sigmoid(d, sig, p);
}

FR_VEC F suprank_neg_grad(F d, const StepParams<float>& p) {
  F g;
  suprank_neg_and_grad(d, p, &g);
  return g;
}

// ---- loops over a run s[0, n) against the ranked score sj (d = s[k] - sj)

// sum_k step(d)
template <typename Step>
FR_VEC float run_sum(float sj, const float* s, int64_t n, const Step& step) {
  F acc{};
  int64_t k = 0;
  for (; k + W <= n; k += W) acc += step(load(s + k) - sj);
  if (k < n) acc += first_lanes(step(load_part(s + k, n - k, sj) - sj), n - k);
  return hsum(acc);
}

// c_k = coef * grad(d); g[k] += c_k; returns sum_k c_k
template <typename Grad>
FR_VEC float run_grad(float sj, const float* s, float* g, int64_t n, float coef, const Grad& grad) {
  F tot{};
  int64_t k = 0;
  for (; k + W <= n; k += W) {
    const F c = coef * grad(load(s + k) - sj);
    store(g + k, load(g + k) + c);
    tot += c;
  }
  if (k < n) {
    const int64_t m = n - k;
    const F c = first_lanes(coef * grad(load_part(s + k, m, sj) - sj), m);
    store_part(g + k, load_part(g + k, m, 0.0f) + c, m);
    tot += c;
  }
  return hsum(tot);
}

// sum_k step(d), with step'(d) stored to der[k]: both from one exp (the fused loss ops'
// forward, whose gradient sweep then only multiplies and adds, docs/design.md §2.4)
template <typename StepAndGrad>
FR_VEC float run_sum_store(float sj, const float* s, float* der, int64_t n, const StepAndGrad& step) {
  F acc{};
  int64_t k = 0;
  for (; k + W <= n; k += W) {
    F g;
    acc += step(load(s + k) - sj, &g);
    store(der + k, g);
  }
  if (k < n) {
    const int64_t m = n - k;
    F g;
    acc += first_lanes(step(load_part(s + k, m, sj) - sj, &g), m);
    store_part(der + k, g, m);
  }
  return hsum(acc);
}

// The steps as function objects: a lambda's call operator is a function of its own, compiled
// for the baseline target, and might not be inlined into the kernel's instruction-set clone
struct SigmoidOp {
  float inv_tau;
  FR_VEC F operator()(F d) const { return sigmoid(d, inv_tau); }
};
struct SigmoidGradOp {
  float inv_tau;
  FR_VEC F operator()(F d) const { return sigmoid_grad(d, inv_tau); }
};
struct SigmoidStoreOp {
  float inv_tau;
  FR_VEC F operator()(F d, F* grad) const { return sigmoid_and_grad(d, inv_tau, grad); }
};
struct SupRankNegOp {
  StepParams<float> p;
  FR_VEC F operator()(F d) const { return suprank_neg(d, p); }
};
struct SupRankNegGradOp {
  StepParams<float> p;
  FR_VEC F operator()(F d) const { return suprank_neg_grad(d, p); }
};
struct SupRankStoreOp {
  StepParams<float> p;
  FR_VEC F operator()(F d, F* grad) const { return suprank_neg_and_grad(d, p, grad); }
};

#undef FR_VEC

}  // namespace vec
}  // namespace cpu
}  // namespace fastrank
