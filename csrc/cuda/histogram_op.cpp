// Torch glue of the CUDA soft-histogram kernels (CUDA dispatch key).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "checks.h"
#include "histogram_cuda.h"

namespace fastrank {
namespace cuda {

static std::tuple<at::Tensor, at::Tensor> histogram_fwd_cuda(const at::Tensor& scores_in, const at::Tensor& pos_idx_in,
                                                           const std::optional<at::Tensor>& ign_idx_in,
                                                           const std::optional<at::Tensor>& ign_mask_in, int64_t bins,
                                                           double scale, double shift, bool open_ends) {
  const PackedProblem pp = check_problem("fastrank cuda histogram", c10::DeviceType::CUDA, scores_in, pos_idx_in,
                                         ign_idx_in, ign_mask_in);
  check_histogram("fastrank cuda histogram", bins, kMaxHistBins, scale, shift, pp.scores.scalar_type());
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor& scores = pp.scores;
  const at::Tensor& pos_idx = pp.pos_idx;
  const std::optional<at::Tensor>& ign_idx = pp.ign_idx;
  const std::optional<at::Tensor>& ign_mask = pp.ign_mask;
  at::Tensor h_all = at::empty({scores.size(0), bins}, scores.options());
  at::Tensor h_pos = at::empty({scores.size(0), bins}, scores.options());
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "fastrank_histogram_fwd_cuda", [&] {
    const cudaError_t err = histogram_forward<scalar_t>(
        scores.data_ptr<scalar_t>(), pos_idx.data_ptr<int64_t>(),
        ign_idx.has_value() ? ign_idx->data_ptr<int64_t>() : nullptr,
        ign_mask.has_value() ? ign_mask->data_ptr<bool>() : nullptr, scores.size(0), scores.size(1), pos_idx.size(1),
        bins, scalar_t(scale), scalar_t(shift), open_ends, h_all.data_ptr<scalar_t>(), h_pos.data_ptr<scalar_t>(),
        c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "fastrank cuda histogram forward: ", cudaGetErrorString(err));
  });
  return {h_all, h_pos};
}

static at::Tensor histogram_bwd_cuda(const at::Tensor& g_all_in, const at::Tensor& g_pos_in, const at::Tensor& scores_in,
                                    const at::Tensor& pos_idx_in, const std::optional<at::Tensor>& ign_idx_in,
                                    const std::optional<at::Tensor>& ign_mask_in, int64_t bins, double scale,
                                    double shift, bool open_ends) {
  const PackedProblem pp = check_problem("fastrank cuda histogram", c10::DeviceType::CUDA, scores_in, pos_idx_in,
                                         ign_idx_in, ign_mask_in);
  check_histogram("fastrank cuda histogram", bins, kMaxHistBins, scale, shift, pp.scores.scalar_type());
  const std::vector<int64_t> hshape = {scores_in.size(0), bins};
  check_output_grads("fastrank cuda histogram", "grad_h_all", g_all_in, "grad_h_pos", g_pos_in, hshape, pp.scores);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor& scores = pp.scores;
  const at::Tensor& pos_idx = pp.pos_idx;
  const std::optional<at::Tensor>& ign_idx = pp.ign_idx;
  const std::optional<at::Tensor>& ign_mask = pp.ign_mask;
  const at::Tensor g_all = g_all_in.to(scores.scalar_type()).contiguous();
  const at::Tensor g_pos = g_pos_in.to(scores.scalar_type()).contiguous();
  at::Tensor grad = at::empty(scores.sizes(), scores.options());
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "fastrank_histogram_bwd_cuda", [&] {
    const cudaError_t err = histogram_backward<scalar_t>(
        g_all.data_ptr<scalar_t>(), g_pos.data_ptr<scalar_t>(), scores.data_ptr<scalar_t>(),
        pos_idx.data_ptr<int64_t>(), ign_idx.has_value() ? ign_idx->data_ptr<int64_t>() : nullptr,
        ign_mask.has_value() ? ign_mask->data_ptr<bool>() : nullptr, scores.size(0), scores.size(1), pos_idx.size(1),
        bins, scalar_t(scale), scalar_t(shift), open_ends, grad.data_ptr<scalar_t>(),
        c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "fastrank cuda histogram backward: ", cudaGetErrorString(err));
  });
  return grad;
}

TORCH_LIBRARY_IMPL(fastrank, CUDA, m) {
  m.impl("histogram_fwd", &histogram_fwd_cuda);
  m.impl("histogram_bwd", &histogram_bwd_cuda);
}

}  // namespace cuda
}  // namespace fastrank
