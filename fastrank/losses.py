"""nn.Module losses: ``loss = module(embeddings, labels[, ref_embeddings, ref_labels])``.

Every module returns a scalar ``1 - mean score`` (lower is better) for the queries
`embeddings` against the gallery `ref_embeddings` (default: the batch itself).
Similarity is the dot product of L2-normalised embeddings (``similarity="cosine"``)
unless ``similarity="dot"`` or a callable ``(queries, gallery) -> (Q, N) scores``.

The query's own entry, when the gallery is the batch itself (no ref_embeddings), follows
`include_self`, whose default reproduces the paper the loss comes from:

* ``True``          the query is its own positive and a competitor (Smooth-AP, ROADMAP, SupRank)
* ``"competitor"``  it competes but is not ranked as a positive (Patel et al.'s Recall@k)
* ``False``         it is left out entirely (FastAP, SoftBin)

With a separate gallery (ref_embeddings given) that contains the queries (cross-batch
memory, a gathered global batch), pass `self_index` (each query's position in it) and
`include_self` applies the same way; without it nothing is left out.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .core import validate as V
from .core.backend import CHOICES
from .core.params import make_graded_params
from .ap import calibration_loss, smooth_ap, sup_ap
from .graded import h_ap, ndcg
from .histogram import histogram_ap
from .pnp import check_pnp_args, pnp
from .recall import recall_at_k

Tensor = torch.Tensor
Similarity = Union[str, Callable[[Tensor, Tensor], Tensor]]
SelfMode = Union[bool, str]


def _check_embeddings(fn: str, name: str, x, like: Optional[Tensor] = None) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{fn}: `{name}` must be a 2-D floating tensor (batch, dim), got {V._describe(x)}")
    V.check_storage(fn, f"`{name}`", x)
    if like is None:
        if x.dim() != 2:
            raise ValueError(f"{fn}: `{name}` must be 2-D (batch, dim), got shape {tuple(x.shape)}")
        return
    if x.dim() != 2 or x.shape[1] != like.shape[1]:
        raise ValueError(f"{fn}: `{name}` must be (N, {like.shape[1]}) like `embeddings`, got shape {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{fn}: `{name}` is on {x.device} but `embeddings` is on {like.device}")


def _check_labels(fn: str, name: str, labels, emb: Tensor) -> Tensor:
    """Integer labels, one per row of `emb`, on its device; returned as int64 (torch cannot compare
    uint16/32/64 with other integer dtypes)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{fn}: `{name}` must be a 1-D integer tensor, got {V._describe(labels)}")
    V.check_storage(fn, f"`{name}`", labels)
    if labels.dtype not in V.LABEL_DTYPES:
        raise TypeError(f"{fn}: `{name}` must be an integer tensor ({V._dtype_names(V.LABEL_DTYPES)}), "
                        f"got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != emb.shape[0]:
        raise ValueError(f"{fn}: `{name}` must be a 1-D tensor of length {emb.shape[0]} (one per embedding), "
                         f"got shape {tuple(labels.shape)}")
    if labels.device != emb.device:
        raise ValueError(f"{fn}: `{name}` is on {labels.device} but the embeddings are on {emb.device}")
    return labels.to(torch.int64)


def _check_self_index(fn: str, self_index, labels: Tensor, n: int) -> Tensor:
    if not isinstance(self_index, Tensor):
        raise TypeError(f"{fn}: `self_index` must be None or a 1-D integer tensor (the gallery position of "
                        f"each query, -1 = absent), got {V._describe(self_index)}")
    V.check_storage(fn, "`self_index`", self_index)
    if self_index.dtype not in V.LABEL_DTYPES:
        raise TypeError(f"{fn}: `self_index` must be an integer tensor, got {self_index.dtype}")
    if self_index.shape != labels.shape:
        raise ValueError(f"{fn}: `self_index` must have shape {tuple(labels.shape)} (the gallery position of "
                         f"each query, -1 = absent), got {tuple(self_index.shape)}")
    if self_index.device != labels.device:
        raise ValueError(f"{fn}: `self_index` is on {self_index.device} but `labels` is on {labels.device}")
    self_index = self_index.to(torch.int64)
    if self_index.numel():
        lo, hi = (int(v) for v in torch.aminmax(self_index))
        if lo < -1 or hi >= n:
            raise ValueError(f"{fn}: `self_index` values must lie in [-1, {n - 1}] (-1 = absent; the gallery "
                             f"has {n} items), got values in [{lo}, {hi}]")
    return self_index


def _similarity_scores(fn: str, similarity: Similarity, q: Tensor, g: Tensor) -> Tensor:
    if callable(similarity):
        scores = similarity(q, g)
        shape = (q.shape[0], g.shape[0])
        if not isinstance(scores, Tensor):
            raise TypeError(f"{fn}: `similarity` must return a {shape} tensor of scores, got {V._describe(scores)}")
        if tuple(scores.shape) != shape:
            raise ValueError(f"{fn}: `similarity` must return a {shape} tensor of scores (queries x gallery), "
                             f"got shape {tuple(scores.shape)}")
        return scores
    if similarity == "cosine":
        q, g = F.normalize(q, dim=-1), F.normalize(g, dim=-1)
    return q @ g.transpose(0, 1)


class _RankingLoss(nn.Module):
    """Shared plumbing: similarity, gallery, labels -> (scores, target, ignore)."""

    _self_default: SelfMode = True

    def __init__(self, *, similarity: Similarity = "cosine", include_self: Optional[SelfMode] = None,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        name = type(self).__name__
        if not callable(similarity):
            V.check_choice(name, "similarity", similarity, ("cosine", "dot"))
        if include_self is None:
            include_self = self._self_default
        V.check_backend(name, backend, CHOICES)
        self.similarity = similarity
        self.include_self = V.check_self_mode(name, include_self)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"similarity={self.similarity!r}, include_self={self.include_self!r}, backend={self.backend!r}"

    def _scores(self, q: Tensor, g: Tensor) -> Tensor:
        return _similarity_scores(type(self).__name__, self.similarity, q, g)

    def _inputs(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Optional[Tensor],
                ref_labels: Optional[Tensor], self_index: Optional[Tensor] = None
                ) -> Tuple[Tensor, object, Optional[Tensor]]:
        # the module's own arguments are checked here, under its names: the functional would
        # report them as `scores`/`target`, which the caller never passed
        name = type(self).__name__
        mode = V.check_self_mode(name, self.include_self)  # the attribute may have been reassigned
        _check_embeddings(name, "embeddings", embeddings)
        labels = _check_labels(name, "labels", labels, embeddings)
        if (ref_embeddings is None) != (ref_labels is None):
            raise ValueError(f"{name}: pass `ref_embeddings` and `ref_labels` together")
        if ref_embeddings is None:
            scores = self._scores(embeddings, embeddings)
            q = embeddings.shape[0]
            if mode is True:
                return scores, (labels, labels), None
            if mode is False:
                return scores, (labels, labels), torch.arange(q, device=embeddings.device)
            # competitor only: the query is a negative of itself
            eye = torch.eye(q, dtype=torch.bool, device=embeddings.device)
            return scores, (labels.unsqueeze(1) == labels.unsqueeze(0)) & ~eye, None
        _check_embeddings(name, "ref_embeddings", ref_embeddings, like=embeddings)
        ref_labels = _check_labels(name, "ref_labels", ref_labels, ref_embeddings)
        if self_index is not None:
            self_index = _check_self_index(name, self_index, labels, ref_embeddings.shape[0])
        scores = self._scores(embeddings, ref_embeddings)
        if self_index is None or mode is True:
            return scores, (labels, ref_labels), None
        if mode is False:
            return scores, (labels, ref_labels), self_index
        target = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
        rows = torch.nonzero(self_index >= 0).squeeze(1)
        target[rows, self_index[rows]] = False
        return scores, target, None

    def score(self, scores: Tensor, target, ignore: Optional[Tensor]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, self_index: Optional[Tensor] = None) -> Tensor:
        """Args:
            embeddings: (Q, D) queries; labels: (Q,) integer labels.
            ref_embeddings, ref_labels: the gallery (default: the batch itself).
            self_index: with a gallery that contains the queries (cross-batch memory, a gathered
                global batch), the (Q,) position of each query in it (-1 = absent), so that
                `include_self` applies; ignored for in-batch galleries.
        """
        scores, target, ignore = self._inputs(embeddings, labels, ref_embeddings, ref_labels, self_index)
        return 1 - self.score(scores, target, ignore)


class SmoothAPLoss(_RankingLoss):
    """1 - Smooth-AP (Brown et al., ECCV 2020). See :func:`fastrank.smooth_ap`.

    >>> loss = SmoothAPLoss()(embeddings, labels)
    """

    def __init__(self, tau: float = 0.01, **kw) -> None:
        super().__init__(**kw)
        self.tau = tau

    def score(self, scores, target, ignore):
        return smooth_ap(scores, target, tau=self.tau, ignore=ignore, backend=self.backend)


class SupAPLoss(_RankingLoss):
    """1 - SupAP (ROADMAP, Ramzi et al., NeurIPS 2021). See :func:`fastrank.sup_ap`.

    >>> loss = SupAPLoss()(embeddings, labels)
    """

    def __init__(self, tau: float = 0.01, rho: float = 100.0, delta: float = 0.05, start: float = 0.5,
                 offset: Optional[float] = None, **kw) -> None:
        super().__init__(**kw)
        self.tau, self.rho, self.delta, self.start, self.offset = tau, rho, delta, start, offset

    def score(self, scores, target, ignore):
        return sup_ap(scores, target, tau=self.tau, rho=self.rho, delta=self.delta, start=self.start,
                      offset=self.offset, ignore=ignore, backend=self.backend)


class CalibrationLoss(_RankingLoss):
    """ROADMAP's calibration term (not 1 - score: the term itself). Self pairs are excluded
    by default (include_self=False), as in ROADMAP. See :func:`fastrank.calibration_loss`."""

    _self_default = False

    def __init__(self, pos_margin: float = 0.9, neg_margin: float = 0.6, **kw) -> None:
        super().__init__(**kw)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def score(self, scores, target, ignore):
        return calibration_loss(scores, target, pos_margin=self.pos_margin, neg_margin=self.neg_margin, ignore=ignore)

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, self_index=None):
        scores, target, ignore = self._inputs(embeddings, labels, ref_embeddings, ref_labels, self_index)
        return self.score(scores, target, ignore)


class ROADMAPLoss(nn.Module):
    """ROADMAP (Ramzi et al., NeurIPS 2021): ``w_ap * (1 - SupAP) + w_calibration * calibration``.

    Defaults (1, 1) are the ROADMAP repository's; SupRank uses (0.9, 0.1). SupAP counts the
    query in its own gallery (as published); the calibration term excludes self pairs.

    >>> loss = ROADMAPLoss()(embeddings, labels)
    """

    def __init__(self, w_ap: float = 1.0, w_calibration: float = 1.0, *, tau: float = 0.01, rho: float = 100.0,
                 delta: float = 0.05, start: float = 0.5, offset: Optional[float] = None, pos_margin: float = 0.9,
                 neg_margin: float = 0.6, similarity: Similarity = "cosine", backend: Optional[str] = None) -> None:
        super().__init__()
        self.w_ap = V.check_finite_number("ROADMAPLoss", "w_ap", w_ap)
        self.w_calibration = V.check_finite_number("ROADMAPLoss", "w_calibration", w_calibration)
        self.sup_ap = SupAPLoss(tau=tau, rho=rho, delta=delta, start=start, offset=offset, similarity=similarity,
                                backend=backend)
        self.calibration = CalibrationLoss(pos_margin=pos_margin, neg_margin=neg_margin, similarity=similarity)

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, self_index=None):
        return self.w_ap * self.sup_ap(embeddings, labels, ref_embeddings, ref_labels, self_index) + \
            self.w_calibration * self.calibration(embeddings, labels, ref_embeddings, ref_labels, self_index)


class RecallAtKLoss(_RankingLoss):
    """1 - smooth Recall@k. variant="suprank" (default; query counted, include_self=True) or
    "patel" (pass include_self="competitor" to reproduce Patel et al.). See :func:`fastrank.recall_at_k`."""

    def __init__(self, ks: Sequence[int] = (1, 2, 4, 8, 16), tau: float = 0.01, temp: float = 1.0,
                 variant: str = "suprank", step: Optional[str] = None, rho: float = 100.0, delta: float = 0.05,
                 start: float = 0.5, offset: Optional[float] = None, **kw) -> None:
        V.check_choice(type(self).__name__, "variant", variant, ("suprank", "patel"))
        if "include_self" not in kw and variant == "patel":
            kw["include_self"] = "competitor"
        super().__init__(**kw)
        self.ks = V.check_ks(type(self).__name__, ks)
        self.tau, self.temp, self.variant, self.step = tau, temp, variant, step
        # the suprank step's parameters (used when the ranking step is "suprank")
        self.rho, self.delta, self.start, self.offset = rho, delta, start, offset

    def score(self, scores, target, ignore):
        return recall_at_k(scores, target, ks=self.ks, tau=self.tau, temp=self.temp, variant=self.variant,
                           step=self.step, rho=self.rho, delta=self.delta, start=self.start, offset=self.offset,
                           ignore=ignore, backend=self.backend)


