// Torch glue of the CUDA soft-histogram kernels (CUDA dispatch key).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "checks.h"
#include "histogram_cuda.h"

namespace fastrank {
namespace cuda {

constexpr const char* kOp = "fastrank cuda histogram";

static std::tuple<at::Tensor, at::Tensor> histogram_fwd_cuda(const at::Tensor& scores_in, const at::Tensor& pos_idx_in,
                                                           const std::optional<at::Tensor>& ign_idx_in,
                                                           const std::optional<at::Tensor>& ign_mask_in, int64_t bins,
                                                           double scale, double shift, bool open_ends) {
  const PackedProblem pp = check_problem(kOp, c10::DeviceType::CUDA, scores_in, pos_idx_in, ign_idx_in, ign_mask_in);
  check_histogram(kOp, bins, kMaxHistBins, scale, shift, pp.scores.scalar_type());
  const c10::cuda::CUDAGuard guard(scores_in.device());
  at::Tensor h_all = at::empty({pp.scores.size(0), bins}, pp.scores.options());
  at::Tensor h_pos = at::empty({pp.scores.size(0), bins}, pp.scores.options());
  AT_DISPATCH_FLOATING_TYPES(pp.scores.scalar_type(), "fastrank_histogram_fwd_cuda", [&] {
    const cudaError_t err = histogram_forward<scalar_t>(problem_view<scalar_t>(pp), bins, scalar_t(scale),
                                                        scalar_t(shift), open_ends, h_all.data_ptr<scalar_t>(),
                                                        h_pos.data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, kOp, " forward: ", cudaGetErrorString(err));
  });
  return {h_all, h_pos};
}

static at::Tensor histogram_bwd_cuda(const at::Tensor& g_all_in, const at::Tensor& g_pos_in, const at::Tensor& scores_in,
                                    const at::Tensor& pos_idx_in, const std::optional<at::Tensor>& ign_idx_in,
                                    const std::optional<at::Tensor>& ign_mask_in, int64_t bins, double scale,
                                    double shift, bool open_ends) {
  const PackedProblem pp = check_problem(kOp, c10::DeviceType::CUDA, scores_in, pos_idx_in, ign_idx_in, ign_mask_in);
  check_histogram(kOp, bins, kMaxHistBins, scale, shift, pp.scores.scalar_type());
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const OutputGrads og = check_histogram_grads(kOp, g_all_in, g_pos_in, pp, bins);
  at::Tensor grad = at::empty(pp.scores.sizes(), pp.scores.options());
  AT_DISPATCH_FLOATING_TYPES(pp.scores.scalar_type(), "fastrank_histogram_bwd_cuda", [&] {
    const cudaError_t err = histogram_backward<scalar_t>(
        og.all.data_ptr<scalar_t>(), og.pos.data_ptr<scalar_t>(), problem_view<scalar_t>(pp), bins, scalar_t(scale),
        scalar_t(shift), open_ends, grad.data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, kOp, " backward: ", cudaGetErrorString(err));
  });
  return grad;
}

TORCH_LIBRARY_IMPL(fastrank, CUDA, m) {
  m.impl("histogram_fwd", &histogram_fwd_cuda);
  m.impl("histogram_bwd", &histogram_bwd_cuda);
}

}  // namespace cuda
}  // namespace fastrank
