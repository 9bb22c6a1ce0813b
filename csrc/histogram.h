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
  int64_t lo;  // first touched bin, in [-1, L]: bins -1 and L are outside (their weight is lost)
  T w_lo, w_hi;  // weights of bins lo and lo + 1
  T d_lo, d_hi;  // their derivatives w.r.t. v
};

// min / max of two non-NaN values, written so that the compiler emits minss / maxss (no branch)
template <typename T>
FR_HD T fmin_hd(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
FR_HD T fmax_hd(T a, T b) {
  return a < b ? b : a;
}

// Caller guarantees v is not NaN. Branch-free, so that scores on either side of an open end do
// not cost a mispredicted branch each: v is first clamped to where its bins stop changing --
// [0, L-1] with open ends (all mass in the end bin, t = 0: no gradient), [-1, L] without (the
// mass lands on bins -1 or L, outside [0, L), also for +-inf) -- and floor comes from the
// integer conversion (|v| <= L + 1; the C library's floor is a call on baseline x86-64).
template <typename T>
FR_HD SoftBin<T> soft_bin(T v, int64_t L, bool open_ends) {
  const T top = static_cast<T>(L - 1);
  const T lo_v = open_ends ? T(0) : T(-1), hi_v = open_ends ? top : top + T(1);
  v = fmax_hd(lo_v, fmin_hd(v, hi_v));
  const int64_t trunc = static_cast<int64_t>(v);
  const int64_t lo = trunc - (static_cast<T>(trunc) > v ? 1 : 0);
  const T t = v - static_cast<T>(lo);
  SoftBin<T> b;
  b.lo = lo;
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
