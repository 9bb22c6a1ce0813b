// Launchers of the CUDA rank-sums kernels: raw pointers, sizes and a stream, no
// torch types, so that rank_sums.cu compiles with a plain `nvcc -c`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../problem.h"
#include "../step.h"

namespace fastrank {
namespace cuda {

// All matrices are row-major and contiguous: those of pr (see ../problem.h), grad (Q, N),
// rank_all / rank_pos / grad_all / grad_pos / work (Q, P). Returns the launch error, if any.
template <typename T>
cudaError_t rank_sums_forward(const ProblemView<T>& pr, int step, StepParams<T> prm, T* rank_all, T* rank_pos,
                              cudaStream_t stream);

// `work` is caller-provided scratch of Q*P elements. Deterministic: no atomics.
template <typename T>
cudaError_t rank_sums_backward(const T* grad_all, const T* grad_pos, const ProblemView<T>& pr, int step,
                               StepParams<T> prm, T* grad, T* work, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastrank
