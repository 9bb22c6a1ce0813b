// The hot loops of the CPU rank-sums kernels (binary and graded), with a hand-written
// AVX-512 path for float32.
//
// Why: in the auto-vectorised loops of rank_sums_row.h each sigma costs a vdivps, a
// slow, single-port instruction; on the CI-class Xeon a standalone sigmoid sweep went
// from 2.5 to 3.6 G pairs/s per thread with rcp14 + Newton instead (end to end, in the
// kernels: 1.24-1.28x in the forward, see README). GCC emits vrcp14ps only under
// -ffast-math, which would also break the exp polynomial's rounding trick and the NaN
// rules. Here the
// reciprocal is rcp14 + one Newton step (relative error ~2^-23, about the rounding of
// the division it replaces) and everything else is the arithmetic of csrc/step.h, op
// for op, including its NaN behaviour (a NaN difference gives a NaN term).
//
// The AVX-512 functions are compiled with a target attribute and chosen at run time
// (cpuid), so the extension still runs on any x86-64; float32 on other machines takes the
// vector loops of vec.h, float64 the portable loops of rank_sums_row.h (float_loops below).
// Results are deterministic on a given machine (fixed lane and reduction order).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include "cpu/vec.h"
#include "rank_sums_row.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FR_AVX512_LOOPS 1
#define FR_AVX512 __attribute__((target("avx512f,fma"), always_inline)) inline
#define FR_AVX512_ENTRY __attribute__((target("avx512f,fma"), noinline))
#else
#define FR_AVX512_LOOPS 0
#endif

namespace fastrank {
namespace cpu {

#if FR_AVX512_LOOPS
namespace avx512 {

// The CPU has AVX-512F + FMA (float_loops below also reads FASTRANK_CPU_PORTABLE)
inline bool available() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"); }

// exp_clamped of step.h for 16 lanes: same range reduction, polynomial and exponent trick
FR_AVX512 __m512 exp_clamped(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 shifter = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(t, shifter), shifter);
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693145751953125f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(1.428606765330187045e-06f)));
  __m512 p = _mm512_set1_ps(1.98412698412698413e-04f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.38888888888888889e-03f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.33333333333333333e-03f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.16666666666666667e-02f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.66666666666666667e-01f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// 1 / x: rcp14 (relative error < 2^-14) and one Newton step
FR_AVX512 __m512 recip(__m512 x) {
  const __m512 y = _mm512_rcp14_ps(x);
  return _mm512_mul_ps(y, _mm512_fnmadd_ps(x, y, _mm512_set1_ps(2.0f)));
}

// clamp to [-50, 50]; max/min return their second operand when one is NaN, so NaN passes
FR_AVX512 __m512 clamp_x(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-50.0f), x);
  return _mm512_min_ps(_mm512_set1_ps(50.0f), x);
}

FR_AVX512 __m512 sigmoid(__m512 d, __m512 inv_tau) {
  const __m512 x = clamp_x(_mm512_mul_ps(d, inv_tau));
  const __m512 e = exp_clamped(_mm512_sub_ps(_mm512_setzero_ps(), x));
  return recip(_mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// e * sigma^2 / tau, 0 outside the clamp (a NaN x compares false and stays NaN)
FR_AVX512 __m512 sigmoid_grad(__m512 d, __m512 inv_tau) {
  const __m512 xr = _mm512_mul_ps(d, inv_tau);
  const __m512 e = exp_clamped(_mm512_sub_ps(_mm512_setzero_ps(), clamp_x(xr)));
  const __m512 s = recip(_mm512_add_ps(_mm512_set1_ps(1.0f), e));
  const __m512 g = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(e, s), s), inv_tau);
  const __mmask16 out = _mm512_cmp_ps_mask(xr, _mm512_set1_ps(50.0f), _CMP_GT_OQ) |
                        _mm512_cmp_ps_mask(xr, _mm512_set1_ps(-50.0f), _CMP_LT_OQ);
  return _mm512_mask_mov_ps(g, out, _mm512_setzero_ps());
}

struct SupRank16 {
  __m512 inv_tau, rho, delta, start, offset;
  __mmask16 flat;  // all lanes when rho = 0: the line is the constant offset (0 * inf would be NaN)
  FR_AVX512 explicit SupRank16(const StepParams<float>& p)
      : inv_tau(_mm512_set1_ps(p.inv_tau)), rho(_mm512_set1_ps(p.rho)), delta(_mm512_set1_ps(p.delta)),
        start(_mm512_set1_ps(p.start)), offset(_mm512_set1_ps(p.offset)),
        flat(p.rho == 0.0f ? __mmask16(0xFFFF) : __mmask16(0)) {}
};

// H^-: sigma for d <= 0, start + sigma on (0, delta], the line beyond (NaN: the line, NaN)
FR_AVX512 __m512 suprank_neg(__m512 d, const SupRank16& p) {
  const __m512 sig = sigmoid(d, p.inv_tau);
  const __m512 lin =
      _mm512_mask_mov_ps(_mm512_fmadd_ps(p.rho, _mm512_sub_ps(d, p.delta), p.offset), p.flat, p.offset);
  const __m512 mid = _mm512_add_ps(p.start, sig);
  const __mmask16 le0 = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_LE_OQ);
  const __mmask16 le_delta = _mm512_cmp_ps_mask(d, p.delta, _CMP_LE_OQ);
  return _mm512_mask_mov_ps(_mm512_mask_mov_ps(lin, le_delta, mid), le0, sig);
}

FR_AVX512 __m512 suprank_neg_grad(__m512 d, const SupRank16& p) {
  const __m512 g = sigmoid_grad(d, p.inv_tau);
  return _mm512_mask_mov_ps(g, _mm512_cmp_ps_mask(d, p.delta, _CMP_GT_OQ), p.rho);
}

FR_AVX512 __mmask16 tail_mask(int64_t left) { return static_cast<__mmask16>((1u << left) - 1u); }

// sum_k step(s[k] - sj); the tail's missing lanes add nothing
template <typename Step>
FR_AVX512 float run_sum(float sj, const float* s, int64_t n, const Step& step) {
  const __m512 vj = _mm512_set1_ps(sj);
  __m512 acc = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) acc = _mm512_add_ps(acc, step(_mm512_sub_ps(_mm512_loadu_ps(s + k), vj)));
  if (k < n) {
    const __mmask16 m = tail_mask(n - k);
    const __m512 v = step(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + k), vj));
    acc = _mm512_mask_add_ps(acc, m, acc, v);
  }
  return _mm512_reduce_add_ps(acc);
}

// c_k = coef * step'(s[k] - sj); g[k] += c_k; returns sum_k c_k
template <typename Grad>
FR_AVX512 float run_grad(float sj, const float* s, float* g, int64_t n, float coef, const Grad& grad) {
  const __m512 vj = _mm512_set1_ps(sj), vc = _mm512_set1_ps(coef);
  __m512 tot = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 c = _mm512_mul_ps(vc, grad(_mm512_sub_ps(_mm512_loadu_ps(s + k), vj)));
    _mm512_storeu_ps(g + k, _mm512_add_ps(_mm512_loadu_ps(g + k), c));
    tot = _mm512_add_ps(tot, c);
  }
  if (k < n) {
    const __mmask16 m = tail_mask(n - k);
    const __m512 c = _mm512_mul_ps(vc, grad(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + k), vj)));
    _mm512_mask_storeu_ps(g + k, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, g + k), c));
    tot = _mm512_mask_add_ps(tot, m, tot, c);
  }
  return _mm512_reduce_add_ps(tot);
}

// The steps as function objects (a lambda's call operator would not carry the target attribute)
struct SigmoidOp {
  __m512 inv_tau;
  FR_AVX512 __m512 operator()(__m512 d) const { return sigmoid(d, inv_tau); }
};
struct SigmoidGradOp {
  __m512 inv_tau;
  FR_AVX512 __m512 operator()(__m512 d) const { return sigmoid_grad(d, inv_tau); }
};
struct SupRankNegOp {
  SupRank16 p;
  FR_AVX512 __m512 operator()(__m512 d) const { return suprank_neg(d, p); }
};
struct SupRankNegGradOp {
  SupRank16 p;
  FR_AVX512 __m512 operator()(__m512 d) const { return suprank_neg_grad(d, p); }
};

FR_AVX512_ENTRY inline float sum_sigmoid(float sj, const float* s, int64_t n, float inv_tau) {
  return run_sum(sj, s, n, SigmoidOp{_mm512_set1_ps(inv_tau)});
}

FR_AVX512_ENTRY inline float sum_suprank_neg(float sj, const float* s, int64_t n, StepParams<float> p) {
  return run_sum(sj, s, n, SupRankNegOp{SupRank16(p)});
}

FR_AVX512_ENTRY inline float grad_sigmoid(float sj, const float* s, float* g, int64_t n, float coef, float inv_tau) {
  return run_grad(sj, s, g, n, coef, SigmoidGradOp{_mm512_set1_ps(inv_tau)});
}

FR_AVX512_ENTRY inline float grad_suprank_neg(float sj, const float* s, float* g, int64_t n, float coef,
                                              StepParams<float> p) {
  return run_grad(sj, s, g, n, coef, SupRankNegGradOp{SupRank16(p)});
}

}  // namespace avx512
#endif  // FR_AVX512_LOOPS

// ---- which float32 loops run, chosen once per process

enum class FloatLoops { kAvx512, kVector, kPortable };

// AVX-512 where the CPU has it (hand-written above), else the vector loops of vec.h;
// FASTRANK_CPU_PORTABLE=1 runs the scalar loops of rank_sums_row.h as the compiler makes them
// on any machine (for comparisons, and to rule the other paths out when debugging).
__attribute__((noinline)) inline FloatLoops float_loops() {
  static const FloatLoops loops = [] {
    const char* env = std::getenv("FASTRANK_CPU_PORTABLE");
    if (env != nullptr && std::string(env) == "1") return FloatLoops::kPortable;
#if FR_AVX512_LOOPS
    if (avx512::available()) return FloatLoops::kAvx512;
#endif
    return FloatLoops::kVector;
  }();
  return loops;
}

// Entry points used by the kernels: float32 takes float_loops(), float64 the portable loops of
// rank_sums_row.h. Always inlined, so that the portable and vector loops are compiled for each
// instruction-set clone of the calling kernel (FR_MULTIVERSION).
#define FR_ENTRY inline __attribute__((always_inline))
template <typename T>
FR_ENTRY T sum_sigmoid(T sj, const T* s, int64_t n, T inv_tau) {
  return run_sum_sigmoid(sj, s, n, inv_tau);
}
template <typename T>
FR_ENTRY T sum_suprank_neg(T sj, const T* s, int64_t n, StepParams<T> p) {
  return run_sum_suprank_neg(sj, s, n, p);
}
template <typename T>
FR_ENTRY T grad_sigmoid(T sj, const T* s, T* g, int64_t n, T coef, T inv_tau) {
  return run_grad_sigmoid(sj, s, g, n, coef, inv_tau);
}
template <typename T>
FR_ENTRY T grad_suprank_neg(T sj, const T* s, T* g, int64_t n, T coef, StepParams<T> p) {
  return run_grad_suprank_neg(sj, s, g, n, coef, p);
}
// the fused loss ops' forward: the sum, each term's derivative stored to der[k]
template <typename T>
FR_ENTRY T sum_store_sigmoid(T sj, const T* s, T* der, int64_t n, T inv_tau) {
  return run_sum_store_sigmoid(sj, s, der, n, inv_tau);
}
template <typename T>
FR_ENTRY T sum_store_suprank_neg(T sj, const T* s, T* der, int64_t n, StepParams<T> p) {
  return run_sum_store_suprank_neg(sj, s, der, n, p);
}

#if FR_AVX512_LOOPS
#define FR_IF_AVX512(call) \
  if (float_loops() == FloatLoops::kAvx512) return call;
#else
#define FR_IF_AVX512(call)
#endif

template <>
FR_ENTRY float sum_sigmoid<float>(float sj, const float* s, int64_t n, float inv_tau) {
  FR_IF_AVX512(avx512::sum_sigmoid(sj, s, n, inv_tau))
  if (float_loops() == FloatLoops::kVector) return vec::run_sum(sj, s, n, vec::SigmoidOp{inv_tau});
  return run_sum_sigmoid(sj, s, n, inv_tau);
}
template <>
FR_ENTRY float sum_suprank_neg<float>(float sj, const float* s, int64_t n, StepParams<float> p) {
  FR_IF_AVX512(avx512::sum_suprank_neg(sj, s, n, p))
  if (float_loops() == FloatLoops::kVector) return vec::run_sum(sj, s, n, vec::SupRankNegOp{p});
  return run_sum_suprank_neg(sj, s, n, p);
}
template <>
FR_ENTRY float grad_sigmoid<float>(float sj, const float* s, float* g, int64_t n, float coef, float inv_tau) {
  FR_IF_AVX512(avx512::grad_sigmoid(sj, s, g, n, coef, inv_tau))
  if (float_loops() == FloatLoops::kVector) return vec::run_grad(sj, s, g, n, coef, vec::SigmoidGradOp{inv_tau});
  return run_grad_sigmoid(sj, s, g, n, coef, inv_tau);
}
template <>
FR_ENTRY float grad_suprank_neg<float>(float sj, const float* s, float* g, int64_t n, float coef, StepParams<float> p) {
  FR_IF_AVX512(avx512::grad_suprank_neg(sj, s, g, n, coef, p))
  if (float_loops() == FloatLoops::kVector) return vec::run_grad(sj, s, g, n, coef, vec::SupRankNegGradOp{p});
  return run_grad_suprank_neg(sj, s, g, n, coef, p);
}
// (no AVX-512 version: the vector loops run at that width in the x86-64-v4 clone)
template <>
FR_ENTRY float sum_store_sigmoid<float>(float sj, const float* s, float* der, int64_t n, float inv_tau) {
  if (float_loops() != FloatLoops::kPortable) return vec::run_sum_store(sj, s, der, n, vec::SigmoidStoreOp{inv_tau});
  return run_sum_store_sigmoid(sj, s, der, n, inv_tau);
}
template <>
FR_ENTRY float sum_store_suprank_neg<float>(float sj, const float* s, float* der, int64_t n, StepParams<float> p) {
  if (float_loops() != FloatLoops::kPortable) return vec::run_sum_store(sj, s, der, n, vec::SupRankStoreOp{p});
  return run_sum_store_suprank_neg(sj, s, der, n, p);
}
#undef FR_IF_AVX512

// ---- a ranked item at +-inf. Its difference to an equal score (itself included) is NaN in IEEE
// arithmetic; step_diff makes it the tie it is, tied_grad takes its gradient away. Scalar loops
// over the same runs as above, used only for such items, so the hot loops carry no extra select.

// sum_k step(step_diff(s[k], sj))
template <typename T, typename Step>
FR_ENTRY T tied_sum(T sj, const T* s, int64_t n, const Step& step) {
  T acc = T(0);
  for (int64_t k = 0; k < n; ++k) acc += step(step_diff(s[k], sj));
  return acc;
}

// c_k = coef * step'(s[k] - sj), 0 for a tie of infinities; g[k] += c_k; returns sum_k c_k
template <typename T, typename Grad>
FR_ENTRY T tied_grad_run(T sj, const T* s, T* g, int64_t n, T coef, const Grad& grad) {
  T tot = T(0);
  for (int64_t k = 0; k < n; ++k) {
    const T d = s[k] - sj;
    const T c = coef * tied_grad(d, grad(step_diff(s[k], sj)));
    g[k] += c;
    tot += c;
  }
  return tot;
}

}  // namespace cpu
}  // namespace fastrank
