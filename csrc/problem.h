// The packed problem (fastrank/_problem.py) as the kernels see it: raw pointers and sizes,
// the part every op family shares. Free of torch headers (the CUDA launchers take it);
// checks.h makes one from a checked PackedProblem (problem_view). A family adds only what
// it needs next to it: the step (rank sums), relevance (graded), the bins (histogram).
#pragma once

#include <cstdint>

namespace fastrank {

template <typename T>
struct ProblemView {
  const T* scores;         // (Q, N) contiguous
  const int64_t* pos_idx;  // (Q, P) contiguous, column of each ranked item, -1 = hole
  const int64_t* ign_idx;  // (Q,) or nullptr: one ignored column per query, -1 = none
  const bool* ign_mask;    // (Q, N) or nullptr: true = ignored
  int64_t Q, N, P;
};

// The target of a fused loss op as its kernels read it (docs/design.md §2.4): the labels or the
// dense positives exactly as the user gave them, never packed (the loss ops' ProblemView has
// P = 0). Exactly one of (qlab, glab) or pos_mask is set (checks.h check_target_problem).
struct TargetView {
  const int64_t* qlab;   // (Q,) or nullptr: positive = same label
  const int64_t* glab;   // (N,) or nullptr
  const bool* pos_mask;  // (Q, N) or nullptr: true = positive
};

// ---- row helpers of the CPU kernels (the CUDA kernels test one column at a time:
// cuda/common.cuh is_valid)

// valid[k] = 1 where column k of row i takes part (not ignore_idx, not masked), else 0; k < N.
template <typename T>
inline void mark_valid_columns(const ProblemView<T>& pr, int64_t i, uint8_t* valid) {
  if (pr.ign_mask) {
    const bool* m = pr.ign_mask + i * pr.N;
    for (int64_t k = 0; k < pr.N; ++k) valid[k] = !m[k];
  } else {
    for (int64_t k = 0; k < pr.N; ++k) valid[k] = 1;
  }
  if (pr.ign_idx && pr.ign_idx[i] >= 0) valid[pr.ign_idx[i]] = 0;
}

// flag[k] of row i of a loss problem: 2 = positive, 1 = valid negative, 0 = left out (ignored).
// Each row task flags its own row, so a loss call has no data-dependent shapes. One branch-free
// pass per target form (the compiler vectorises each), then the one ignored column.
template <typename T>
inline void flag_row(const ProblemView<T>& pr, const TargetView& t, int64_t i, uint8_t* flag) {
  const int64_t N = pr.N;
  const bool* ign = pr.ign_mask ? pr.ign_mask + i * N : nullptr;
  if (t.qlab) {
    const int64_t label = t.qlab[i];
    const int64_t* gl = t.glab;
    if (ign)
      for (int64_t k = 0; k < N; ++k) flag[k] = uint8_t(uint8_t(!ign[k]) * uint8_t(1 + (gl[k] == label)));
    else
      for (int64_t k = 0; k < N; ++k) flag[k] = uint8_t(1 + (gl[k] == label));
  } else {
    const bool* m = t.pos_mask + i * N;
    if (ign)
      for (int64_t k = 0; k < N; ++k) flag[k] = uint8_t(uint8_t(!ign[k]) * uint8_t(1 + m[k]));
    else
      for (int64_t k = 0; k < N; ++k) flag[k] = uint8_t(1 + m[k]);
  }
  if (pr.ign_idx && pr.ign_idx[i] >= 0) flag[pr.ign_idx[i]] = 0;
}

// Row i ranks at least one item (pos_idx has a non-hole entry).
template <typename T>
inline bool row_has_ranked(const ProblemView<T>& pr, int64_t i) {
  const int64_t* pidx = pr.pos_idx + i * pr.P;
  bool any = false;
  for (int64_t p = 0; p < pr.P; ++p) any |= pidx[p] >= 0;
  return any;
}

}  // namespace fastrank
