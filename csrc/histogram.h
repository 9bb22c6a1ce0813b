// Soft-histogram arithmetic of histogram AP (docs/design.md §1.3), host/device, no torch headers.
//
// A score s maps to the bin coordinate v = scale * s + shift; bin l of L gets the
// triangular weight [1 - |v - l|]_+, so a score touches bins lo = floor(v) and lo + 1.
// With open ends, v below 0 (above L-1) puts all its mass in bin 0 (L-1) with no
// gradient; without, mass beyond the ends is lost, as in the published FastAP.
// Derivatives follow torch's conventions for relu/abs, which the references use:
// zero at a bin centre (v integer) and on the edges of the support.
#pragma once

#include <cmath>
#include <cstdint>

#include "step.h"

namespace fastrank {

template <typename T>
struct SoftBin {
  int64_t lo;  // first touched bin (may be -1 or L-1: then only one bin is inside)
  T w_lo, w_hi;  // weights of bins lo and lo + 1
  T d_lo, d_hi;  // their derivatives w.r.t. v
};

// Caller guarantees v is not NaN.
template <typename T>
FR_HD SoftBin<T> soft_bin(T v, int64_t L, bool open_ends) {
  SoftBin<T> b;
  const T top = static_cast<T>(L - 1);
  if (open_ends && v <= T(0)) {
    b.lo = 0;
    b.w_lo = T(1);
    b.w_hi = b.d_lo = b.d_hi = T(0);
    return b;
  }
  if (open_ends && v >= top) {
    b.lo = L - 1;
    b.w_lo = T(1);
    b.w_hi = b.d_lo = b.d_hi = T(0);
    return b;
  }
  if (!(v > T(-1) && v < top + T(1))) {  // entirely outside (also catches +-inf)
    b.lo = -2;
    b.w_lo = b.w_hi = b.d_lo = b.d_hi = T(0);
    return b;
  }
  const T f = ::floor(v);
  const T t = v - f;
  b.lo = static_cast<int64_t>(f);
  b.w_lo = T(1) - t;
  b.w_hi = t;
  b.d_lo = t > T(0) ? T(-1) : T(0);
  b.d_hi = t > T(0) ? T(1) : T(0);
  return b;
}

// h[l] += the weights of b, for the bins l of b inside [0, L)
template <typename T>
FR_HD void add_bin(T* h, int64_t L, const SoftBin<T>& b) {
  if (b.lo >= 0 && b.lo < L) h[b.lo] += b.w_lo;
  if (b.lo + 1 >= 0 && b.lo + 1 < L) h[b.lo + 1] += b.w_hi;
}

// d/dv of sum_l g[l] h[l] for the score whose bins are b (the chain rule's scale is the caller's)
template <typename T>
FR_HD T bin_grad(const T* g, int64_t L, const SoftBin<T>& b) {
  T out = T(0);
  if (b.lo >= 0 && b.lo < L) out += g[b.lo] * b.d_lo;
  if (b.lo + 1 >= 0 && b.lo + 1 < L) out += g[b.lo + 1] * b.d_hi;
  return out;
}

}  // namespace fastrank
