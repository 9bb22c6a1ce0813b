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

static std::tuple<at::Tensor, at::Tensor> rank_sums_fwd_cuda(const at::Tensor& scores_in, const at::Tensor& pos_idx_in,
                                                           const std::optional<at::Tensor>& ign_idx_in,
                                                           const std::optional<at::Tensor>& ign_mask_in, int64_t step,
                                                           double tau, double rho, double delta, double start,
                                                           double offset) {
  const PackedProblem pp = check_problem("fastrank cuda rank_sums", c10::DeviceType::CUDA, scores_in, pos_idx_in,
                                         ign_idx_in, ign_mask_in);
  check_step("fastrank cuda rank_sums", step, tau, rho, delta, start, offset, pp.scores.scalar_type());
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor& scores = pp.scores;
  const at::Tensor& pos_idx = pp.pos_idx;
  const std::optional<at::Tensor>& ign_idx = pp.ign_idx;
  const std::optional<at::Tensor>& ign_mask = pp.ign_mask;
  at::Tensor rank_all = at::zeros(pos_idx.sizes(), scores.options());
  at::Tensor rank_pos = at::zeros(pos_idx.sizes(), scores.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "fastrank_rank_sums_fwd_cuda", [&] {
    const cudaError_t err = rank_sums_forward<scalar_t>(
        scores.data_ptr<scalar_t>(), pos_idx.data_ptr<int64_t>(),
        ign_idx.has_value() ? ign_idx->data_ptr<int64_t>() : nullptr,
        ign_mask.has_value() ? ign_mask->data_ptr<bool>() : nullptr, scores.size(0), scores.size(1), pos_idx.size(1),
        static_cast<int>(step), make_step_params<scalar_t>(tau, rho, delta, start, offset), rank_all.data_ptr<scalar_t>(),
        rank_pos.data_ptr<scalar_t>(), stream);
    TORCH_CHECK(err == cudaSuccess, "fastrank cuda rank_sums forward: ", cudaGetErrorString(err));
  });
  fill_nan_rows_forward(pp, rank_all, rank_pos);
  return {rank_all, rank_pos};
}

static at::Tensor rank_sums_bwd_cuda(const at::Tensor& grad_all_in, const at::Tensor& grad_pos_in,
                                    const at::Tensor& scores_in, const at::Tensor& pos_idx_in,
                                    const std::optional<at::Tensor>& ign_idx_in,
                                    const std::optional<at::Tensor>& ign_mask_in, int64_t step, double tau, double rho,
                                    double delta, double start, double offset) {
  const PackedProblem pp = check_problem("fastrank cuda rank_sums", c10::DeviceType::CUDA, scores_in, pos_idx_in,
                                         ign_idx_in, ign_mask_in);
  check_step("fastrank cuda rank_sums", step, tau, rho, delta, start, offset, pp.scores.scalar_type());
  check_output_grads("fastrank cuda rank_sums", "grad_rank_all", grad_all_in, "grad_rank_pos", grad_pos_in,
                     pos_idx_in.sizes(), pp.scores);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor& scores = pp.scores;
  const at::Tensor& pos_idx = pp.pos_idx;
  const std::optional<at::Tensor>& ign_idx = pp.ign_idx;
  const std::optional<at::Tensor>& ign_mask = pp.ign_mask;
  const at::Tensor grad_all = grad_all_in.to(scores.scalar_type()).contiguous();
  const at::Tensor grad_pos = grad_pos_in.to(scores.scalar_type()).contiguous();
  at::Tensor grad = at::empty(scores.sizes(), scores.options());  // every element written by the column kernel
  at::Tensor work = at::empty(pos_idx.sizes(), scores.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "fastrank_rank_sums_bwd_cuda", [&] {
    const cudaError_t err = rank_sums_backward<scalar_t>(
        grad_all.data_ptr<scalar_t>(), grad_pos.data_ptr<scalar_t>(), scores.data_ptr<scalar_t>(),
        pos_idx.data_ptr<int64_t>(), ign_idx.has_value() ? ign_idx->data_ptr<int64_t>() : nullptr,
        ign_mask.has_value() ? ign_mask->data_ptr<bool>() : nullptr, scores.size(0), scores.size(1), pos_idx.size(1),
        static_cast<int>(step), make_step_params<scalar_t>(tau, rho, delta, start, offset), grad.data_ptr<scalar_t>(),
        work.data_ptr<scalar_t>(), stream);
    TORCH_CHECK(err == cudaSuccess, "fastrank cuda rank_sums backward: ", cudaGetErrorString(err));
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
