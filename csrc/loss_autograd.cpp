// Autograd of the fused loss ops (schemas in fastrank.cpp), registered in C++ for every
// device: a loss op returns (score (Q,), count (Q,), gradient rows (Q, N) or (0, N)), and
// since query i's score depends on row i of scores alone, d L / d scores is
// grad_score[:, None] * rows -- exact, no recomputation (docs/design.md §2.4).
//
// Why C++ and not torch.library.register_autograd: the Python autograd wrapper costs about
// 150 us per call on this project's CPU machines (argument defaults filled and the op
// redispatched in Python), as much as the whole kernel at B = 256. Here the autograd kernel
// redispatches below autograd in C++. The fake kernels stay in Python (fastrank/core/registry.py);
// torch.compile traces this kernel's forward and backward like any composite of ops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace fastrank {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The first derivative the loss op computed, tied to the tensors it depends on, so that
// differentiating it again raises instead of giving the zeros autograd would make of a
// gradient it sees as constant (as fastrank/core/registry.py's _FusedGradient does for the
// family ops).
struct RefuseSecondDerivative : torch::autograd::Function<RefuseSecondDerivative> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const std::string& message,
                            const at::Tensor& scores, const at::Tensor& grad_score) {
    ctx->saved_data["message"] = message;
    return grad.clone();
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, ctx->saved_data["message"].toStringRef());
  }
};

// A tensor that torch.compile / opcheck traces (fake or functional): its graph must stay
// functional, so the backward does not scale the rows in place there.
inline bool traced(const at::Tensor& t) {
  return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

struct LossFunction : torch::autograd::Function<LossFunction> {
  // `rest`: the op's arguments after scores, as the dispatcher boxed them
  static variable_list forward(AutogradContext* ctx, const at::Tensor& scores, const c10::OperatorHandle* op,
                               std::vector<c10::IValue> rest) {
    const bool with_grad = rest.back().toBool();
    torch::jit::Stack stack;
    stack.reserve(rest.size() + 1);
    stack.emplace_back(scores);
    for (auto& v : rest) stack.emplace_back(std::move(v));
    {
      at::AutoDispatchBelowADInplaceOrView below;
      op->callBoxed(stack);
    }
    at::Tensor value = stack[0].toTensor(), count = stack[1].toTensor(), rows = stack[2].toTensor();
    ctx->saved_data["with_grad"] = with_grad;
    ctx->saved_data["name"] = op->schema().name();
    ctx->save_for_backward({scores});
    // not a SavedVariable: backward drops its reference (below), so that the scaled rows it
    // returns are the gradient's only owner and AccumulateGrad takes them without a copy.
    // No cycle: rows is non-differentiable (no grad_fn back to this node).
    ctx->saved_data["rows"] = rows;
    // the caller gets an alias: once it is dropped, the storage's use count tells backward that
    // the saved tensor is the rows' only owner
    at::Tensor shown = rows.alias();
    ctx->mark_non_differentiable({count, shown});
    // the count's and the rows' incoming gradients are never used: without this autograd
    // would fill a zero (Q, N) tensor for the rows' on every backward
    ctx->set_materialize_grads(false);
    return {value, count, shown};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::string name = ctx->saved_data["name"].toStringRef();
    TORCH_CHECK(ctx->saved_data["with_grad"].toBool(), name,
                " ran with with_grad=False: it has no gradient rows to differentiate; call it with with_grad=True "
                "when scores require grad");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& scores = saved[0];
    at::Tensor rows = ctx->saved_data["rows"].toTensor();
    at::Tensor grad;
    if (grads[0].defined()) {
      const at::Tensor& gs = grads[0];
      if (!at::GradMode::is_enabled() && !torch::autograd::get_current_graph_task_keep_graph() && !traced(rows) &&
          !traced(gs)) {
        // the graph is freed after this backward: the rows become the gradient, in place, so
        // the loss's extra memory stays one (Q, N) tensor (docs/design.md §2.4) -- unless the
        // caller of the op kept its third output (the public functions drop it), which must
        // not change under their feet: then the storage has another owner
        ctx->saved_data.erase("rows");
        if (rows.storage().use_count() == 1) {
          rows.mul_(gs.unsqueeze(1));
          grad = std::move(rows);
        } else {
          grad = gs.unsqueeze(1) * rows;
        }
      } else if (!at::GradMode::is_enabled()) {  // retain_graph=True: the rows serve again
        grad = gs.unsqueeze(1) * rows;
      } else {  // create_graph=True: a second derivative must not be silently 0
        {
          at::NoGradGuard no_grad;
          grad = gs.unsqueeze(1) * rows;
        }
        const std::string backend = scores.is_cuda() ? "cuda" : "cpp";
        grad = RefuseSecondDerivative::apply(
            grad,
            "fastrank: " + name + " on backend '" + backend +
                "' has no second derivative (create_graph=True, torch.autograd.functional.hessian/hvp/vhp): its "
                "gradient is a fused backward kernel, not a PyTorch graph. Use backend='naive' (autograd through "
                "the Q x N x N cube) for higher-order or forward-mode derivatives.",
            scores, gs);
      }
    }
    return {grad, at::Tensor(), at::Tensor()};
  }
};

void loss_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const size_t n = op.schema().arguments().size();
  std::vector<c10::IValue> rest(std::make_move_iterator(stack->end() - int64_t(n) + 1),
                                std::make_move_iterator(stack->end()));
  const at::Tensor scores = (stack->end() - int64_t(n))->toTensor();
  torch::jit::drop(*stack, n);
  variable_list out = LossFunction::apply(scores, &op, std::move(rest));
  for (auto& t : out) stack->emplace_back(std::move(t));
}

}  // namespace

// every fused loss op of fastrank.cpp; one line each
TORCH_LIBRARY_IMPL(fastrank, Autograd, m) {
  m.impl("ap_loss", torch::CppFunction::makeFromBoxedFunction<&loss_autograd>());
  m.impl("recall_loss", torch::CppFunction::makeFromBoxedFunction<&loss_autograd>());
  m.impl("graded_loss", torch::CppFunction::makeFromBoxedFunction<&loss_autograd>());
  m.impl("histogram_ap_loss", torch::CppFunction::makeFromBoxedFunction<&loss_autograd>());
}

}  // namespace fastrank
