"""Global ranking across data-parallel ranks.

Each rank ranks its local queries against the batch of all ranks (all-gathered), and the
gradient of every gathered row is routed back to the rank that owns it, so the gradients
summed over ranks equal those of single-process training on the concatenated batch
(DistributedDataParallel averages them, which matches a loss averaged over ranks):

    all_emb, all_labels, self_index = fastrank.distributed.gather_gallery(emb, labels)
    loss = SupAPLoss()(emb, labels, all_emb, all_labels, self_index=self_index)
    loss.backward()   # grads of emb include the other ranks' losses w.r.t. this rank's rows

Ranks may hold different batch sizes. Works with any process-group backend (tested with gloo on CPU).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from . import losses as L
from .ap import calibration_loss
from .core import validate as V
from .core.problem import dense_relevance, dense_valid_mask

Tensor = torch.Tensor


def _check_tensor(fn: str, name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: `{name}` must be a tensor, got {V._describe(x)}")
    V.check_storage(fn, f"`{name}`", x)


def _sizes(n: int, device, group) -> List[int]:
    world = dist.get_world_size(group)
    local = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    return [int(s.item()) for s in sizes]


def _gather_padded(x: Tensor, sizes: List[int], group) -> Tensor:
    """all_gather of tensors whose first dimension differs between ranks."""
    biggest = max(sizes)
    pad = x.new_zeros((biggest - x.shape[0],) + tuple(x.shape[1:]))
    padded = torch.cat([x, pad], 0).contiguous()
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)], 0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: List[int], rank: int, group) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # every rank's loss depends on every gathered row: sum the gradients over ranks, keep ours
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def all_gather_with_grad(x: Tensor, group: Optional[object] = None) -> Tensor:
    """Concatenation over ranks (rank order) of `x`, differentiable: gradients flow back to the owners."""
    _check_tensor("all_gather_with_grad", "x", x)
    if not (dist.is_available() and dist.is_initialized()):
        return x
    sizes = _sizes(x.shape[0], x.device, group)
    return _AllGatherWithGrad.apply(x, sizes, dist.get_rank(group), group)


def gather_gallery(
    embeddings: Tensor, labels: Tensor, group: Optional[object] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """(global embeddings with gradient routing, global labels, (B,) position of each local query in them).

    Without an initialised process group this is the identity: (embeddings, labels, arange(B)).
    """
    fn = "gather_gallery"
    _check_tensor(fn, "embeddings", embeddings)
    _check_tensor(fn, "labels", labels)
    if embeddings.dim() != 2:
        raise ValueError(f"{fn}: `embeddings` must be 2-D (batch, dim), got shape {tuple(embeddings.shape)}")
    b = embeddings.shape[0]
    if labels.shape != (b,):
        raise ValueError(f"gather_gallery: `labels` must have shape ({b},), got {tuple(labels.shape)}")
    if not (dist.is_available() and dist.is_initialized()):
        return embeddings, labels, torch.arange(b, device=embeddings.device)
    sizes = _sizes(b, embeddings.device, group)
    rank = dist.get_rank(group)
    all_emb = _AllGatherWithGrad.apply(embeddings, sizes, rank, group)
    all_labels = _gather_padded(labels, sizes, group)
    start = sum(sizes[:rank])
    return all_emb, all_labels, torch.arange(start, start + b, device=embeddings.device)


# ----------------------------------------------------------------------------- the global batch's loss


def _ranking_count(loss_fn, labels: Tensor, all_labels: Tensor) -> Tensor:
    """Local queries that count in the module's mean: those with a positive in the gathered gallery
    after the module's `include_self` (the query's own entry is a positive only for True)."""
    same = (labels.to(torch.int64).unsqueeze(1) == all_labels.to(torch.int64).unsqueeze(0)).sum(1)
    if loss_fn.include_self is not True:
        same = same - 1
    return (same > 0).sum()


def _calibration_parts(loss_fn, emb: Tensor, labels: Tensor, all_emb: Tensor, all_labels: Tensor,
                       self_index: Tensor, weight: float) -> List[Tuple[float, float, Tensor, Tensor]]:
    # calibration_loss averages its positive and its negative terms over their own non-zero counts:
    # two parts, each the functional evaluated with the other kind of pair left out

    scores, target, ignore = loss_fn._inputs(emb, labels, all_emb, all_labels, self_index)
    q, n = scores.shape
    valid = dense_valid_mask(q, n, ignore, None, scores.device)
    pos = dense_relevance(target, q, n)
    parts = []
    for kind, pairs in (("pos", valid & pos), ("neg", valid & ~pos)):
        mean = calibration_loss(scores, target, pos_margin=loss_fn.pos_margin, neg_margin=loss_fn.neg_margin,
                                ignore=~pairs)
        with torch.no_grad():  # the functional's own count: the pairs whose hinge term is non-zero
            terms = (torch.relu(loss_fn.pos_margin - scores) if kind == "pos"
                     else torch.relu(scores - loss_fn.neg_margin))
            count = ((terms > 0) & pairs).sum()
        parts.append((weight, 0.0, mean, count))
    return parts


def _loss_parts(fn: str, loss_fn, emb: Tensor, labels: Tensor, all_emb: Tensor, all_labels: Tensor,
                self_index: Tensor, weight: float = 1.0) -> List[Tuple[float, float, Tensor, Tensor]]:
    """The loss as sum_j weight_j * (bias_j + mean_j): each mean_j a mean over local items and its count."""

    if isinstance(loss_fn, L.ROADMAPLoss):
        return (_loss_parts(fn, loss_fn.sup_ap, emb, labels, all_emb, all_labels, self_index, weight * loss_fn.w_ap)
                + _calibration_parts(loss_fn.calibration, emb, labels, all_emb, all_labels, self_index,
                                     weight * loss_fn.w_calibration))
    if isinstance(loss_fn, L.CalibrationLoss):
        return _calibration_parts(loss_fn, emb, labels, all_emb, all_labels, self_index, weight)
    if isinstance(loss_fn, L._RankingLoss):
        # the module returns 1 - (mean score over the queries with a positive)
        loss = loss_fn(emb, labels, all_emb, all_labels, self_index=self_index)
        return [(weight, 1.0, loss - 1, _ranking_count(loss_fn, labels, all_labels))]
    raise TypeError(f"{fn}: `loss_fn` must be one of fastrank.losses' label-based modules (SmoothAPLoss, SupAPLoss, "
                    f"ROADMAPLoss, CalibrationLoss, RecallAtKLoss, FastAPLoss, SoftBinAPLoss), got "
                    f"{type(loss_fn).__name__}")


def global_batch_loss(loss_fn: torch.nn.Module, embeddings: Tensor, labels: Tensor,
                      group: Optional[object] = None) -> Tensor:
    """This rank's share of the loss of the global batch (every rank's queries against every rank's items).

    Each rank ranks its local queries against the gathered gallery (:func:`gather_gallery`); the
    means the loss takes (over the queries with a positive; for ROADMAP's calibration term, over
    its non-zero pair terms) are taken over the **global** counts, all-reduced, so the shares
    reproduce one process on the concatenated batch:

    * the mean of the shares over ranks is the one-process loss (all-reduce the detached share and
      divide by the world size to report it);
    * their gradients, averaged over ranks as DistributedDataParallel does, are the one-process gradient.

    The loss is ``sum_j w_j * (b_j + mean_j)`` (one part for the rank losses, ``1 - mean score``;
    ROADMAP adds its calibration term's positive and negative means). Rank r's share is
    ``sum_j w_j * (b_j + W * mean_j,r * n_j,r / N_j)`` with W ranks, mean_j,r the local mean over
    n_j,r items and N_j the global count: W times rank r's part of the global sum, because DDP
    divides the summed gradients by W. (A plain per-rank mean would weight the queries of a rank
    with fewer valid queries more heavily than one process does.)

    Without an initialised process group it is ``loss_fn(embeddings, labels)``.

    Args:
        loss_fn: a label-based module of :mod:`fastrank.losses` (SmoothAPLoss, SupAPLoss,
            ROADMAPLoss, CalibrationLoss, RecallAtKLoss, FastAPLoss, SoftBinAPLoss); its
            `include_self` applies to each query's own entry in the gathered gallery.
        embeddings: (B, D) this rank's embeddings (B may differ between ranks).
        labels: (B,) their integer labels.
        group: the process group (default: the world).

    Communication per call: the all-gather of the (N, D) embeddings and N labels of
    :func:`gather_gallery`, one all-reduce of a few counts, and in backward one all-reduce of
    the (N, D) embedding gradient; never a score matrix (each rank holds its (B, N) scores).
    """
    fn = "global_batch_loss"

    if not isinstance(loss_fn, (L.ROADMAPLoss, L._RankingLoss)):
        raise TypeError(f"{fn}: `loss_fn` must be one of fastrank.losses' label-based modules (SmoothAPLoss, "
                        f"SupAPLoss, ROADMAPLoss, CalibrationLoss, RecallAtKLoss, FastAPLoss, SoftBinAPLoss), got "
                        f"{type(loss_fn).__name__ if isinstance(loss_fn, torch.nn.Module) else V._describe(loss_fn)}")
    if not (dist.is_available() and dist.is_initialized()):
        return loss_fn(embeddings, labels)
    all_emb, all_labels, self_index = gather_gallery(embeddings, labels, group)
    parts = _loss_parts(fn, loss_fn, embeddings, labels, all_emb, all_labels, self_index)
    local = torch.stack([c.to(torch.int64) for _, _, _, c in parts])
    total = local.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    world = dist.get_world_size(group)
    share = embeddings.new_zeros(())
    for (w, bias, mean, _), n, big_n in zip(parts, local.tolist(), total.tolist()):
        share = share + w * (bias + mean * (world * n / max(big_n, 1)))
    return share

