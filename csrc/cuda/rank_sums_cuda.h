// Launchers of the CUDA rank-sums kernels: raw pointers, sizes and a stream, no
// torch types, so that rank_sums.cu compiles with a plain `nvcc -c`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../step.h"

namespace fastrank {
namespace cuda {

// All matrices are row-major and contiguous: scores / ign_mask / grad (Q, N),
// pos_idx / rank_all / rank_pos / grad_all / grad_pos / work (Q, P).
// ign_idx (Q,) and ign_mask may be null. Returns the launch error, if any.
template <typename T>
cudaError_t rank_sums_forward(const T* scores, const int64_t* pos_idx, const int64_t* ign_idx, const bool* ign_mask,
                              int64_t Q, int64_t N, int64_t P, int step, StepParams<T> prm, T* rank_all, T* rank_pos,
                              cudaStream_t stream);

// `work` is caller-provided scratch of Q*P elements. Deterministic: no atomics.
template <typename T>
cudaError_t rank_sums_backward(const T* grad_all, const T* grad_pos, const T* scores, const int64_t* pos_idx,
                               const int64_t* ign_idx, const bool* ign_mask, int64_t Q, int64_t N, int64_t P, int step,
                               StepParams<T> prm, T* grad, T* work, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastrank
