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
  // The weight of k = ks[q] in d score / d rank_all_j = sum_q weight_q * y_jq (1 - y_jq): it
  // depends on the row only through hits_k (0 where the clamp binds: torch.clamp(max=k) passes
  // the gradient where hits <= k), so a kernel computes the weights once per row and each
  // positive's derivative on its own (coef), in any order.
  FR_HD T weight(const T* ra, int64_t np, int64_t q) const {
    const T k = T(ks[q]);
    if (clamp_hits && hits(ra, np, k) > k) return T(0);
    return -inv_temp / ((T(np) < k ? T(np) : k) * T(nk));
  }
  // d score / d rank_all of a positive of rank_all ra_p, from the nk weights w
  FR_HD T coef(T ra_p, const T* w) const {
    T d = T(0);
    for (int64_t q = 0; q < nk; ++q) {
      const T y = logistic((T(ks[q]) - ra_p) * inv_temp);
      d += w[q] * y * (T(1) - y);
    }
    return d;
  }
  FR_HD void grad(const T* ra, const T*, int64_t np, T* d_all, T* d_pos) const {
    for (int64_t p = 0; p < np; ++p) d_all[p] = d_pos[p] = T(0);
    for (int64_t q = 0; q < nk; ++q) {
      const T w = weight(ra, np, q);
      if (w == T(0)) continue;
      const T k = T(ks[q]);
      for (int64_t p = 0; p < np; ++p) {
        const T y = logistic((k - ra[p]) * inv_temp);
        d_all[p] += w * y * (T(1) - y);
      }
    }
  }
};

// ---- graded relevance (H-AP, NDCG): a graded epilogue also takes rel[p] > 0 of each of the np
// ranked items, which the fused kernel passes in decreasing relevance (its rows are sorted so):
// NDCG's ideal ordering is then the given one. value(ra, rp, rel, np), grad(ra, rp, rel, np,
// d_all, d_pos) as above.

// H-AP_i = sum_j rank_pos_j / rank_all_j / sum_j rel_j (HAPPIER): AP's term, normalised by the
// total relevance instead of |P_i|
template <typename T>
struct HapEpilogue {
  FR_HD T total(const T* rel, int64_t np) const {
    T t = T(0);
    for (int64_t p = 0; p < np; ++p) t += rel[p];
    return t;
  }
  FR_HD T value(const T* ra, const T* rp, const T* rel, int64_t np) const {
    T acc = T(0);
    for (int64_t p = 0; p < np; ++p) acc += ap_term(rp[p], ra[p]);
    return acc / total(rel, np);
  }
  FR_HD void grad(const T* ra, const T* rp, const T* rel, int64_t np, T* d_all, T* d_pos) const {
    const T inv_total = T(1) / total(rel, np);
    for (int64_t p = 0; p < np; ++p) ap_term_grad(rp[p], ra[p], inv_total, d_all[p], d_pos[p]);
  }
};

// NDCG's gain 2^r - 1. 2^r - 1 rounds to 0 for r below ~1e-7 in float32: expm1 keeps small
// gains, exp2 the large ones exact (as fastrank.ndcg computes it)
template <typename T>
FR_HD T ndcg_gain(T r) {
  return r < T(1) ? T(::expm1(r * T(0.693147180559945309))) : T(::exp2(r)) - T(1);
}

// One ranked item's share of a DCG, its gain gn already divided by the row's scale, at rank
// `rank` (rank_all, or the place + 1 in the ideal ordering), and d share / d rank_all over IDCG:
// -gn / (log2(1 + rank)^2 (1 + rank) ln 2 IDCG), 0 when IDCG is 0. The fused GPU kernels, which
// keep the ranked items in column order, call these per item.
template <typename T>
FR_HD T ndcg_term(T gn, T rank) {
  return gn / T(::log2(T(1) + rank));
}

template <typename T>
FR_HD T ndcg_term_grad(T gn, T rank, T idcg) {
  const T disc = T(::log2(T(1) + rank));
  return idcg > T(0) ? -gn / (disc * disc * (T(1) + rank) * T(0.693147180559945309) * idcg) : T(0);
}

// NDCG_i = DCG_i / IDCG_i, DCG_i = sum_j gain_j / log2(1 + rank_all_j), IDCG_i the DCG of the
// exact ordering (ranks 1, 2, ... in decreasing relevance). The gains are divided by the row's
// largest (rel[0]'s): a ratio of sums of gains does not change, and the sums stay finite where
// several gains near the dtype's largest value would overflow. rank_pos unused.
template <typename T>
struct NdcgEpilogue {
  FR_HD T scale(const T* rel) const {
    const T top = ndcg_gain(rel[0]);
    return top > T(0) ? top : T(1);
  }
  FR_HD T ideal(const T* rel, int64_t np, T top) const {
    T idcg = T(0);
    for (int64_t p = 0; p < np; ++p) idcg += ndcg_term(ndcg_gain(rel[p]) / top, T(p + 1));
    return idcg;
  }
  FR_HD T value(const T* ra, const T*, const T* rel, int64_t np) const {
    const T top = scale(rel);
    T dcg = T(0);
    for (int64_t p = 0; p < np; ++p) dcg += ndcg_term(ndcg_gain(rel[p]) / top, ra[p]);
    const T idcg = ideal(rel, np, top);
    return idcg > T(0) ? dcg / idcg : T(0);
  }
  // d NDCG / d rank_all_j = -gain_j / (log2(1 + rank_all_j)^2 (1 + rank_all_j) ln 2 IDCG)
  FR_HD void grad(const T* ra, const T*, const T* rel, int64_t np, T* d_all, T* d_pos) const {
    const T top = scale(rel);
    const T idcg = ideal(rel, np, top);
    for (int64_t p = 0; p < np; ++p) {
      d_pos[p] = T(0);
      d_all[p] = ndcg_term_grad(ndcg_gain(rel[p]) / top, ra[p], idcg);
    }
  }
};

