"""fastrank: fused kernels for rank-based retrieval losses that never build the Q x N x N tensor.

Public surface:
    rank_sums          the shared primitive (smoothed ranks of every positive)
    smooth_ap, sup_ap  average-precision surrogates (return AP; the loss is 1 - AP)
    calibration_loss   ROADMAP's calibration term
    recall_at_k        Recall@k surrogates (SupRank, Patel et al.)
    histogram_ap       FastAP and listwise SoftBin AP on fused soft histograms
    h_ap, ndcg         graded relevance (H-AP, NDCG) on the graded rank sums, every backend
    pnp                PNP (negatives before each positive; returns the loss), every backend
    backends()         which backends run here, and why not
    empty_cache()      return the cached gradient-rows block of the fused CPU loss ops
    metrics            exact evaluation metrics (R@k, mAP@R, R-precision, mAP)
    ltr                learning to rank on (batch, slate) scores: approx NDCG / MRR (allRank, TF-Ranking)
    relevance_from_multilabel  multi-label retrieval relevance (shared labels) for the graded/AP losses
"""
import os as _os

# In a source checkout imported without the install (PYTHONPATH=<repo>, as `make gpu-check` runs
# when the build step fails), `fastrank.triton_kernels` is the repo's triton_kernels/, which the
# install maps into the package; let the package find it there too.
_repo = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_repo, "triton_kernels", "__init__.py")) and \
        _os.path.isfile(_os.path.join(_repo, "setup.py")):
    __path__.append(_repo)  # noqa: F821  (a package's own __path__)

from .core.backend import BACKENDS, BackendInfo, backends  # noqa: E402
from .core.extension import empty_cache  # noqa: E402
from .ap import calibration_loss, smooth_ap, sup_ap  # noqa: E402
from . import distributed, losses, memory, metrics  # noqa: E402
from .graded import graded_rank_sums, h_ap, ndcg, relevance_from_hierarchy  # noqa: E402
from .graded import relevance_from_multilabel  # noqa: E402
from .histogram import histogram_ap  # noqa: E402
from .pnp import pnp  # noqa: E402
from .rank_sums import RankSums, rank_sums  # noqa: E402
from .recall import recall_at_k  # noqa: E402
from . import ltr  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendInfo",
    "RankSums",
    "backends",
    "calibration_loss",
    "empty_cache",
    "distributed",
    "graded_rank_sums",
    "h_ap",
    "histogram_ap",
    "losses",
    "memory",
    "metrics",
    "ndcg",
    "pnp",
    "rank_sums",
    "recall_at_k",
    "relevance_from_hierarchy",
    "relevance_from_multilabel",
    "ltr",
    "smooth_ap",
    "sup_ap",
]
