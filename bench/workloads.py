"""Benchmark workloads (docs/design.md §4): seeded random embeddings with class structure, dim 512.

    batch  Q = N = B, 4 samples per class, the query inside its gallery (x = B)
    xbm    Q = 256 queries against a cross-batch memory of N items, ~5 per class; every
           query's class is one of the memory's classes (x = N, 16k-64k in the sweeps)
    dense  Q = N = B, 8 classes, so |P| = B / 8: the compute-bound stress (x = B)

`build(workload, x)` returns a `Workload`: the (Q, N) score matrix, the label target
``(qlab, glab)`` and ``self_index``, the column of each query's own copy in the gallery
(``arange(Q)`` for batch and dense, None for xbm, whose queries are not in the memory),
which the ops that leave the query out of its own gallery (FastAP) pass as ``ignore``.
Labels are cheap to build alone (`labels`), so the driver counts a point's pairs
without building its scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

WORKLOADS = ("batch", "xbm", "dense")
DIM = 512
BATCH_PER_CLASS = 4
XBM_QUERIES = 256
XBM_PER_CLASS = 5
DENSE_CLASSES = 8

# what the size x means, for table headers and plot axes
X_LABEL = {
    "batch": "B (Q = N = B, 4 per class)",
    "xbm": f"N (memory; Q = {XBM_QUERIES}, ~{XBM_PER_CLASS} per class)",
    "dense": f"B (Q = N = B, {DENSE_CLASSES} classes, |P| = B/{DENSE_CLASSES})",
}


@dataclass
class Workload:
    name: str
    x: int
    scores: Tensor  # (Q, N), a leaf without requires_grad
    qlab: Tensor  # (Q,) int64
    glab: Tensor  # (N,) int64
    self_index: Optional[Tensor]  # (Q,) int64 column of the query itself, or None

    @property
    def target(self) -> Tuple[Tensor, Tensor]:
        return self.qlab, self.glab

    @property
    def shape(self) -> Tuple[int, int]:
        return int(self.scores.shape[0]), int(self.scores.shape[1])

    @property
    def hierarchy(self) -> Tuple[Tensor, Tensor]:
        """Two-level labels (super-class, class) for the graded ops, see `hierarchy`."""
        return hierarchy(self.qlab), hierarchy(self.glab)


def _check(name: str, **sizes: int) -> None:
    for k, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name}: {k} must be a positive integer, got {v!r}")


def _embeddings(n: int, dim: int, gen: torch.Generator) -> Tensor:
    # drawn in float32 on the CPU whatever the device and dtype, so that every process,
    # backend and device sees the same inputs
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float32), dim=1)


def _scores(q_emb: Tensor, g_emb: Tensor, dtype: torch.dtype, device) -> Tensor:
    # the (Q, N) product is formed on the target device: a 32k x 32k matrix takes
    # seconds on a GPU and minutes on the CPU
    q_emb, g_emb = q_emb.to(device), g_emb.to(device)
    return (q_emb @ g_emb.T).to(dtype).contiguous()


def make_batch(
    B: int, dim: int = DIM, per_class: int = BATCH_PER_CLASS, seed: int = 0,
    dtype: torch.dtype = torch.float32, device="cpu",
) -> Tuple[Tensor, Tensor]:
    """The `batch` workload: Q = N = B, ``per_class`` samples per class, query inside its gallery.

    Embeddings are standard-normal rows (from a seeded ``torch.Generator``) normalised
    to unit L2 norm; ``scores = emb @ emb.T`` is the (B, B) cosine-similarity matrix and
    ``labels = arange(B) // per_class``. The target to pass to the losses is
    ``(labels, labels)``.

    Returns:
        scores: (B, B) tensor of ``dtype`` on ``device`` (a leaf, without ``requires_grad``).
        labels: (B,) int64 class labels on ``device``.
    """
    _check("make_batch", B=B, dim=dim, per_class=per_class)
    emb = _embeddings(B, dim, torch.Generator().manual_seed(seed))
    scores = _scores(emb, emb, dtype, device)
    return scores, batch_labels(B, per_class).to(device)


def batch_labels(B: int, per_class: int = BATCH_PER_CLASS) -> Tensor:
    return torch.arange(B, dtype=torch.int64) // per_class


def dense_labels(B: int, classes: int = DENSE_CLASSES) -> Tensor:
    """``arange(B) % classes``: every class has B / classes members (B a multiple of classes)."""
    return torch.arange(B, dtype=torch.int64) % classes


def make_dense(
    B: int, dim: int = DIM, classes: int = DENSE_CLASSES, seed: int = 0,
    dtype: torch.dtype = torch.float32, device="cpu",
) -> Tuple[Tensor, Tensor]:
    """The `dense` workload: Q = N = B, ``classes`` classes (|P| = B / classes), query in its gallery.

    Same embeddings as `make_batch` (seeded), labels ``arange(B) % classes``: with
    |P| = B/8 the rank ops do B^3/8 pair evaluations, the compute-bound end of docs/design.md §4.
    """
    _check("make_dense", B=B, dim=dim, classes=classes)
    emb = _embeddings(B, dim, torch.Generator().manual_seed(seed))
    return _scores(emb, emb, dtype, device), dense_labels(B, classes).to(device)


def xbm_labels(
    N: int, Q: int = XBM_QUERIES, per_class: int = XBM_PER_CLASS, seed: int = 0
) -> Tuple[Tensor, Tensor]:
    """(qlab, glab) of the `xbm` workload.

    The memory holds ``ceil(N / per_class)`` classes of ``per_class`` items (the last one
    possibly smaller), shuffled by a seeded permutation as a FIFO of past batches would
    be; the Q queries take distinct memory classes (drawn without replacement when there
    are at least Q classes, else cycled), so every query has ~per_class positives.
    """
    _check("xbm_labels", N=N, Q=Q, per_class=per_class)
    gen = torch.Generator().manual_seed(seed + 1)
    n_classes = -(-N // per_class)
    glab = (torch.arange(N, dtype=torch.int64) // per_class)[torch.randperm(N, generator=gen)]
    # only full classes as query classes, so that every query has exactly per_class positives
    full = N // per_class if N >= per_class else n_classes
    pick = torch.randperm(full, generator=gen)
    qlab = pick[torch.arange(Q) % full].to(torch.int64)
    return qlab, glab


def make_xbm(
    N: int, Q: int = XBM_QUERIES, dim: int = DIM, per_class: int = XBM_PER_CLASS, seed: int = 0,
    dtype: torch.dtype = torch.float32, device="cpu",
) -> Tuple[Tensor, Tensor, Tensor]:
    """The `xbm` workload (Wang et al., CVPR 2020): Q queries of the current batch against a
    memory of N past embeddings, ~per_class items per class.

    The queries are fresh embeddings, not copies of memory items (the memory holds past
    batches), so no column is the query itself. Returns (scores (Q, N), qlab (Q,), glab (N,)).
    """
    _check("make_xbm", N=N, Q=Q, dim=dim, per_class=per_class)
    gen = torch.Generator().manual_seed(seed)
    q_emb = _embeddings(Q, dim, gen)
    g_emb = _embeddings(N, dim, gen)
    qlab, glab = xbm_labels(N, Q, per_class, seed)
    return _scores(q_emb, g_emb, dtype, device), qlab.to(device), glab.to(device)


def labels(workload: str, x: int) -> Tuple[Tensor, Tensor, bool]:
    """(qlab, glab, query_in_gallery) of a workload point, on the CPU, without its scores."""
    if workload == "batch":
        lab = batch_labels(x)
        return lab, lab, True
    if workload == "dense":
        lab = dense_labels(x)
        return lab, lab, True
    if workload == "xbm":
        qlab, glab = xbm_labels(x)
        return qlab, glab, False
    raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")


def shape(workload: str, x: int) -> Tuple[int, int]:
    """(Q, N) of a workload point."""
    if workload in ("batch", "dense"):
        return x, x
    if workload == "xbm":
        return XBM_QUERIES, x
    raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")


def build(workload: str, x: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> Workload:
    """The inputs of one benchmark point, on ``device``."""
    if workload == "batch":
        scores, lab = make_batch(x, seed=seed, dtype=dtype, device=device)
        qlab = glab = lab
    elif workload == "dense":
        scores, lab = make_dense(x, seed=seed, dtype=dtype, device=device)
        qlab = glab = lab
    elif workload == "xbm":
        scores, qlab, glab = make_xbm(x, seed=seed, dtype=dtype, device=device)
    else:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    q = scores.shape[0]
    self_index = torch.arange(q, device=scores.device) if workload != "xbm" else None
    return Workload(workload, x, scores, qlab, glab, self_index)


def positives_per_query(query_labels: Tensor, gallery_labels: Tensor) -> Tensor:
    """(Q,) number of gallery items sharing each query's label (0 for an unseen label)."""
    query_labels = query_labels.cpu()
    gallery_labels = gallery_labels.cpu()
    classes, counts = torch.unique(gallery_labels, return_counts=True)
    if classes.numel() == 0:
        return torch.zeros_like(query_labels)
    where = torch.searchsorted(classes, query_labels).clamp(max=classes.numel() - 1)
    hit = classes[where] == query_labels
    return torch.where(hit, counts[where], torch.zeros_like(where))


