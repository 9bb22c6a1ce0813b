// Op schemas of fastrank, declared in one place. Kernels register against them
// per dispatch key (cpu/*.cpp: CPU, cuda/*.cpp: CUDA); the fused loss ops' autograd is
// loss_autograd.cpp; fake kernels and the family ops' autograd are registered from Python
// (fastrank/core/registry.py).
#include <Python.h>
#include <torch/library.h>

// `import fastrank._C` loads this library (and so runs the registrations below);
// the module itself is empty: everything is reached through torch.ops.fastrank.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastrank, m) {
  // rank_all[i, p], rank_pos[i, p] for the ranked positive in column pos_idx[i, p]
  // (-1 = hole: both outputs 0). step: 0 = sigmoid, 1 = suprank.
  m.def(
      "rank_sums_fwd(Tensor scores, Tensor pos_idx, Tensor? ignore_idx, Tensor? ignore_mask, int step, float tau, "
      "float rho, float delta, float start, float offset) -> (Tensor, Tensor)");
  // gradient of scores given the gradients of rank_all and rank_pos
  m.def(
      "rank_sums_bwd(Tensor grad_rank_all, Tensor grad_rank_pos, Tensor scores, Tensor pos_idx, Tensor? ignore_idx, "
      "Tensor? ignore_mask, int step, float tau, float rho, float delta, float start, float offset) -> Tensor");
  // soft histograms of histogram AP: h_all[i, l] over valid items, h_pos[i, l] over the
  // positives pos_idx[i, :]; bin coordinate v = scale * s + shift, bins at 0..bins-1
  m.def(
      "histogram_fwd(Tensor scores, Tensor pos_idx, Tensor? ignore_idx, Tensor? ignore_mask, int bins, float scale, "
      "float shift, bool open_ends) -> (Tensor, Tensor)");
  // graded relevance: the ranked items pos_idx[i, :] (relevance > 0, not ignored) against every
  // valid competitor k != j, with relevance (Q, N) >= 0 and the optional ordering key (Q, N; None:
  // the relevance) in the dtype of scores:
  //   rank_all = 1 + sum_k g,   g = sigmoid: sigma;  suprank: H if key_k >= key_j else H^-
  //   rank_pos = rel_j + sum_k min(rel_j, rel_k) h,  h = sigmoid: sigma;  suprank: H, or with hrank
  //              (HAPPIER's smoothed H-rank, suprank only) h+ (step.h) where key_k > key_j
  m.def(
      "graded_rank_sums_fwd(Tensor scores, Tensor relevance, Tensor? key, Tensor pos_idx, Tensor? ignore_idx, "
      "Tensor? ignore_mask, int step, float tau, float rho, float delta, float start, float offset, bool hrank, "
      "float beta, float gamma, float leak) -> (Tensor, Tensor)");
  // (the backward checks relevance's shape, dtype and device; its values were checked by the forward)
  m.def(
      "graded_rank_sums_bwd(Tensor grad_rank_all, Tensor grad_rank_pos, Tensor scores, Tensor relevance, "
      "Tensor? key, Tensor pos_idx, Tensor? ignore_idx, Tensor? ignore_mask, int step, float tau, float rho, "
      "float delta, float start, float offset, bool hrank, float beta, float gamma, float leak) -> Tensor");
  // fused AP loss (Smooth-AP step=0, SupAP step=1): per query its AP, its number of ranked
  // positives and, with_grad, the gradient row d AP_i / d scores[i, :] ((0, N) without), from
  // the target as given: query_labels (Q,) and gallery_labels (N,), or relevance (Q, N) > 0
  m.def(
      "ap_loss(Tensor scores, Tensor? query_labels, Tensor? gallery_labels, Tensor? relevance, Tensor? ignore_idx, "
      "Tensor? ignore_mask, int step, float tau, float rho, float delta, float start, float offset, bool with_grad) "
      "-> (Tensor, Tensor, Tensor)");
  // fused Recall@k (SupRank's; Patel et al.'s with clamp_hits), same target and outputs as ap_loss:
  // per query the mean over ks of sum_j sigmoid((k - rank_all_j) / temp) / min(|P_i|, k)
  m.def(
      "recall_loss(Tensor scores, Tensor? query_labels, Tensor? gallery_labels, Tensor? relevance, "
      "Tensor? ignore_idx, Tensor? ignore_mask, int step, float tau, float rho, float delta, float start, "
      "float offset, int[] ks, float temp, bool clamp_hits, bool with_grad) -> (Tensor, Tensor, Tensor)");
  // fused graded loss, kind 0 = H-AP, 1 = NDCG (fastrank.h_ap / fastrank.ndcg), same outputs as
  // ap_loss (n_pos: the valid items of relevance > 0), relevance (Q, N) >= 0 and key (Q, N) in the
  // dtype of scores, step and hrank as graded_rank_sums_fwd's
  m.def(
      "graded_loss(Tensor scores, Tensor relevance, Tensor? key, Tensor? ignore_idx, Tensor? ignore_mask, int step, "
      "float tau, float rho, float delta, float start, float offset, bool hrank, float beta, float gamma, "
      "float leak, int kind, bool with_grad) -> (Tensor, Tensor, Tensor)");
  // fused histogram AP (kind 0 = FastAP, 1 = SoftBin), same target and outputs as ap_loss; the bins
  // as histogram_fwd's: v = scale * s + shift on centres 0..bins-1
  m.def(
      "histogram_ap_loss(Tensor scores, Tensor? query_labels, Tensor? gallery_labels, Tensor? relevance, "
      "Tensor? ignore_idx, Tensor? ignore_mask, int bins, float scale, float shift, bool open_ends, int kind, "
      "bool with_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "histogram_bwd(Tensor grad_h_all, Tensor grad_h_pos, Tensor scores, Tensor pos_idx, Tensor? ignore_idx, "
      "Tensor? ignore_mask, int bins, float scale, float shift, bool open_ends) -> Tensor");
  // reduction="mean" of a fused loss op's scores: (sum(values) / n_ranked, n_ranked) with
  // n_ranked = max(1, #{count > 0}) in values' dtype (ranked_mean.cpp)
  m.def("ranked_mean(Tensor values, Tensor count) -> (Tensor, Tensor)");
  // the fused CPU loss ops' cached gradient-rows block (cpu/grad_rows.cpp): return it to the
  // system (its size in bytes, 0: none), or its size
  m.def("empty_cache() -> int");
  m.def("cached_grad_rows_bytes() -> int");
}
