// The losses' epilogues on one query's rank sums, and their derivatives (docs/design.md §1.2),
// host/device, free of torch headers: the fused loss kernels of every backend use these.
//
// A fused loss kernel computes, for query i, the rank sums of its ranked positives, the
// query's score from them (here), and the score's derivatives with respect to each rank
// sum (here too), which the rank-sums backward turns into the gradient row d score_i / d s_i.
#pragma once

#include "step.h"

namespace fastrank {

// AP_i = inv_np * sum_j rank_pos_j / rank_all_j: the term of one positive j
template <typename T>
FR_HD T ap_term(T rank_pos, T rank_all) {
  return rank_pos / rank_all;
}

// d AP_i / d rank_all_j and d AP_i / d rank_pos_j of that term (inv_np = 1 / |P_i|)
template <typename T>
FR_HD void ap_term_grad(T rank_pos, T rank_all, T inv_np, T& d_rank_all, T& d_rank_pos) {
  const T inv = T(1) / rank_all;
  d_rank_pos = inv * inv_np;
  d_rank_all = -rank_pos * inv * inv * inv_np;
}

// An epilogue, as the fused loss kernels take it: value(ra, rp, np) is query i's score from the
// rank sums (rank_all, rank_pos) of its np >= 1 ranked positives; grad(ra, rp, np, d_all, d_pos)
// writes d score / d rank_all_j and d score / d rank_pos_j for each of them.

// AP (Smooth-AP, SupAP): the mean of rank_pos / rank_all
template <typename T>
struct ApEpilogue {
  FR_HD T value(const T* ra, const T* rp, int64_t np) const {
    T acc = T(0);
    for (int64_t p = 0; p < np; ++p) acc += ap_term(rp[p], ra[p]);
    return acc / T(np);
  }
  FR_HD void grad(const T* ra, const T* rp, int64_t np, T* d_all, T* d_pos) const {
    const T inv_np = T(1) / T(np);
    for (int64_t p = 0; p < np; ++p) ap_term_grad(rp[p], ra[p], inv_np, d_all[p], d_pos[p]);
  }
};

// the logistic function of the Recall@k epilogue (unclamped, as torch.sigmoid)
template <typename T>
FR_HD T logistic(T x) {
  return T(1) / (T(1) + ::exp(-x));
}

// Recall@k (SupRank; Patel et al. with clamp_hits): the mean over k in ks of
//   hits_k / min(np, k),  hits_k = sum_j sigma((k - rank_all_j) * inv_temp),
// hits_k clamped at k for Patel et al. (no gradient where the clamp binds). rank_pos unused.
template <typename T>
struct RecallEpilogue {
  const int64_t* ks;
  int64_t nk;
  T inv_temp;
  bool clamp_hits;

  FR_HD T hits(const T* ra, int64_t np, T k) const {
    T h = T(0);
    for (int64_t p = 0; p < np; ++p) h += logistic((k - ra[p]) * inv_temp);
    return h;
  }
  FR_HD T value(const T* ra, const T*, int64_t np) const {
    T total = T(0);
    for (int64_t q = 0; q < nk; ++q) {
      const T k = T(ks[q]);
      T h = hits(ra, np, k);
      if (clamp_hits && h > k) h = k;
      total += h / (T(np) < k ? T(np) : k);
    }
    return total / T(nk);
  }
  FR_HD void grad(const T* ra, const T*, int64_t np, T* d_all, T* d_pos) const {
    for (int64_t p = 0; p < np; ++p) d_all[p] = d_pos[p] = T(0);
    for (int64_t q = 0; q < nk; ++q) {
      const T k = T(ks[q]);
      // torch.clamp(max=k) passes the gradient where hits <= k
      if (clamp_hits && hits(ra, np, k) > k) continue;
      const T w = -inv_temp / ((T(np) < k ? T(np) : k) * T(nk));
      for (int64_t p = 0; p < np; ++p) {
        const T y = logistic((k - ra[p]) * inv_temp);
        d_all[p] += w * y * (T(1) - y);
      }
    }
  }
};

}  // namespace fastrank
