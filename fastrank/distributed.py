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

from .core import validate as V

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
