// Torch glue of the CUDA graded rank-sums kernels (CUDA dispatch key, issue 9).
// The kernels themselves (graded_rank_sums.cu) see only raw pointers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <limits>

#include "checks.h"
#include "graded_rank_sums_cuda.h"

namespace fastrank {
namespace cuda {

namespace {

constexpr const char* kOp = "fastrank cuda graded_rank_sums";

// the kernels take the relevance as the key when there is none
template <typename T>
const T* key_ptr(const std::optional<at::Tensor>& key) {
  return key.has_value() ? key->data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> graded_rank_sums_fwd_cuda(const at::Tensor& scores_in,
                                                             const at::Tensor& relevance_in,
                                                             const std::optional<at::Tensor>& key_in,
                                                             const at::Tensor& pos_idx_in,
                                                             const std::optional<at::Tensor>& ign_idx_in,
                                                             const std::optional<at::Tensor>& ign_mask_in,
                                                             int64_t step, double tau, double rho, double delta,
                                                             double start, double offset, bool hrank, double beta,
                                                             double gamma, double leak) {
  const PackedProblem pp = check_problem(kOp, c10::DeviceType::CUDA, scores_in, pos_idx_in, ign_idx_in, ign_mask_in);
  check_step(kOp, step, tau, rho, delta, start, offset, pp.scores.scalar_type());
  check_hrank(kOp, step, hrank, beta, gamma, leak);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor relevance = check_relevance(kOp, relevance_in, pp.scores);
  const std::optional<at::Tensor> key = check_key(kOp, key_in, pp.scores, /*check_values=*/true);
  // zeros: the kernel writes only the ranked (non-hole) entries
  at::Tensor rank_all = at::zeros(pp.pos_idx.sizes(), pp.scores.options());
  at::Tensor rank_pos = at::zeros(pp.pos_idx.sizes(), pp.scores.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pp.scores.scalar_type(), "fastrank_graded_rank_sums_fwd_cuda", [&] {
    const cudaError_t err = graded_rank_sums_forward<scalar_t>(
        problem_view<scalar_t>(pp), relevance.data_ptr<scalar_t>(), key_ptr<scalar_t>(key), static_cast<int>(step),
        make_step_params<scalar_t>(tau, rho, delta, start, offset),
        make_hrank_params<scalar_t>(hrank, beta, gamma, leak), rank_all.data_ptr<scalar_t>(),
        rank_pos.data_ptr<scalar_t>(), stream);
    TORCH_CHECK(err == cudaSuccess, kOp, " forward: ", cudaGetErrorString(err));
  });
  fill_nan_rows_forward(pp, rank_all, rank_pos);
  return {rank_all, rank_pos};
}

at::Tensor graded_rank_sums_bwd_cuda(const at::Tensor& grad_all_in, const at::Tensor& grad_pos_in,
                                     const at::Tensor& scores_in, const at::Tensor& relevance_in,
                                     const std::optional<at::Tensor>& key_in, const at::Tensor& pos_idx_in,
                                     const std::optional<at::Tensor>& ign_idx_in,
                                     const std::optional<at::Tensor>& ign_mask_in, int64_t step, double tau,
                                     double rho, double delta, double start, double offset, bool hrank, double beta,
                                     double gamma, double leak) {
  const PackedProblem pp = check_problem(kOp, c10::DeviceType::CUDA, scores_in, pos_idx_in, ign_idx_in, ign_mask_in);
  check_step(kOp, step, tau, rho, delta, start, offset, pp.scores.scalar_type());
  check_hrank(kOp, step, hrank, beta, gamma, leak);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const OutputGrads og = check_rank_sums_grads(kOp, grad_all_in, grad_pos_in, pp);
  const at::Tensor relevance = check_relevance(kOp, relevance_in, pp.scores);
  const std::optional<at::Tensor> key = check_key(kOp, key_in, pp.scores, /*check_values=*/true);
  at::Tensor grad = at::empty(pp.scores.sizes(), pp.scores.options());  // every element written by the column kernel
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pp.scores.scalar_type(), "fastrank_graded_rank_sums_bwd_cuda", [&] {
    const cudaError_t err = graded_rank_sums_backward<scalar_t>(
        og.all.data_ptr<scalar_t>(), og.pos.data_ptr<scalar_t>(), problem_view<scalar_t>(pp),
        relevance.data_ptr<scalar_t>(), key_ptr<scalar_t>(key), static_cast<int>(step),
        make_step_params<scalar_t>(tau, rho, delta, start, offset),
        make_hrank_params<scalar_t>(hrank, beta, gamma, leak), grad.data_ptr<scalar_t>(), stream);
    TORCH_CHECK(err == cudaSuccess, kOp, " backward: ", cudaGetErrorString(err));
  });
  fill_nan_rows_backward(pp, grad);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrank, CUDA, m) {
  m.impl("graded_rank_sums_fwd", &graded_rank_sums_fwd_cuda);
  m.impl("graded_rank_sums_bwd", &graded_rank_sums_bwd_cuda);
}

}  // namespace cuda
}  // namespace fastrank
