// Per-row arithmetic of the rank-sums primitive: one ranked positive (i, j)
// against a contiguous run of competitor scores.
//
// Shared by the CPU kernel (which calls these on compacted runs of positives and
// negatives, so the loops vectorise) and by the CUDA kernels (which call them on
// the run of competitors a thread owns). Free of torch headers.
#pragma once

#include "step.h"

#if defined(__CUDACC__)
#define FR_SIMD_SUM(a)
#define FR_SIMD_SUM2(a, b)
#else
#define FR_PRAGMA(x) _Pragma(#x)
#define FR_SIMD_SUM(a) FR_PRAGMA(omp simd reduction(+ : a))
#define FR_SIMD_SUM2(a, b) FR_PRAGMA(omp simd reduction(+ : a, b))
#endif

namespace fastrank {

// sum_k step(s[k] - sj), step a function object (the steps of step.h below)
template <typename T, typename Step>
FR_HD T run_sum_step(T sj, const T* __restrict__ s, int64_t n, Step step) {
  T acc = T(0);
  FR_SIMD_SUM(acc)
  for (int64_t k = 0; k < n; ++k) acc += step(s[k] - sj);
  return acc;
}

// Backward of one run: c_k = coef * grad(s[k] - sj), grad a step's derivative; g[k] += c_k;
// returns sum_k c_k (which the caller subtracts from the ranked item's gradient).
template <typename T, typename Grad>
FR_HD T run_grad_step(T sj, const T* __restrict__ s, T* __restrict__ g, int64_t n, T coef, Grad grad) {
  T tot = T(0);
  FR_SIMD_SUM(tot)
  for (int64_t k = 0; k < n; ++k) {
    const T c = coef * grad(s[k] - sj);
    g[k] += c;
    tot += c;
  }
  return tot;
}

// sum_k sigma_tau(s[k] - sj)
template <typename T>
FR_HD T run_sum_sigmoid(T sj, const T* s, int64_t n, T inv_tau) {
  return run_sum_step(sj, s, n, [inv_tau](T d) { return sigmoid_tau(d, inv_tau); });
}

// sum_k H^-(s[k] - sj)
template <typename T>
FR_HD T run_sum_suprank_neg(T sj, const T* s, int64_t n, StepParams<T> p) {
  return run_sum_step(sj, s, n, [p](T d) { return suprank_neg(d, p); });
}

// sum_k H(s[k] - sj): competitors at least as relevant as j, ties counted.
template <typename T>
FR_HD T run_sum_heaviside(T sj, const T* s, int64_t n) {
  return run_sum_step(sj, s, n, [](T d) { return heaviside(d); });
}

template <typename T>
FR_HD T run_grad_sigmoid(T sj, const T* s, T* g, int64_t n, T coef, T inv_tau) {
  return run_grad_step(sj, s, g, n, coef, [inv_tau](T d) { return sigmoid_tau_grad(d, inv_tau); });
}

template <typename T>
FR_HD T run_grad_suprank_neg(T sj, const T* s, T* g, int64_t n, T coef, StepParams<T> p) {
  return run_grad_step(sj, s, g, n, coef, [p](T d) { return suprank_neg_grad(d, p); });
}

// ---- the fused loss ops (docs/design.md §2.4): the forward stores each term's derivative, so
// the gradient sweep multiplies and adds only

// sum_k step(s[k] - sj), der[k] = step'(s[k] - sj)
template <typename T, typename Step, typename Grad>
FR_HD T run_sum_store_step(T sj, const T* __restrict__ s, T* __restrict__ der, int64_t n, Step step, Grad grad) {
  T acc = T(0);
  FR_SIMD_SUM(acc)
  for (int64_t k = 0; k < n; ++k) {
    const T d = s[k] - sj;
    acc += step(d);
    der[k] = grad(d);
  }
  return acc;
}

template <typename T>
FR_HD T run_sum_store_sigmoid(T sj, const T* s, T* der, int64_t n, T inv_tau) {
  return run_sum_store_step(
      sj, s, der, n, [inv_tau](T d) { return sigmoid_tau(d, inv_tau); },
      [inv_tau](T d) { return sigmoid_tau_grad(d, inv_tau); });
}

template <typename T>
FR_HD T run_sum_store_suprank_neg(T sj, const T* s, T* der, int64_t n, StepParams<T> p) {
  return run_sum_store_step(
      sj, s, der, n, [p](T d) { return suprank_neg(d, p); }, [p](T d) { return suprank_neg_grad(d, p); });
}

// The backward of one run from stored derivatives: c_k = coef * der[k]; g[k] += c_k; returns
// sum_k c_k. The same products as run_grad_step's, so the same gradient.
template <typename T>
FR_HD T run_grad_stored(const T* __restrict__ der, T* __restrict__ g, int64_t n, T coef) {
  T tot = T(0);
  FR_SIMD_SUM(tot)
  for (int64_t k = 0; k < n; ++k) {
    const T c = coef * der[k];
    g[k] += c;
    tot += c;
  }
  return tot;
}

// ---- graded relevance: runs whose competitors carry their own weight r[k] (rel_k)

// sum_k sigma(s[k] - sj) into acc, sum_k r[k] * sigma(s[k] - sj) into wacc
template <typename T>
FR_HD void run_sum_sigmoid_w(T sj, const T* __restrict__ s, const T* __restrict__ r, int64_t n, T inv_tau, T& acc,
                             T& wacc) {
  T a = T(0), w = T(0);
  FR_SIMD_SUM2(a, w)
  for (int64_t k = 0; k < n; ++k) {
    const T v = sigmoid_tau(s[k] - sj, inv_tau);
    a += v;
    w += r[k] * v;
  }
  acc = a;
  wacc = w;
}

// sum_k H^-(s[k] - sj) into acc, sum_k r[k] * H(s[k] - sj) into wacc: competitors less
// relevant than j are bounded by H^- in rank_all but counted exactly in rank_pos
template <typename T>
FR_HD void run_sum_suprank_w(T sj, const T* __restrict__ s, const T* __restrict__ r, int64_t n, StepParams<T> p,
                             T& acc, T& wacc) {
  T a = T(0), w = T(0);
  FR_SIMD_SUM2(a, w)
  for (int64_t k = 0; k < n; ++k) {
    const T d = s[k] - sj;
    a += suprank_neg(d, p);
    w += r[k] * heaviside(d);
  }
  acc = a;
  wacc = w;
}

// Backward of a weighted sigmoid run: c_k = (a + b * r[k]) * sigma'(s[k] - sj); g[k] += c_k;
// returns sum_k c_k
template <typename T>
FR_HD T run_grad_sigmoid_w(T sj, const T* __restrict__ s, const T* __restrict__ r, T* __restrict__ g, int64_t n, T a,
                           T b, T inv_tau) {
  T tot = T(0);
  FR_SIMD_SUM(tot)
  for (int64_t k = 0; k < n; ++k) {
    const T c = (a + b * r[k]) * sigmoid_tau_grad(s[k] - sj, inv_tau);
    g[k] += c;
    tot += c;
  }
  return tot;
}

// ---- graded relevance, the fused loss op: the weighted runs above with each term's step
// derivative stored to der[k], and their backward from it

// run_sum_sigmoid_w, der[k] = sigma'(s[k] - sj)
template <typename T>
FR_HD void run_sum_store_sigmoid_w(T sj, const T* __restrict__ s, const T* __restrict__ r, T* __restrict__ der,
                                   int64_t n, T inv_tau, T& acc, T& wacc) {
  T a = T(0), w = T(0);
  FR_SIMD_SUM2(a, w)
  for (int64_t k = 0; k < n; ++k) {
    const T d = s[k] - sj;
    const T v = sigmoid_tau(d, inv_tau);
    a += v;
    w += r[k] * v;
    der[k] = sigmoid_tau_grad(d, inv_tau);
  }
  acc = a;
  wacc = w;
}

// run_sum_suprank_w, der[k] = H^-'(s[k] - sj) (H in rank_pos has no gradient)
template <typename T>
FR_HD void run_sum_store_suprank_w(T sj, const T* __restrict__ s, const T* __restrict__ r, T* __restrict__ der,
                                   int64_t n, StepParams<T> p, T& acc, T& wacc) {
  T a = T(0), w = T(0);
  FR_SIMD_SUM2(a, w)
  for (int64_t k = 0; k < n; ++k) {
    const T d = s[k] - sj;
    a += suprank_neg(d, p);
    w += r[k] * heaviside(d);
    der[k] = suprank_neg_grad(d, p);
  }
  acc = a;
  wacc = w;
}

// run_grad_sigmoid_w from stored derivatives: c_k = (a + b * r[k]) * der[k]; g[k] += c_k;
// returns sum_k c_k
template <typename T>
FR_HD T run_grad_stored_w(const T* __restrict__ der, const T* __restrict__ r, T* __restrict__ g, int64_t n, T a,
                          T b) {
  T tot = T(0);
  FR_SIMD_SUM(tot)
  for (int64_t k = 0; k < n; ++k) {
    const T c = (a + b * r[k]) * der[k];
    g[k] += c;
    tot += c;
  }
  return tot;
}

}  // namespace fastrank
