// Launchers of the CUDA graded rank-sums kernels (docs/design.md §1.1, issue 9): raw
// pointers, sizes and a stream, no torch types, so that graded_rank_sums.cu
// compiles with a plain `nvcc -c`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../problem.h"
#include "../step.h"

namespace fastrank {
namespace cuda {

// All matrices are row-major and contiguous: those of pr (see ../problem.h), relevance /
// grad (Q, N), rank_all / rank_pos / grad_all / grad_pos (Q, P). relevance has the dtype
// of scores and is finite and >= 0 (the glue checks it). key, the ordering key of the suprank
// step ((Q, N), finite), may be nullptr: the relevance is the key. hr: HAPPIER's smoothed
// H-rank (suprank only; hr.on = false for the plain step). pr.pos_idx lists the ranked
// items (relevance > 0, not ignored), -1 = hole, columns unique per row. rank_all /
// rank_pos must be zero-filled by the caller (holes and all-hole tiles are not written).
// Returns the launch error.
template <typename T>
cudaError_t graded_rank_sums_forward(const ProblemView<T>& pr, const T* relevance, const T* key, int step,
                                     StepParams<T> prm, HRankParams<T> hr, T* rank_all, T* rank_pos,
                                     cudaStream_t stream);

// Writes every element of grad. Deterministic: no atomics, and each element of grad
// has one writer per kernel, in a fixed order. Needs no scratch memory.
template <typename T>
cudaError_t graded_rank_sums_backward(const T* grad_all, const T* grad_pos, const ProblemView<T>& pr,
                                      const T* relevance, const T* key, int step, StepParams<T> prm,
                                      HRankParams<T> hr, T* grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastrank
