"""fastrank: fused kernels for rank-based retrieval losses that never build the Q x N x N tensor.

Public surface:
    rank_sums          the shared primitive (smoothed ranks of every positive)
    smooth_ap, sup_ap  average-precision surrogates (return AP; the loss is 1 - AP)
    calibration_loss   ROADMAP's calibration term
    recall_at_k        Recall@k surrogates (SupRank, Patel et al.)
    histogram_ap       FastAP and listwise SoftBin AP on fused soft histograms
    h_ap, ndcg         graded relevance (H-AP, NDCG) on the graded rank sums, every backend
    backends()         which backends run here, and why not
    metrics            exact evaluation metrics (R@k, mAP@R, R-precision, mAP)
"""
from ._backend import BACKENDS, BackendInfo, backends
from .ap import calibration_loss, smooth_ap, sup_ap
from . import distributed, losses, memory, metrics
from .graded import graded_rank_sums, h_ap, ndcg, relevance_from_hierarchy
from .histogram import histogram_ap
from .rank_sums import RankSums, rank_sums
from .recall import recall_at_k

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendInfo",
    "RankSums",
    "backends",
    "calibration_loss",
    "distributed",
    "graded_rank_sums",
    "h_ap",
    "histogram_ap",
    "losses",
    "memory",
    "metrics",
    "ndcg",
    "rank_sums",
    "recall_at_k",
    "relevance_from_hierarchy",
    "smooth_ap",
    "sup_ap",
]
