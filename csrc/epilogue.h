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

}  // namespace fastrank
