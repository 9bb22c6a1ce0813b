// Torch glue of the CUDA rank-sums kernels (CUDA dispatch key). The kernels
// themselves (rank_sums.cu) see only raw pointers.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <limits>

#include "checks.h"
#include "rank_sums_cuda.h"

namespace fastrank {
namespace cuda {

constexpr const char* kOp = "fastrank cuda rank_sums";

static std::tuple<at::Tensor, at::Tensor> rank_sums_fwd_cuda(const at::Tensor& scores_in, const at::Tensor& pos_idx_in,
                                                           const std::optional<at::Tensor>& ign_idx_in,
                                                           const std::optional<at::Tensor>& ign_mask_in, int64_t step,
                                                           double tau, double rho, double delta, double start,
                                                           double offset) {
  const PackedProblem pp = check_problem(kOp, c10::DeviceType::CUDA, scores_in, pos_idx_in, ign_idx_in, ign_mask_in);
  check_step(kOp, step, tau, rho, delta, start, offset, pp.scores.scalar_type());
  const c10::cuda::CUDAGuard guard(scores_in.device());
  at::Tensor rank_all = at::zeros(pp.pos_idx.sizes(), pp.scores.options());
  at::Tensor rank_pos = at::zeros(pp.pos_idx.sizes(), pp.scores.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pp.scores.scalar_type(), "fastrank_rank_sums_fwd_cuda", [&] {
    const cudaError_t err = rank_sums_forward<scalar_t>(
        problem_view<scalar_t>(pp), static_cast<int>(step), make_step_params<scalar_t>(tau, rho, delta, start, offset),
        rank_all.data_ptr<scalar_t>(), rank_pos.data_ptr<scalar_t>(), stream);
    TORCH_CHECK(err == cudaSuccess, kOp, " forward: ", cudaGetErrorString(err));
  });
  fill_nan_rows_forward(pp, rank_all, rank_pos);
  return {rank_all, rank_pos};
}

static at::Tensor rank_sums_bwd_cuda(const at::Tensor& grad_all_in, const at::Tensor& grad_pos_in,
                                    const at::Tensor& scores_in, const at::Tensor& pos_idx_in,
                                    const std::optional<at::Tensor>& ign_idx_in,
                                    const std::optional<at::Tensor>& ign_mask_in, int64_t step, double tau, double rho,
                                    double delta, double start, double offset) {
  const PackedProblem pp = check_problem(kOp, c10::DeviceType::CUDA, scores_in, pos_idx_in, ign_idx_in, ign_mask_in);
  check_step(kOp, step, tau, rho, delta, start, offset, pp.scores.scalar_type());
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const OutputGrads og = check_rank_sums_grads(kOp, grad_all_in, grad_pos_in, pp);
  at::Tensor grad = at::empty(pp.scores.sizes(), pp.scores.options());  // every element written by the column kernel
  at::Tensor work = at::empty(pp.pos_idx.sizes(), pp.scores.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pp.scores.scalar_type(), "fastrank_rank_sums_bwd_cuda", [&] {
    const cudaError_t err = rank_sums_backward<scalar_t>(
        og.all.data_ptr<scalar_t>(), og.pos.data_ptr<scalar_t>(), problem_view<scalar_t>(pp), static_cast<int>(step),
        make_step_params<scalar_t>(tau, rho, delta, start, offset), grad.data_ptr<scalar_t>(),
        work.data_ptr<scalar_t>(), stream);
    TORCH_CHECK(err == cudaSuccess, kOp, " backward: ", cudaGetErrorString(err));
  });
  fill_nan_rows_backward(pp, grad);
  return grad;
}

TORCH_LIBRARY_IMPL(fastrank, CUDA, m) {
  m.impl("rank_sums_fwd", &rank_sums_fwd_cuda);
  m.impl("rank_sums_bwd", &rank_sums_bwd_cuda);
}

}  // namespace cuda
}  // namespace fastrank