class FastAPLoss(_RankingLoss):
    """1 - FastAP (Cakir et al., CVPR 2019); the query is left out of its gallery by default.
    See :func:`fastrank.histogram_ap`."""

    _self_default = False

    def __init__(self, bins: int = 10, **kw) -> None:
        super().__init__(**kw)
        self.bins = V.check_integer(type(self).__name__, "bins", bins, 2)

    def score(self, scores, target, ignore):
        return histogram_ap(scores, target, bins=self.bins, kind="fastap", ignore=ignore, backend=self.backend)


class SoftBinAPLoss(_RankingLoss):
    """1 - listwise AP with soft bins (Revaud et al., ICCV 2019); the query is left out by default.
    See :func:`fastrank.histogram_ap`."""

    _self_default = False

    def __init__(self, bins: int = 25, range: Tuple[float, float] = (0.0, 1.0), **kw) -> None:  # noqa: A002
        super().__init__(**kw)
        self.bins = V.check_integer(type(self).__name__, "bins", bins, 2)
        self.range = V.check_range(type(self).__name__, "range", range)

    def score(self, scores, target, ignore):
        return histogram_ap(scores, target, bins=self.bins, kind="softbin", range=self.range, ignore=ignore,
                            backend=self.backend)


class _GradedLoss(nn.Module):
    """Shared plumbing of the graded losses: (embeddings, relevance) -> 1 - score.

    Relevance is a (Q, N) tensor (>= 0, 0 = irrelevant), e.g. from
    :func:`fastrank.relevance_from_hierarchy`; the gallery is `ref_embeddings` or the batch
    itself (then the query's own entry counts, as in SupRank/HAPPIER, unless `include_self=False`).
    """

    def __init__(self, *, step: str = "suprank", tau: float = 0.01, rho: float = 100.0, delta: float = 0.05,
                 start: float = 0.5, offset: Optional[float] = None, similarity: Similarity = "cosine",
                 include_self: bool = True, backend: Optional[str] = None) -> None:
        super().__init__()
        name = type(self).__name__
        if not callable(similarity):
            V.check_choice(name, "similarity", similarity, ("cosine", "dot"))
        include_self = V.check_self_mode(name, include_self, (True, False))
        self.similarity, self.include_self, self.backend = similarity, include_self, backend
        self.kw = dict(step=step, tau=tau, rho=rho, delta=delta, start=start, offset=offset)

    def forward(self, embeddings: Tensor, relevance: Tensor, ref_embeddings: Optional[Tensor] = None,
                key: Optional[Tensor] = None) -> Tensor:
        """1 - the score of `embeddings` against `ref_embeddings` (or the batch); `key`: the
        (Q, N) ordering key of the steps (e.g. the shared hierarchy levels, as HAPPIER), None =
        the relevance (see :func:`fastrank.h_ap`)."""
        name = type(self).__name__
        include_self = V.check_self_mode(name, self.include_self, (True, False))
        _check_embeddings(name, "embeddings", embeddings)
        if ref_embeddings is not None:
            _check_embeddings(name, "ref_embeddings", ref_embeddings, like=embeddings)
        g_emb = embeddings if ref_embeddings is None else ref_embeddings
        scores = _similarity_scores(name, self.similarity, embeddings, g_emb)
        ignore = None
        if ref_embeddings is None and include_self is False:
            ignore = torch.arange(embeddings.shape[0], device=embeddings.device)
        return 1 - self.score(scores, relevance, key, ignore)

    def score(self, scores, relevance, key, ignore):  # pragma: no cover - abstract
        raise NotImplementedError


class HAPLoss(_GradedLoss):
    """1 - H-AP (SupRank / HAPPIER, graded relevance). See :func:`fastrank.h_ap`.

    `with_hrank`, `beta`, `gamma`, `leak`: HAPPIER's smoothed H-rank (step="suprank"), checked
    here. HAPPIER's loss orders by the shared level and weighs by its relevance:

    >>> levels = fastrank.relevance_from_hierarchy(labels, labels, order="finest_first")  # HAPPIER's columns
    >>> rel = fastrank.relevance_from_hierarchy(labels, labels, order="finest_first", relevance="pop")
    >>> loss = HAPLoss(offset=1.44)(embeddings, rel, key=levels)
    """

    def __init__(self, *, with_hrank: bool = False, beta: Optional[float] = None, gamma: Optional[float] = None,
                 leak: Optional[float] = None, **kw) -> None:
        super().__init__(**kw)
        # the whole parameter set is checked now, not at the first batch
        make_graded_params(type(self).__name__, self.kw["step"], self.kw["tau"], self.kw["rho"], self.kw["delta"],
                           self.kw["start"], self.kw["offset"], with_hrank, beta, gamma, leak)
        self.kw.update(with_hrank=with_hrank, beta=beta, gamma=gamma, leak=leak)

    def score(self, scores, relevance, key, ignore):
        return h_ap(scores, relevance, key=key, ignore=ignore, backend=self.backend, **self.kw)


