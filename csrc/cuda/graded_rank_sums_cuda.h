// Launchers of the CUDA graded rank-sums kernels (docs/design.md §1.1, issue 9): raw
// pointers, sizes and a stream, no torch types, so that graded_rank_sums.cu
// compiles with a plain `nvcc -c`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../step.h"

namespace fastrank {
namespace cuda {

// All matrices are row-major and contiguous: scores / relevance / ign_mask / grad
// (Q, N), pos_idx / rank_all / rank_pos / grad_all / grad_pos (Q, P). relevance has
// the dtype of scores and is finite and >= 0 (the glue checks it). pos_idx lists the
// ranked items (relevance > 0, not ignored), -1 = hole, columns unique per row.
// ign_idx (Q,) and ign_mask may be null. rank_all / rank_pos must be zero-filled by
// the caller (holes and all-hole tiles are not written). Returns the launch error.
template <typename T>
cudaError_t graded_rank_sums_forward(const T* scores, const T* relevance, const int64_t* pos_idx,
                                     const int64_t* ign_idx, const bool* ign_mask, int64_t Q, int64_t N, int64_t P,
                                     int step, StepParams<T> prm, T* rank_all, T* rank_pos, cudaStream_t stream);

// Writes every element of grad. Deterministic: no atomics, and each element of grad
// has one writer per kernel, in a fixed order. Needs no scratch memory.
template <typename T>
cudaError_t graded_rank_sums_backward(const T* grad_all, const T* grad_pos, const T* scores, const T* relevance,
                                      const int64_t* pos_idx, const int64_t* ign_idx, const bool* ign_mask, int64_t Q,
                                      int64_t N, int64_t P, int step, StepParams<T> prm, T* grad,
                                      cudaStream_t stream);

}  // namespace cuda
}  // namespace fastrank
