"""Benchmark workloads (SPEC §4): seeded random embeddings with class structure.

Only `batch` exists so far; `xbm` and `dense` will follow the same pattern
(a ``make_*`` builder returning ``(scores, labels)`` plus a pair count).
"""
from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor


def make_batch(
    B: int, dim: int = 512, per_class: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Tuple[Tensor, Tensor]:
    """The `batch` workload: Q = N = B, ``per_class`` samples per class, query inside its gallery.

    Embeddings are standard-normal rows (drawn from a seeded ``torch.Generator``, so
    every process and every backend sees the same inputs) normalised to unit L2
    norm; ``scores = emb @ emb.T`` is the (B, B) cosine-similarity matrix, and
    ``labels = arange(B) // per_class``. The target to pass to the losses is
    ``(labels, labels)``.

    Returns:
        scores: (B, B) tensor of ``dtype`` (a leaf, without ``requires_grad``).
        labels: (B,) int64 class labels.
    """
    if B <= 0 or dim <= 0 or per_class <= 0:
        raise ValueError(f"make_batch: B, dim and per_class must be positive, got {B}, {dim}, {per_class}")
    gen = torch.Generator().manual_seed(seed)
    # draw in float32 whatever the target dtype, so that the inputs of a half-precision
    # run are the rounded float32 inputs rather than a different random draw
    emb = torch.randn(B, dim, generator=gen, dtype=torch.float32)
    emb = torch.nn.functional.normalize(emb, dim=1)
    scores = (emb @ emb.T).to(dtype).contiguous()
    labels = torch.arange(B, dtype=torch.int64) // per_class
    return scores, labels


def label_pairs(query_labels: Tensor, gallery_labels: Tensor) -> int:
    """Pair evaluations of one forward pass: sum over queries of |P_i| * N.

    Every ranked positive j of query i is compared with each of the N gallery items.
    Counted from label histograms, so no (Q, N) mask is built.
    """
    n = int(gallery_labels.numel())
    classes, counts = torch.unique(gallery_labels, return_counts=True)
    # positives of a query = gallery items sharing its label (0 for an unseen label)
    where = torch.searchsorted(classes, query_labels)
    where = where.clamp(max=max(classes.numel() - 1, 0))
    hit = classes[where] == query_labels
    n_pos = torch.where(hit, counts[where], torch.zeros_like(where))
    return int(n_pos.sum()) * n
