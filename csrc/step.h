// Step functions of the rank-sums primitive (docs/design.md §1.1) and their derivatives.
//
// One header for the CPU kernel and the CUDA kernels: everything here is plain
// arithmetic on scalars, marked host+device, and free of torch headers so that
// `nvcc -c` can compile it on a machine whose torch has no CUDA.
//
// Conventions: d = s_ik - s_ij (competitor minus ranked item); x = d / tau.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define FR_HD __host__ __device__ __forceinline__
#else
#define FR_HD inline __attribute__((always_inline))
#endif

namespace fastrank {

// Step kinds, as passed through the op schema (an int, not a string, so the
// kernel picks its specialisation once per call).
enum StepKind : int64_t { kSigmoid = 0, kSupRank = 1 };

// The one place that turns the step argument of an op into a kernel specialisation: calls
// f(std::integral_constant<int, kSigmoid or kSupRank>), so f reads the kind at compile time
// (decltype(tag)::value). Every value but kSigmoid takes the SupRank branch: check_step has
// rejected the others before any kernel runs. Host code only (the CUDA launchers call it).
template <typename F>
inline void dispatch_step(int64_t step, F&& f) {
  if (step == kSigmoid)
    f(std::integral_constant<int, kSigmoid>{});
  else
    f(std::integral_constant<int, kSupRank>{});
}

// The references clamp -d/tau to [-50, 50] before exp; we do the same so that
// values agree with them to rounding, and so exp never overflows.
constexpr double kClamp = 50.0;

template <typename T>
struct StepParams {
  T inv_tau;  // 1 / tau
  T rho;      // slope of the linear branch of H^- (suprank)
  T delta;    // where the linear branch starts
  T start;    // added to sigma on (0, delta]
  T offset;   // value of the linear branch at delta (continuity: sigma(delta) + start)
};

// The op schemas carry the step parameters as doubles; the kernels take 1/tau in T.
template <typename T>
inline StepParams<T> make_step_params(double tau, double rho, double delta, double start, double offset) {
  return StepParams<T>{T(1.0 / tau), T(rho), T(delta), T(start), T(offset)};
}

// exp for x in [-50, 50] (callers clamp). float: range reduction to
// r in [-ln2/2, ln2/2] plus a degree-7 Taylor polynomial (rel. error < 2e-7,
// about one ulp), written with plain arithmetic so GCC vectorises the loops that
// call it; the C library's expf does not vectorise. double: the C library.
FR_HD float exp_clamped(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  const float t = x * 1.44269504088896341f;
  // round to nearest with the 1.5*2^23 trick: exact for |t| < 2^22, no libm call
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.98412698412698413e-04f;  // 1/7!
  p = p * r + 1.38888888888888889e-03f;
  p = p * r + 8.33333333333333333e-03f;
  p = p * r + 4.16666666666666667e-02f;
  p = p * r + 1.66666666666666667e-01f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n through the exponent field; n in [-73, 73] never leaves the normal range
  // after the multiply because p in [0.7, 1.42] and |x| <= 50 keeps 2^n*p normal.
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

FR_HD double exp_clamped(double x) { return ::exp(x); }

// The difference d = s_k - s_j the steps see. Scores that compare equal tie (d = 0: H(0) = 1,
// sigma(0) = 1/2), infinities included, where IEEE gives inf - inf = NaN; the ranked item's own
// term (k = j) is such a tie, so this also keeps the self term exact for s_j = +-inf. Every
// other NaN difference comes from a NaN score, whose row the kernels make NaN explicitly.
// Same definition as fastrank._step.score_diff.
template <typename T>
FR_HD T step_diff(T sk, T sj) {
  const T d = sk - sj;
  return d == d ? d : T(0);
}

// A step's derivative at the raw difference d = s_k - s_j: a tie of two infinities (d NaN)
// is a constant and carries no gradient.
template <typename T>
FR_HD T tied_grad(T d, T g) {
  return d == d ? g : T(0);
}

template <typename T>
FR_HD T clamp_x(T x) {
  // written so that NaN passes through (comparisons with NaN are false)
  x = x < T(-kClamp) ? T(-kClamp) : x;
  x = x > T(kClamp) ? T(kClamp) : x;
  return x;
}

// sigma_tau(d) and its derivative w.r.t. d. The derivative is e*sigma^2/tau with
// e = exp(-x), which stays accurate where sigma*(1-sigma) would cancel to zero;
// it is zero outside the clamp, as in the references.
template <typename T>
FR_HD T sigmoid_tau(T d, T inv_tau) {
  const T x = clamp_x(d * inv_tau);
  return T(1) / (T(1) + exp_clamped(-x));
}

template <typename T>
FR_HD T sigmoid_tau_grad(T d, T inv_tau) {
  const T xr = d * inv_tau;
  const T x = clamp_x(xr);
  const T e = exp_clamped(-x);
  const T s = T(1) / (T(1) + e);
  const T g = e * s * s * inv_tau;
  return (xr > T(kClamp) || xr < T(-kClamp)) ? T(0) : g;
}

// H^-(d), the SupRank upper bound used for competitors less relevant than the
// ranked item (negatives, for binary relevance).
// rho = 0 makes the linear branch the constant offset, also at d = +inf (0 * inf is NaN).
template <typename T>
FR_HD T suprank_neg(T d, const StepParams<T>& p) {
  const T sig = sigmoid_tau(d, p.inv_tau);
  const T lin = (p.rho == T(0) ? T(0) : p.rho * (d - p.delta)) + p.offset;
  const T mid = p.start + sig;
  return d <= T(0) ? sig : (d <= p.delta ? mid : lin);
}

template <typename T>
FR_HD T suprank_neg_grad(T d, const StepParams<T>& p) {
  const T g = sigmoid_tau_grad(d, p.inv_tau);
  return d > p.delta ? p.rho : g;
}

// H(d) with H(0) = 1: the exact step for competitors at least as relevant as
// the ranked item. It has no gradient.
template <typename T>
FR_HD T heaviside(T d) {
  return d >= T(0) ? T(1) : T(0);
}

// HAPPIER's smoothed H-rank (graded family, docs/design.md §1.2): in rank_pos, a competitor
// whose ordering key is above the ranked item's counts h+(d) instead of H(d):
//   h+(d) = leak * d for d <= 0;  for d > 0: 1 when gamma > 1, else min(beta * d + gamma, 1).
// A zero leak or beta drops its product (0 * inf is NaN). Same as fastrank.core.step.hrank_plus.
template <typename T>
struct HRankParams {
  bool on;
  T beta, gamma, leak;
};

template <typename T>
inline HRankParams<T> make_hrank_params(bool on, double beta, double gamma, double leak) {
  return HRankParams<T>{on, T(beta), T(gamma), T(leak)};
}

template <typename T>
FR_HD T hrank_plus(T d, const HRankParams<T>& h) {
  const T below = h.leak == T(0) ? T(0) : h.leak * d;
  const T lin = (h.beta == T(0) ? T(0) : h.beta * d) + h.gamma;
  const T above = h.gamma > T(1) ? T(1) : (lin < T(1) ? lin : T(1));
  return d <= T(0) ? below : above;
}

// d h+ / d d: leak on d <= 0; on d > 0, 0 when gamma > 1, else beta up to where the min holds
// it at 1 (the slope passes at equality, as torch.clamp's backward)
template <typename T>
FR_HD T hrank_plus_grad(T d, const HRankParams<T>& h) {
  const T lin = (h.beta == T(0) ? T(0) : h.beta * d) + h.gamma;
  const T above = h.gamma > T(1) ? T(0) : (lin <= T(1) ? h.beta : T(0));
  return d <= T(0) ? h.leak : above;
}

}  // namespace fastrank
