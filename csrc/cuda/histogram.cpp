// Torch glue of the CUDA soft-histogram kernels (CUDA dispatch key).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "histogram_cuda.h"

namespace fastrank {
namespace cuda {

static void check_hist_inputs(const at::Tensor& scores, const at::Tensor& pos_idx,
                              const std::optional<at::Tensor>& ign_idx, const std::optional<at::Tensor>& ign_mask,
                              int64_t bins) {
  TORCH_CHECK(scores.is_cuda() && scores.dim() == 2, "fastrank cuda histogram: scores must be a 2-D CUDA tensor");
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
              "fastrank cuda histogram: scores must be float32 or float64, got ", scores.scalar_type());
  TORCH_CHECK(bins >= 2 && bins <= kMaxHistBins, "fastrank cuda histogram: bins must lie in [2, ", kMaxHistBins,
              "], got ", bins);
  TORCH_CHECK(pos_idx.is_cuda() && pos_idx.get_device() == scores.get_device() &&
                  pos_idx.scalar_type() == at::kLong && pos_idx.dim() == 2 && pos_idx.size(0) == scores.size(0),
              "fastrank cuda histogram: pos_idx must be an int64 (Q, P) tensor on the device of scores");
  const int64_t N = scores.size(1);
  if (pos_idx.numel() > 0) {
    TORCH_CHECK(pos_idx.min().item<int64_t>() >= -1 && pos_idx.max().item<int64_t>() < N,
                "fastrank cuda histogram: pos_idx entries must lie in [-1, N)");
  }
  if (ign_idx.has_value()) {
    TORCH_CHECK(ign_idx->is_cuda() && ign_idx->get_device() == scores.get_device() &&
                    ign_idx->scalar_type() == at::kLong && ign_idx->dim() == 1 && ign_idx->size(0) == scores.size(0),
                "fastrank cuda histogram: ignore_idx must be an int64 (Q,) tensor on the device of scores");
    if (ign_idx->numel() > 0) {
      TORCH_CHECK(ign_idx->min().item<int64_t>() >= -1 && ign_idx->max().item<int64_t>() < N,
                  "fastrank cuda histogram: ignore_idx entries must lie in [-1, N)");
    }
  }
  if (ign_mask.has_value()) {
    TORCH_CHECK(ign_mask->is_cuda() && ign_mask->get_device() == scores.get_device() &&
                    ign_mask->scalar_type() == at::kBool && ign_mask->sizes() == scores.sizes(),
                "fastrank cuda histogram: ignore_mask must be a bool tensor of the shape of scores on its device");
  }
}

static std::tuple<at::Tensor, at::Tensor> histogram_fwd_cuda(const at::Tensor& scores_in, const at::Tensor& pos_idx_in,
                                                           const std::optional<at::Tensor>& ign_idx_in,
                                                           const std::optional<at::Tensor>& ign_mask_in, int64_t bins,
                                                           double scale, double shift, bool open_ends) {
  check_hist_inputs(scores_in, pos_idx_in, ign_idx_in, ign_mask_in, bins);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor pos_idx = pos_idx_in.contiguous();
  std::optional<at::Tensor> ign_idx, ign_mask;
  if (ign_idx_in.has_value()) ign_idx = ign_idx_in->contiguous();
  if (ign_mask_in.has_value()) ign_mask = ign_mask_in->contiguous();
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
  check_hist_inputs(scores_in, pos_idx_in, ign_idx_in, ign_mask_in, bins);
  const std::vector<int64_t> hshape = {scores_in.size(0), bins};
  TORCH_CHECK(g_all_in.sizes() == hshape && g_pos_in.sizes() == hshape,
              "fastrank cuda histogram backward: gradients must be (Q, bins)");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor pos_idx = pos_idx_in.contiguous();
  const at::Tensor g_all = g_all_in.to(scores.scalar_type()).contiguous();
  const at::Tensor g_pos = g_pos_in.to(scores.scalar_type()).contiguous();
  std::optional<at::Tensor> ign_idx, ign_mask;
  if (ign_idx_in.has_value()) ign_idx = ign_idx_in->contiguous();
  if (ign_mask_in.has_value()) ign_mask = ign_mask_in->contiguous();
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