class NDCGLoss(_GradedLoss):
    """1 - smooth NDCG on the rank-sums primitive. See :func:`fastrank.ndcg`."""

    def score(self, scores, relevance, key, ignore):
        return ndcg(scores, relevance, key=key, ignore=ignore, backend=self.backend, **self.kw)


class PNPLoss(_RankingLoss):
    """PNP (Li et al., AAAI 2022): the loss itself (lower is better), not 1 - score. The query is
    one of its own positives by default (include_self=True), as in the published code; a query
    whose only positive is itself counts, as in every module here (pytorch-metric-learning's
    PNPLoss leaves it out: :class:`fastrank.integrations.pml.PNPLoss` does too). `tau` is the
    sigmoid temperature (PML's `anneal`). See :func:`fastrank.pnp`.

    >>> loss = PNPLoss(variant="Dq")(embeddings, labels)
    """

    def __init__(self, variant: str = "O", b: float = 2.0, alpha: float = 1.0, tau: float = 0.01, **kw) -> None:
        super().__init__(**kw)
        self.variant, self.b, self.alpha, self.tau = check_pnp_args(type(self).__name__, variant, b, alpha, tau)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, b={self.b!r}, alpha={self.alpha!r}, tau={self.tau!r}, " + \
            super().extra_repr()

    def score(self, scores, target, ignore):
        return pnp(scores, target, variant=self.variant, b=self.b, alpha=self.alpha, tau=self.tau, ignore=ignore,
                   backend=self.backend)

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, self_index=None):
        scores, target, ignore = self._inputs(embeddings, labels, ref_embeddings, ref_labels, self_index)
        return self.score(scores, target, ignore)


__all__ = [
    "CalibrationLoss",
    "HAPLoss",
    "NDCGLoss",
    "PNPLoss",
    "FastAPLoss",
    "ROADMAPLoss",
    "RecallAtKLoss",
    "SmoothAPLoss",
    "SoftBinAPLoss",
    "SupAPLoss",
]
