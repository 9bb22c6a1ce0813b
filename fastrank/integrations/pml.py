"""pytorch-metric-learning drop-ins: fused fastrank losses behind PML's loss interface.

    from fastrank.integrations import pml as fr_pml
    loss_fn = fr_pml.SmoothAPLoss()            # instead of pytorch_metric_learning.losses.SmoothAPLoss()
    loss = loss_fn(embeddings, labels)         # miners' indices_tuple, reducers, ref_emb, CrossBatchMemory work

or `fr_pml.patch()` to swap them into `pytorch_metric_learning.losses` for code that builds
losses by name (`unpatch()` restores PML's own).

Differences from PML's classes, all in the direction of the published definitions:

* no equal-class-size, class-order or `ref_emb` restrictions;
* PML 2.9.0's SmoothAPLoss groups the batch as (samples per class) x (classes), so it equals
  the published Smooth-AP only when the number of classes equals the samples per class
  (e.g. 4 x 4); with 4 classes x 3 samples its value differs. Ours computes the published
  Smooth-AP on every batch (it equals PML's wherever PML's grouping is right);
* queries without any positive are left out of the reduction instead of raising.

PML's `DistributedLossWrapper` works with every drop-in: `efficient=False` gives the
one-process gradient; with `efficient=True` (PML's approximation: gradients through the local
rows only) the gathered gallery starts with the local batch, and FastAP/SoftBin, which leave
the query out of its gallery, leave those leading rows out (a separate gallery whose first
rows equal the queries is taken to contain them; not inside CrossBatchMemory).

The loss comes back in the dtype PML's class returns (ranks computed in float32 for
float16/bfloat16 embeddings, as every fastrank op): the embeddings' dtype for FastAPLoss and
for the losses PML lacks (PML's convention: float16 embeddings give a float16 loss); for
SmoothAPLoss, which PML accumulates in a default-dtype (float32) buffer, float32 for
float16/bfloat16/float32 embeddings -- and float64 for float64 ones, where PML drops to float32.

pytorch-metric-learning is an optional dependency: `pip install pytorch-metric-learning`.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

try:
    from pytorch_metric_learning import losses as _pml_losses
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
    from pytorch_metric_learning.losses import BaseMetricLossFunction
    from pytorch_metric_learning.utils import common_functions as c_f
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
except ImportError as e:  # pragma: no cover - exercised only without PML
    raise ImportError(
        "fastrank.integrations.pml needs pytorch-metric-learning: `pip install pytorch-metric-learning` "
        f"({e})"
    ) from e

from ..core import validate as V
from .. import ap as _ap
from ..histogram import histogram_ap
from ..pnp import VARIANTS as _PNP_VARIANTS
from ..pnp import check_pnp_args, pnp
from ..recall import recall_at_k

Tensor = torch.Tensor


def _positive_counts(labels: Tensor, ref_labels: Tensor) -> Tensor:
    """Number of gallery items sharing each query's label, without a (Q, N) mask."""
    sorted_ref, _ = torch.sort(ref_labels)
    lo = torch.searchsorted(sorted_ref, labels, right=False)
    hi = torch.searchsorted(sorted_ref, labels, right=True)
    return hi - lo


def _queries_lead(loss, embeddings: Tensor, labels: Tensor, ref_emb: Tensor, ref_labels: Tensor) -> bool:
    """True where a separate gallery starts with the queries themselves (the same values and labels
    in rows 0..Q-1, more rows after them): the layout of PML's DistributedLossWrapper(efficient=True),
    which passes [this rank's batch, the other ranks' batches] as ref_emb. The losses that leave the
    query out of its gallery (FastAP, SoftBin) then leave those rows out, as on one process.
    Not applied inside CrossBatchMemory, whose memory holds the batch at the queue's position
    (at rows 0..Q-1 on some steps only): see its docstring."""
    if getattr(loss, "_in_memory", False):
        return False
    q = embeddings.shape[0]
    return (ref_emb.shape[0] > q and torch.equal(ref_labels[:q], labels)
            and torch.equal(ref_emb[:q], embeddings))