// ---------------------------------------------------------------- histogram AP (docs/design.md §1.3)
//
// The histogram APs' epilogues on one query's soft histograms h_all, h_pos (L bins, np >= 1
// valid positives): value(ha, hp, L, np) is the query's AP; grad(ha, hp, L, np, d_all, d_pos)
// writes d AP / d h_all[l] and d AP / d h_pos[l] for every bin, which the fused kernel turns
// into the gradient row (each score touches at most two bins). Both follow the autograd of
// fastrank/histogram/__init__.py (_fastap, _softbin): a masked term carries no gradient.
// grad may use d_all and d_pos as scratch before it writes them; they must not alias ha or hp.

// FastAP: AP = (1/np) sum_l h+_l H+_l / H_l with H+ = cumsum h+, H = cumsum h_all; a term with
// h+_l H+_l = 0 or H_l = 0 is dropped (the reference zeroes its NaN/inf terms).
template <typename T>
struct FastApEpilogue {
  FR_HD T value(const T* ha, const T* hp, int64_t L, int64_t np) const {
    T cp = T(0), ca = T(0), acc = T(0);
    for (int64_t l = 0; l < L; ++l) {
      cp += hp[l];
      ca += ha[l];
      const T num = hp[l] * cp;
      if (num != T(0) && ca != T(0)) acc += num / ca;
    }
    return acc / T(np);
  }
  // d num_l = [kept] / H_l feeds h+_l (times H+_l) and, through the cumsum, every h+_m, m <= l
  // (times h+_l); d H_l = -[kept] num_l / H_l^2 feeds every h_all[m], m <= l.
  FR_HD void grad(const T* ha, const T* hp, int64_t L, int64_t np, T* d_all, T* d_pos) const {
    T cp = T(0), ca = T(0);
    for (int64_t l = 0; l < L; ++l) {  // the prefix sums, kept in the outputs for the reverse sweep
      d_pos[l] = cp += hp[l];
      d_all[l] = ca += ha[l];
    }
    const T inv_np = T(1) / T(np);
    T suf_pos = T(0), suf_all = T(0);
    for (int64_t l = L - 1; l >= 0; --l) {
      const T c_pos = d_pos[l], c_all = d_all[l];
      const T num = hp[l] * c_pos;
      T d_num = T(0);
      if (num != T(0) && c_all != T(0)) {
        const T inv = T(1) / c_all;
        d_num = inv * inv_np;
        suf_all -= num * inv * inv * inv_np;
      }
      suf_pos += hp[l] * d_num;
      d_pos[l] = c_pos * d_num + suf_pos;
      d_all[l] = suf_all;
    }
  }
};

// SoftBin (listwise AP): AP = sum_b prec_b rec_b, prec_b = H+_b / H_b (0 where H_b <= 0),
// rec_b = h+_b / sum h+ (0 where the sum is <= 0). Written "not (x <= 0)" as the Python
// epilogue is, so the two masks agree on every input.
template <typename T>
struct SoftBinEpilogue {
  FR_HD T value(const T* ha, const T* hp, int64_t L, int64_t) const {
    T total = T(0);
    for (int64_t l = 0; l < L; ++l) total += hp[l];
    if (total <= T(0)) return T(0);
    T cp = T(0), ca = T(0), acc = T(0);
    for (int64_t l = 0; l < L; ++l) {
      cp += hp[l];
      ca += ha[l];
      const T prec = ca <= T(0) ? T(0) : cp / ca;
      acc += prec * (hp[l] / total);
    }
    return acc;
  }
  // rec_b's direct share prec_b / total, its share through the total -sum_b prec_b h+_b / total^2,
  // and prec_b's through the cumsums: d H+_b = [H_b > 0] rec_b / H_b, d H_b = -d H+_b prec_b.
  FR_HD void grad(const T* ha, const T* hp, int64_t L, int64_t, T* d_all, T* d_pos) const {
    T total = T(0);
    for (int64_t l = 0; l < L; ++l) total += hp[l];
    if (total <= T(0)) {
      for (int64_t l = 0; l < L; ++l) d_all[l] = d_pos[l] = T(0);
      return;
    }
    T cp = T(0), ca = T(0), d_total = T(0);
    for (int64_t l = 0; l < L; ++l) {  // prec_b kept in d_pos, H_b in d_all for the reverse sweep
      cp += hp[l];
      ca += ha[l];
      const T prec = ca <= T(0) ? T(0) : cp / ca;
      d_pos[l] = prec;
      d_all[l] = ca;
      d_total -= prec * hp[l] / (total * total);
    }
    T suf_pos = T(0), suf_all = T(0);
    for (int64_t l = L - 1; l >= 0; --l) {
      const T prec = d_pos[l], c_all = d_all[l];
      if (!(c_all <= T(0))) {
        const T d_cp = (hp[l] / total) / c_all;
        suf_pos += d_cp;
        suf_all -= d_cp * prec;
      }
      d_pos[l] = prec / total + d_total + suf_pos;
      d_all[l] = suf_all;
    }
  }
};

}  // namespace fastrank