def label_pairs(query_labels: Tensor, gallery_labels: Tensor) -> int:
    """Pair evaluations of one forward pass of a rank op: sum over queries of |P_i| * N.

    Every ranked positive j of query i is compared with each of the N gallery items.
    Counted from label histograms, so no (Q, N) mask is built. (The query's own column
    counts as a positive here, as it does for the rank ops called without ``ignore``.)
    """
    n = int(gallery_labels.numel())
    return int(positives_per_query(query_labels, gallery_labels).sum()) * n


#: classes per super-class in the graded ops' two-level hierarchy
GRADED_FANOUT = 4


def hierarchy(labels: Tensor) -> Tensor:
    """(n, 2) hierarchical labels (super-class = label // GRADED_FANOUT, class = label).

    With relevance = shared levels from the coarsest (fastrank.relevance_from_hierarchy),
    same class is 2, same super-class 1, else 0: the ranked items of a query are its
    super-class, ~GRADED_FANOUT times the positives of the binary ops.
    """
    return torch.stack([labels // GRADED_FANOUT, labels], dim=1)


def graded_pairs(query_labels: Tensor, gallery_labels: Tensor) -> int:
    """Pair evaluations of one forward pass of a graded op: sum over queries of |ranked_i| * N,
    the ranked items being the query's super-class."""
    return label_pairs(query_labels // GRADED_FANOUT, gallery_labels // GRADED_FANOUT)


def label_items(query_labels: Tensor, gallery_labels: Tensor, ignore_self: bool = False) -> int:
    """Scored items of one forward pass of a histogram op: Q * N, less the left-out self columns.

    Each (query, gallery item) score is binned once (into at most two adjacent bins),
    so a histogram op does O(Q * N) work, whatever |P|.
    """
    q, n = int(query_labels.numel()), int(gallery_labels.numel())
    return q * n - (min(q, n) if ignore_self else 0)
