// Torch glue of the fused CUDA loss kernels (loss.cu, histogram_loss.cu, graded_loss.cu): ap_loss,
// recall_loss, histogram_ap_loss and graded_loss on the CUDA dispatch key. Their autograd is
// csrc/loss_autograd.cpp (registered for every device).
//
// No host synchronisation: the checks here read only shapes, dtypes and scalar arguments. The
// data checks the CPU op makes with a sync (the ignore index's range, a NaN relevance) are
// flags in device memory instead: such a query scores NaN with a NaN gradient row (loss.cu).
// Every tensor op and kernel runs on the current stream, so a call can be captured in a CUDA graph.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"
#include "loss_cuda.h"

namespace fastrank {
namespace cuda {

// The fused loss ops' outputs, after the limits of their grids (one launch covers Q rows and
// N / 256 column blocks; columns are int32): score (Q,), ranked positives (Q,) int64 and the
// gradient rows (Q, N), or (0, N) without with_grad; zero-filled when there is no work (Q or N 0).
struct LossOutputs {
  at::Tensor score, n_pos, grad;
  bool empty;
};

static LossOutputs loss_outputs(const char* op, const at::Tensor& scores, bool with_grad) {
  const int64_t Q = scores.size(0), N = scores.size(1);
  TORCH_CHECK_VALUE(N < std::numeric_limits<int32_t>::max(), op, ": N must be below 2^31 - 1, got ", N);
  TORCH_CHECK_VALUE(Q <= std::numeric_limits<int32_t>::max(), op, ": Q must be at most 2^31 - 1, got ", Q);
  TORCH_CHECK_VALUE(N <= 65535LL * 256, op, ": N must be at most ", 65535LL * 256, " on CUDA, got ", N);
  const auto opts = scores.options();
  LossOutputs out{at::empty({Q}, opts), at::empty({Q}, opts.dtype(at::kLong)),
                  at::empty({with_grad ? Q : 0, N}, opts), Q == 0 || N == 0};
  if (out.empty) {
    out.score.zero_();
    out.n_pos.zero_();
    out.grad.zero_();
  }
  return out;
}

// The loss ops' common glue: checks (without the value passes), allocates the outputs (score
// (Q,), ranked positives (Q,) int64, gradient rows (Q, N) or (0, N)) and the plan's scratch, and
// runs loss_forward with the options make_options(scalar_t{}) builds for the dtype.
template <typename MakeOptions>
static std::tuple<at::Tensor, at::Tensor, at::Tensor> run_loss_op(
    const char* op, const at::Tensor& scores_in, const std::optional<at::Tensor>& qlab_in,
    const std::optional<at::Tensor>& glab_in, const std::optional<at::Tensor>& relevance_in,
    const std::optional<at::Tensor>& ign_idx_in, const std::optional<at::Tensor>& ign_mask_in, int64_t step,
    double tau, double rho, double delta, double start, double offset, bool with_grad,
    const MakeOptions& make_options) {
  // half scores: the public losses cast them to float32 before calling (fastrank/core/problem.py)
  const TargetProblem tp = check_target_problem(op, c10::DeviceType::CUDA, scores_in, qlab_in, glab_in, relevance_in,
                                                ign_idx_in, ign_mask_in, /*check_values=*/false);
  check_step(op, step, tau, rho, delta, start, offset, tp.scores.scalar_type());
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const int64_t Q = tp.scores.size(0), N = tp.scores.size(1);
  const auto opts = tp.scores.options();
  LossOutputs lo = loss_outputs(op, tp.scores, with_grad);
  if (lo.empty) return {lo.score, lo.n_pos, lo.grad};
  at::Tensor &score = lo.score, &n_pos = lo.n_pos, &grad = lo.grad;
  // a NaN in a float relevance makes its query invalid: found here by a device pass, no sync
  std::optional<at::Tensor> bad_rows;
  if (relevance_in.has_value() && at::isFloatingType(relevance_in->scalar_type()))
    bad_rows = relevance_in->isnan().any(1).contiguous();
  const int kind = make_options(0.0f).kind;
  const LossPlan plan = plan_loss(Q, N, static_cast<int>(step), with_grad, kind);
  at::Tensor cols = at::empty({Q, N}, opts.dtype(at::kInt));
  at::Tensor meta = at::empty({Q, 2}, opts.dtype(at::kInt));
  at::Tensor work = plan.planes > 0 ? at::empty({plan.planes, Q, N}, opts) : at::empty({1}, opts);
  at::Tensor part = at::empty({plan.part_elems}, opts);
  at::Tensor rsum = at::empty({plan.rsum_elems}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(tp.scores.scalar_type(), "fastrank_loss_cuda", [&] {
    const LossOptions<scalar_t> lo = make_options(scalar_t{});
    const cudaError_t err = loss_forward<scalar_t>(
        problem_view<scalar_t>(tp), target_view(tp), bad_rows ? bad_rows->data_ptr<bool>() : nullptr,
        static_cast<int>(step), make_step_params<scalar_t>(tau, rho, delta, start, offset), lo, plan,
        cols.data_ptr<int32_t>(), meta.data_ptr<int32_t>(), work.data_ptr<scalar_t>(), part.data_ptr<scalar_t>(),
        rsum.data_ptr<scalar_t>(), score.data_ptr<scalar_t>(), n_pos.data_ptr<int64_t>(), with_grad ? grad.data_ptr<scalar_t>() : nullptr,
        stream);
    TORCH_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorString(err));
  });
  return {score, n_pos, grad};
}

// AP (Smooth-AP with step 0, SupAP with step 1)
static std::tuple<at::Tensor, at::Tensor, at::Tensor> ap_loss_cuda(
    const at::Tensor& scores, const std::optional<at::Tensor>& qlab, const std::optional<at::Tensor>& glab,
    const std::optional<at::Tensor>& relevance, const std::optional<at::Tensor>& ign_idx,
    const std::optional<at::Tensor>& ign_mask, int64_t step, double tau, double rho, double delta, double start,
    double offset, bool with_grad) {
  return run_loss_op("fastrank cuda ap_loss", scores, qlab, glab, relevance, ign_idx, ign_mask, step, tau, rho, delta,
                     start, offset, with_grad, [](auto zero) {
                       LossOptions<decltype(zero)> o{};
                       o.kind = 0;
                       o.nk = 0;
                       o.inv_temp = decltype(zero)(1);
                       o.clamp_hits = false;
                       return o;
                     });
}

// Recall@k surrogates (SupRank's; Patel et al.'s with clamp_hits)
static std::tuple<at::Tensor, at::Tensor, at::Tensor> recall_loss_cuda(
    const at::Tensor& scores, const std::optional<at::Tensor>& qlab, const std::optional<at::Tensor>& glab,
    const std::optional<at::Tensor>& relevance, const std::optional<at::Tensor>& ign_idx,
    const std::optional<at::Tensor>& ign_mask, int64_t step, double tau, double rho, double delta, double start,
    double offset, c10::IntArrayRef ks, double temp, bool clamp_hits, bool with_grad) {
  constexpr const char* op = "fastrank cuda recall_loss";
  const std::vector<int64_t> kv = check_ks(op, ks);
  TORCH_CHECK_VALUE(static_cast<int64_t>(kv.size()) <= kMaxKs, op, ": at most ", kMaxKs,
                    " values of k per call on CUDA (they are passed by value to the kernel), got ", kv.size());
  TORCH_CHECK_VALUE(temp > 0, op, ": temp must be > 0, got ", temp);
  const double big = dtype_max(scores.scalar_type());
  return run_loss_op(op, scores, qlab, glab, relevance, ign_idx, ign_mask, step, tau, rho, delta, start, offset,
                     with_grad, [&](auto zero) {
                       using T = decltype(zero);
                       LossOptions<T> o{};
                       o.kind = 1;
                       o.nk = static_cast<int64_t>(kv.size());
                       std::copy(kv.begin(), kv.end(), o.ks);
                       // times 1/temp, capped at sqrt(max): as the CPU op and fastrank/recall.py
                       o.inv_temp = T(std::min(1.0 / temp, std::sqrt(big)));
                       o.clamp_hits = clamp_hits;
                       return o;
                     });
}

// Histogram AP (FastAP kind 0, SoftBin kind 1): one launch, its scratch in shared memory (three
// launches and a global scratch when few rows are split over several blocks)
static std::tuple<at::Tensor, at::Tensor, at::Tensor> histogram_ap_loss_cuda(
    const at::Tensor& scores_in, const std::optional<at::Tensor>& qlab_in, const std::optional<at::Tensor>& glab_in,
    const std::optional<at::Tensor>& relevance_in, const std::optional<at::Tensor>& ign_idx_in,
    const std::optional<at::Tensor>& ign_mask_in, int64_t bins, double scale, double shift, bool open_ends,
    int64_t kind, bool with_grad) {
  constexpr const char* op = "fastrank cuda histogram_ap_loss";
  const TargetProblem tp = check_target_problem(op, c10::DeviceType::CUDA, scores_in, qlab_in, glab_in, relevance_in,
                                                ign_idx_in, ign_mask_in, /*check_values=*/false);
  check_histogram(op, bins, kMaxFusedBins, scale, shift, tp.scores.scalar_type());
  TORCH_CHECK_VALUE(kind == 0 || kind == 1, op, ": kind must be 0 (fastap) or 1 (softbin), got ", kind);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const int64_t Q = tp.scores.size(0), N = tp.scores.size(1);
  const auto opts = tp.scores.options();
  LossOutputs lo = loss_outputs(op, tp.scores, with_grad);
  if (lo.empty) return {lo.score, lo.n_pos, lo.grad};
  at::Tensor &score = lo.score, &n_pos = lo.n_pos, &grad = lo.grad;
  std::optional<at::Tensor> bad_rows;
  if (relevance_in.has_value() && at::isFloatingType(relevance_in->scalar_type()))
    bad_rows = relevance_in->isnan().any(1).contiguous();
  const HistLossPlan plan = plan_histogram_loss(Q, N, bins, with_grad);
  at::Tensor scratch = at::empty({plan.scratch_elems}, opts);
  at::Tensor int_scratch = at::empty({plan.int_elems}, opts.dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(tp.scores.scalar_type(), "fastrank_histogram_ap_loss_cuda", [&] {
    const cudaError_t err = histogram_loss_forward<scalar_t>(
        problem_view<scalar_t>(tp), target_view(tp), bad_rows ? bad_rows->data_ptr<bool>() : nullptr, bins,
        static_cast<scalar_t>(scale), static_cast<scalar_t>(shift), open_ends, static_cast<int>(kind), plan,
        scratch.data_ptr<scalar_t>(), int_scratch.data_ptr<int>(), score.data_ptr<scalar_t>(), n_pos.data_ptr<int64_t>(), with_grad ? grad.data_ptr<scalar_t>() : nullptr,
        stream);
    TORCH_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorString(err));
  });
  return {score, n_pos, grad};
}

// Graded loss (H-AP kind 0, NDCG kind 1) from the dense relevance, with the optional ordering key
// and HAPPIER's smoothed H-rank; the relevance and key values are checked in the kernels (an
// invalid row scores NaN), where the CPU op raises
static std::tuple<at::Tensor, at::Tensor, at::Tensor> graded_loss_cuda(
    const at::Tensor& scores_in, const at::Tensor& relevance_in, const std::optional<at::Tensor>& key_in,
    const std::optional<at::Tensor>& ign_idx_in, const std::optional<at::Tensor>& ign_mask_in, int64_t step,
    double tau, double rho, double delta, double start, double offset, bool hrank, double beta, double gamma,
    double leak, int64_t kind, bool with_grad) {
  constexpr const char* op = "fastrank cuda graded_loss";
  check_scores_and_ignore(op, c10::DeviceType::CUDA, scores_in, ign_idx_in, ign_mask_in, /*check_values=*/false);
  check_relevance_layout(op, relevance_in, scores_in);
  const std::optional<at::Tensor> key = check_key(op, key_in, scores_in, /*check_values=*/false);
  check_step(op, step, tau, rho, delta, start, offset, scores_in.scalar_type());
  check_hrank(op, step, hrank, beta, gamma, leak);
  TORCH_CHECK_VALUE(kind == 0 || kind == 1, op, ": kind must be 0 (H-AP) or 1 (NDCG), got ", kind);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor rel = relevance_in.contiguous();
  const std::optional<at::Tensor> idx =
      ign_idx_in ? std::optional<at::Tensor>(ign_idx_in->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> mask =
      ign_mask_in ? std::optional<at::Tensor>(ign_mask_in->contiguous()) : std::nullopt;
  const int64_t Q = scores.size(0), N = scores.size(1);
  const auto opts = scores.options();
  LossOutputs lo = loss_outputs(op, scores, with_grad);
  if (lo.empty) return {lo.score, lo.n_pos, lo.grad};
  at::Tensor &score = lo.score, &n_pos = lo.n_pos, &grad = lo.grad;
  const bool ndcg = kind == 1;
  const GradedLossPlan plan = plan_graded_loss(Q, N, static_cast<int>(step), with_grad, ndcg, hrank);
  at::Tensor cols = at::empty({Q, N}, opts.dtype(at::kInt));
  at::Tensor meta = at::empty({Q, 2}, opts.dtype(at::kInt));
  at::Tensor work = at::empty({plan.planes, Q, N}, opts);
  at::Tensor part = at::empty({plan.part_elems}, opts);
  // NDCG's gain 2^rel - 1 must be finite in the dtype: rel < log2(max), as the CPU op
  const double limit =
      ndcg ? std::log2(dtype_max(scores.scalar_type())) : std::numeric_limits<double>::infinity();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "fastrank_graded_loss_cuda", [&] {
    using T = scalar_t;
    const ProblemView<T> view{scores.data_ptr<T>(), nullptr, idx ? idx->data_ptr<int64_t>() : nullptr,
                              mask ? mask->data_ptr<bool>() : nullptr, Q, N, 0};
    const cudaError_t err = graded_loss_forward<T>(
        view, rel.data_ptr<T>(), key ? key->data_ptr<T>() : nullptr, static_cast<int>(step),
        make_step_params<T>(tau, rho, delta, start, offset), make_hrank_params<T>(hrank, beta, gamma, leak), ndcg,
        static_cast<T>(limit), std::numeric_limits<T>::min(), plan, cols.data_ptr<int32_t>(),
        meta.data_ptr<int32_t>(), work.data_ptr<T>(), part.data_ptr<T>(), score.data_ptr<T>(),
        n_pos.data_ptr<int64_t>(), with_grad ? grad.data_ptr<T>() : nullptr, stream);
    TORCH_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorString(err));
  });
  return {score, n_pos, grad};
}

TORCH_LIBRARY_IMPL(fastrank, CUDA, m) {
  m.impl("ap_loss", &ap_loss_cuda);
  m.impl("recall_loss", &recall_loss_cuda);
  m.impl("histogram_ap_loss", &histogram_ap_loss_cuda);
  m.impl("graded_loss", &graded_loss_cuda);
}

}  // namespace cuda
}  // namespace fastrank