class _FusedPMLLoss(BaseMetricLossFunction):
    """Shared plumbing: PML distance -> similarity scores, self handling, miner weights."""

    #: True: the query is its own positive and competitor when the gallery is the batch itself;
    #: "competitor": it competes but is not its own positive (Patel et al.); False: left out
    include_self = True

    def __init__(self, backend: Optional[str] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backend = backend

    def get_default_distance(self):
        return CosineSimilarity()

    def output_dtype(self, embeddings: Tensor) -> torch.dtype:
        """The dtype of the loss, PML's for the class: by default that of the embeddings."""
        return embeddings.dtype

    def _similarities(self, embeddings: Tensor, ref_emb: Tensor) -> Tensor:
        d = self.distance(embeddings, ref_emb)
        if isinstance(self.distance, LpDistance):
            # squared Euclidean distance of normalised embeddings: x = 2 - 2s
            return 1 - d / 2
        return d

    def per_query_score(self, scores: Tensor, target, ignore: Optional[Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        self_gallery = ref_emb is embeddings  # PML passes the batch itself when ref_emb is None
        scores = self._similarities(embeddings, ref_emb)
        ignore = None
        target = (labels, ref_labels)
        n_pos = _positive_counts(labels, ref_labels)
        mode = V.check_self_mode(type(self).__name__, self.include_self)
        # the gallery holds the queries themselves: the batch, or its leading rows (DistributedLossWrapper)
        leads = self_gallery or _queries_lead(self, embeddings, labels, ref_emb, ref_labels)
        if leads and mode is False:
            ignore = torch.arange(labels.shape[0], device=labels.device)
            n_pos = n_pos - 1
        elif leads and mode == "competitor":
            # the query ranks itself as a negative: a dense target without its own column
            q, n = labels.shape[0], ref_labels.shape[0]
            target = (labels.unsqueeze(1) == ref_labels.unsqueeze(0)) & ~torch.eye(q, n, dtype=torch.bool,
                                                                                       device=labels.device)
            n_pos = n_pos - 1
        score = self.per_query_score(scores, target, ignore)
        weights = lmu.convert_to_weights(indices_tuple, labels, dtype=score.dtype, using_ref=not self_gallery)
        # a NaN query stays in even without positives: NaN in, NaN out (its score is NaN, not 0)
        keep = torch.nonzero((n_pos > 0) | torch.isnan(score)).squeeze(1)
        if keep.numel() == 0:
            return self.zero_losses()
        # computed in float32 for half-precision input, handed to PML's reducer in the dtype PML's
        # own class returns (FastAP: a float16 batch gives a float16 loss)
        losses = ((1 - score) * weights)[keep].to(self.output_dtype(embeddings))
        return {self._sub_loss_names()[0]: {"losses": losses, "indices": keep, "reduction_type": "element"}}


class SmoothAPLoss(_FusedPMLLoss):
    """Drop-in for `pytorch_metric_learning.losses.SmoothAPLoss` (same `temperature` argument),
    computing the published Smooth-AP with the fused kernels."""

    def __init__(self, temperature: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        c_f.assert_distance_type(self, CosineSimilarity)
        self.temperature = temperature

    def _sub_loss_names(self):
        return ["ap_loss"]

    def output_dtype(self, embeddings: Tensor) -> torch.dtype:
        # PML's SmoothAPLoss fills a default-dtype buffer: float32 for half and float32 input;
        # float64 input keeps its precision here (PML's would round it to float32)
        return torch.promote_types(embeddings.dtype, torch.get_default_dtype())

    def per_query_score(self, scores, target, ignore):
        return _ap.smooth_ap(scores, target, tau=self.temperature, ignore=ignore, reduction="none",
                             backend=self.backend)


class FastAPLoss(_FusedPMLLoss):
    """Drop-in for `pytorch_metric_learning.losses.FastAPLoss` (same `num_bins`; squared
    Euclidean distance of normalised embeddings), with the fused soft-histogram kernels."""

    include_self = False

    def __init__(self, num_bins: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        c_f.assert_distance_type(self, LpDistance, normalize_embeddings=True, p=2)
        if self.distance.power != 2:
            raise ValueError(f"FastAPLoss: the distance must be squared (LpDistance(power=2)), got power "
                             f"{self.distance.power}")
        self.num_bins = V.check_integer(type(self).__name__, "num_bins", num_bins, 2)
        self.add_to_recordable_attributes(list_of_names=["num_bins"], is_stat=False)

    def get_default_distance(self):
        return LpDistance(power=2)

    def per_query_score(self, scores, target, ignore):
        return histogram_ap(scores, target, bins=self.num_bins, kind="fastap", ignore=ignore, reduction="none",
                            backend=self.backend)


class SupAPLoss(_FusedPMLLoss):
    """SupAP (ROADMAP) in PML's interface; the step parameters of :func:`fastrank.sup_ap`
    (``offset=None``: sigma_tau(delta) + start)."""

    def __init__(self, tau: float = 0.01, rho: float = 100.0, delta: float = 0.05, start: float = 0.5,
                 offset: Optional[float] = None, **kwargs):
        super().__init__(**kwargs)
        c_f.assert_distance_type(self, CosineSimilarity)
        self.tau, self.rho, self.delta, self.start, self.offset = tau, rho, delta, start, offset

    def per_query_score(self, scores, target, ignore):
        return _ap.sup_ap(scores, target, tau=self.tau, rho=self.rho, delta=self.delta, start=self.start,
                          offset=self.offset, ignore=ignore, reduction="none", backend=self.backend)


class RecallAtKLoss(_FusedPMLLoss):
    """Smooth Recall@k (SupRank form by default) in PML's interface, with the parameters of
    :func:`fastrank.recall_at_k`.

    `include_self` (in-batch galleries only): True, the query is its own positive and a
    competitor (SupRank); ``"competitor"``, it competes but is not its own positive (Patel et
    al.'s code); False, it is left out. None (default) takes the variant's published choice,
    as :class:`fastrank.losses.RecallAtKLoss` does: True for "suprank", "competitor" for "patel".
    """

    def __init__(self, ks=(1, 2, 4, 8, 16), tau: float = 0.01, temp: float = 1.0, variant: str = "suprank",
                 step: Optional[str] = None, rho: float = 100.0, delta: float = 0.05, start: float = 0.5,
                 offset: Optional[float] = None, include_self=None, **kwargs):
        name = type(self).__name__
        V.check_choice(name, "variant", variant, ("suprank", "patel"))
        if include_self is None:
            include_self = "competitor" if variant == "patel" else True
        include_self = V.check_self_mode(name, include_self)
        super().__init__(**kwargs)
        c_f.assert_distance_type(self, CosineSimilarity)
        self.ks = V.check_ks(name, ks)
        self.tau, self.temp, self.variant, self.step = tau, temp, variant, step
        self.rho, self.delta, self.start, self.offset = rho, delta, start, offset
        self.include_self = include_self

    def per_query_score(self, scores, target, ignore):
        return recall_at_k(scores, target, ks=self.ks, tau=self.tau, temp=self.temp, variant=self.variant,
                           step=self.step, rho=self.rho, delta=self.delta, start=self.start, offset=self.offset,
                           ignore=ignore, reduction="none", backend=self.backend)


class SoftBinAPLoss(_FusedPMLLoss):
    """Listwise soft-binned AP (Revaud et al.) in PML's interface; the query is left out of its gallery."""

    include_self = False

    def __init__(self, num_bins: int = 25, value_range=(0.0, 1.0), **kwargs):
        super().__init__(**kwargs)
        c_f.assert_distance_type(self, CosineSimilarity)
        self.num_bins = V.check_integer(type(self).__name__, "num_bins", num_bins, 2)
        self.value_range = V.check_range(type(self).__name__, "value_range", value_range)

    def per_query_score(self, scores, target, ignore):
        return histogram_ap(scores, target, bins=self.num_bins, kind="softbin", range=self.value_range,
                            ignore=ignore, reduction="none", backend=self.backend)


class CrossBatchMemory(_pml_losses.CrossBatchMemory):
    """PML's CrossBatchMemory, accepting the fastrank drop-ins too.

    PML checks the wrapped loss's class name against a fixed list that has no AP loss; the
    fused losses rank the batch against the memory (a rectangular Q x N problem), which is
    what cross-batch memory needs. The batch's own memory entries are exact copies of the
    queries: for losses that count the query in its own gallery (Smooth-AP, SupAP, recall)
    that is the published convention; FastAP/SoftBin would see a duplicate of the query —
    use `fastrank.memory.CrossBatchMemory`, which returns the batch's memory slots to
    leave out, for those.
    """

    @staticmethod
    def supported_losses():
        """PML's list, unchanged and in its order, then the fastrank drop-ins it lacks (class names,
        as PML's list holds them; after `patch()` each names a class of `pytorch_metric_learning.losses`)."""
        names = list(_ORIGINAL_CBM.supported_losses())
        return names + [n for n in sorted(_FUSED_NAMES) if n not in names]

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None, **kwargs):
        # PML checks the class name only: PML's own SmoothAPLoss / FastAPLoss share our names but
        # refuse a separate gallery, so they would fail on the first batch instead of here
        if type(loss).__name__ in _FUSED_NAMES and not isinstance(loss, _FusedPMLLoss):
            raise Exception(f"CrossBatchMemory not supported for {type(loss).__module__}.{type(loss).__name__}; "
                            f"use fastrank.integrations.pml.{type(loss).__name__}")
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner, **kwargs)

    def forward(self, *args, **kwargs):
        # the memory may hold this batch at rows 0..B-1 on some steps: not the distributed layout
        previous = getattr(self.loss, "_in_memory", False)
        self.loss._in_memory = True
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.loss._in_memory = previous


_ORIGINAL_CBM = _pml_losses.CrossBatchMemory
_FUSED_NAMES = {"SmoothAPLoss", "FastAPLoss", "SupAPLoss", "RecallAtKLoss", "SoftBinAPLoss"}
_PATCHED: Dict[str, object] = {}
_OURS = {
    "SmoothAPLoss": SmoothAPLoss,
    "FastAPLoss": FastAPLoss,
    "SupAPLoss": SupAPLoss,
    "RecallAtKLoss": RecallAtKLoss,
    "SoftBinAPLoss": SoftBinAPLoss,
    "CrossBatchMemory": CrossBatchMemory,
}
_MISSING = object()


def patch() -> None:
    """Replace PML's SmoothAPLoss, FastAPLoss and CrossBatchMemory (and add our other losses) in
    `pytorch_metric_learning.losses`.

    Idempotent; `unpatch()` restores the originals.
    """
    for name, cls in _OURS.items():
        if name not in _PATCHED:
            _PATCHED[name] = getattr(_pml_losses, name, _MISSING)
        setattr(_pml_losses, name, cls)


def unpatch() -> None:
    """Undo `patch()`."""
    for name, original in list(_PATCHED.items()):
        if original is _MISSING:
            delattr(_pml_losses, name)
        else:
            setattr(_pml_losses, name, original)
        del _PATCHED[name]


__all__ = ["CrossBatchMemory", "FastAPLoss", "RecallAtKLoss", "SmoothAPLoss", "SoftBinAPLoss", "SupAPLoss", "patch", "unpatch"]


# --------------------------------------------------------------------------- PNP


class PNPLoss(_FusedPMLLoss):
    """Drop-in for `pytorch_metric_learning.losses.PNPLoss` (same `b`, `alpha`, `anneal`,
    `variant`; cosine similarity), on the rank-sums kernels instead of PML's B x B x B cube.

    As PML's: the query is one of its own positives, a query that shares its label with no other
    batch item is left out of the mean, the loss is returned already reduced (reducers do not
    apply) and a miner's `indices_tuple` is refused. Unlike PML's, `ref_emb`/`ref_labels` are
    accepted: the queries are ranked against that gallery, and a query counts where the gallery
    holds one of its positives. A NaN query stays in the mean (NaN in, NaN out). `patch()`
    swaps it in for PML's.
    """

    VARIANTS = list(_PNP_VARIANTS)

    def __init__(self, b: float = 2, alpha: float = 1, anneal: float = 0.01, variant: str = "O", **kwargs) -> None:
        super().__init__(**kwargs)
        c_f.assert_distance_type(self, CosineSimilarity)
        check_pnp_args(type(self).__name__, variant, b, alpha, anneal, tau_name="anneal")
        self.b, self.alpha, self.anneal, self.variant = b, alpha, anneal, variant

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.indices_tuple_not_supported(indices_tuple)
        c_f.labels_required(labels)
        self_gallery = ref_emb is embeddings  # PML passes the batch itself when ref_emb is None
        scores = self._similarities(embeddings, ref_emb)
        per_query = pnp(scores, (labels, ref_labels), variant=self.variant, b=self.b, alpha=self.alpha,
                        tau=self.anneal, reduction="none", backend=self.backend)
        n_pos = _positive_counts(labels, ref_labels)
        if self_gallery:
            n_pos = n_pos - 1  # PML keeps a query only when another item shares its label
        keep = torch.nonzero((n_pos > 0) | torch.isnan(per_query)).squeeze(1)
        if keep.numel() == 0:
            return self.zero_losses()
        loss = per_query[keep].mean()
        return {"loss": {"losses": loss, "indices": keep, "reduction_type": "already_reduced"}}


_OURS["PNPLoss"] = PNPLoss
__all__.append("PNPLoss")
