// ranked_mean (schema in fastrank.cpp): reduction="mean" of a fused loss op's per-query scores,
// over the queries that rank at least one item (count > 0), 0 (still connected to the graph)
// when none does -- the rule of fastrank.core.epilogue.reduce_values, in one op.
//
// Why an op: in Python the rule is five small ops forward (sum, compare, sum, clamp, cast,
// divide) and two autograd nodes backward, about 35 us of a 300 us SupAP call at B = 256 on
// this project's CPU machines. Here it is one pass over Q values forward and one node backward,
// whose gradient (grad / n_ranked, broadcast to (Q,)) the loss op's node then folds into its
// scaling of the gradient rows.
//
// Outputs: the mean (0-d, values' dtype) and n_ranked = max(1, #{count > 0}) (0-d, values'
// dtype; not differentiable), which the backward divides by. A NaN value makes the mean NaN.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>

namespace fastrank {
namespace {

void check_ranked_mean(const at::Tensor& values, const at::Tensor& count) {
  constexpr const char* op = "fastrank::ranked_mean";
  TORCH_CHECK_VALUE(values.dim() == 1, op, ": values must be 1-D (Q,), got shape ", values.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble, op,
                   ": values must be float32 or float64, got ", values.scalar_type());
  TORCH_CHECK_VALUE(count.dim() == 1 && count.size(0) == values.size(0), op, ": count must be 1-D of length Q = ",
                    values.size(0), " like values, got shape ", count.sizes());
  TORCH_CHECK_TYPE(count.scalar_type() == at::kLong, op, ": count must be int64, got ", count.scalar_type());
  TORCH_CHECK_VALUE(count.device() == values.device(), op, ": values and count must be on one device, got ",
                    values.device(), " and ", count.device());
}

// CPU: one pass, summed in double whatever the dtype (deterministic, sequential order)
std::tuple<at::Tensor, at::Tensor> ranked_mean_cpu(const at::Tensor& values, const at::Tensor& count) {
  check_ranked_mean(values, count);
  const at::Tensor v = values.contiguous(), c = count.contiguous();
  const int64_t q = v.size(0);
  const int64_t* cp = c.data_ptr<int64_t>();
  double sum = 0.0;
  int64_t ranked = 0;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "ranked_mean", [&] {
    const scalar_t* vp = v.data_ptr<scalar_t>();
    for (int64_t i = 0; i < q; ++i) {
      sum += double(vp[i]);
      ranked += cp[i] > 0;
    }
  });
  const double n = double(ranked > 0 ? ranked : 1);
  const auto opts = v.options();
  return {at::scalar_tensor(sum / n, opts), at::scalar_tensor(n, opts)};
}

// Every other device (CUDA, Meta): the same rule in ATen ops, without a host synchronisation
std::tuple<at::Tensor, at::Tensor> ranked_mean_any(const at::Tensor& values, const at::Tensor& count) {
  check_ranked_mean(values, count);
  const at::Tensor n = count.gt(0).sum().clamp_min(1).to(values.scalar_type());
  return {values.sum() / n, n};
}

struct RankedMean : torch::autograd::Function<RankedMean> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& values,
                                                const at::Tensor& count) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastrank::ranked_mean", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();
    at::Tensor mean, n;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(mean, n) = op.call(values, count);
    }
    ctx->saved_data["q"] = values.size(0);
    ctx->save_for_backward({n});
    ctx->mark_non_differentiable({n});
    ctx->set_materialize_grads(false);
    return {mean, n};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    const at::Tensor n = ctx->get_saved_variables()[0];
    // a broadcast view: the loss op's backward multiplies its rows by it without a (Q,) copy
    return {(grads[0] / n).expand({ctx->saved_data["q"].toInt()}), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> ranked_mean_autograd(const at::Tensor& values, const at::Tensor& count) {
  auto out = RankedMean::apply(values, count);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrank, CPU, m) { m.impl("ranked_mean", &ranked_mean_cpu); }
TORCH_LIBRARY_IMPL(fastrank, CompositeExplicitAutograd, m) { m.impl("ranked_mean", &ranked_mean_any); }
TORCH_LIBRARY_IMPL(fastrank, Autograd, m) { m.impl("ranked_mean", &ranked_mean_autograd); }

}  // namespace fastrank
