// Launchers of the CUDA soft-histogram kernels (histogram AP): raw pointers, no torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../problem.h"

namespace fastrank {
namespace cuda {

// Largest number of bins a block keeps per thread (private histograms, reduced in a
// fixed order so the result is deterministic).
constexpr int64_t kMaxHistBins = 128;

// h_all / h_pos: (Q, L). Rows with a NaN valid score become NaN.
template <typename T>
cudaError_t histogram_forward(const ProblemView<T>& pr, int64_t L, T scale, T shift, bool open_ends, T* h_all,
                              T* h_pos, cudaStream_t stream);

// grad: (Q, N), every element written. Deterministic: each element has one writer per kernel.
template <typename T>
cudaError_t histogram_backward(const T* g_all, const T* g_pos, const ProblemView<T>& pr, int64_t L, T scale,
                               T shift, bool open_ends, T* grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastrank
