"""Histogram AP (docs/design.md §1.3): FastAP (Cakir et al., CVPR 2019) and listwise SoftBin AP
(Revaud et al., ICCV 2019), as epilogues on fused soft histograms.

The family's anatomy (docs/design.md §2.1): the public function and the op here; naive.py (the
(Q, N, L) weights, the oracle); chunked.py (the `torch` backend); triton_kernels/histogram.py;
csrc/cpu/histogram.cpp and csrc/cuda/histogram.cu (torch.ops.fastrank.histogram_fwd / _bwd).

Each score touches at most two adjacent bins, so the fused op costs O(Q*N) time and
O(Q*bins) extra memory; only the `naive` backend builds the (Q, N, bins) tensor.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from ..core import validate as V
from ..core.backend import use_fused
from ..core.epilogue import reduce_fused, reduce_per_query, safe_div
from ..core.params import HistParams
from ..core.problem import Target, build_problem, check_call, ignore_args, target_args
from ..core.registry import run, run_loss

Tensor = torch.Tensor

KINDS = ("fastap", "softbin")
#: the fused loss op's kind argument (csrc/cpu/histogram.cpp)
KIND_IDS = {"fastap": 0, "softbin": 1}
_DEFAULT_BINS = {"fastap": 10, "softbin": 25}


def histograms_packed(
    backend: str,
    scores: Tensor,
    pos_idx: Tensor,
    ignore_idx: Optional[Tensor],
    ignore_mask: Optional[Tensor],
    params: HistParams,
) -> Tuple[Tensor, Tensor]:
    """The op: (h_all, h_pos), each (Q, bins), differentiable w.r.t. scores, on the named backend."""
    return run("histogram", backend, scores, pos_idx, ignore_idx, ignore_mask, params=params)


def _check_bins(fn: str, bins, kind: str) -> int:
    if bins is None:
        return _DEFAULT_BINS[kind]
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral):
        raise TypeError(f"{fn}: `bins` must be an integer >= 2, got {bins!r}")
    if bins < 2:
        raise ValueError(f"{fn}: `bins` must be >= 2 (one bin cannot rank anything), got {bins}")
    return int(bins)


def histogram_params(kind: str, bins: int, value_range: Tuple[float, float]) -> HistParams:
    """Bin coordinates of each kind. FastAP: squared distance x = 2 - 2s on bins+1 centres
    linspace(0, 4), closed ends. SoftBin: `bins` centres from max (bin 0) down to min, open ends."""
    if kind == "fastap":
        delta = 4.0 / bins
        return HistParams(bins + 1, -2.0 / delta, 2.0 / delta, False)
    lo, hi = value_range
    a = (bins - 1) / (hi - lo)
    return HistParams(bins, -a, a * hi, True)


def _fastap(h_all: Tensor, h_pos: Tensor, n_pos: Tensor) -> Tensor:
    cum_pos = torch.cumsum(h_pos, 1)
    cum_all = torch.cumsum(h_all, 1)
    num = h_pos * cum_pos
    # terms with h+ H+ = 0 or H = 0 are dropped (the reference zeroes its NaN/inf terms)
    keep = (num != 0) & (cum_all != 0)
    terms = safe_div(num, cum_all, keep)
    return terms.sum(1) / n_pos.clamp(min=1).to(terms.dtype)


def _softbin(h_all: Tensor, h_pos: Tensor) -> Tensor:
    cum_rec = torch.cumsum(h_pos, 1)
    cum_nbs = torch.cumsum(h_all, 1)
    # not (x <= 0) rather than x > 0: a NaN bin must reach the AP and its gradient, not count 0
    ok = ~(cum_nbs <= 0)
    prec = safe_div(cum_rec, cum_nbs, ok)
    total = h_pos.sum(1, keepdim=True)
    has = ~(total <= 0)
    rec = safe_div(h_pos, total, has)
    return (prec * rec).sum(1)


#: the most bins of the fused CUDA histogram op (csrc/cuda/loss_cuda.h kMaxFusedBins)
CUDA_MAX_FUSED_BINS = 256


def histogram_ap(
    scores: Tensor,
    target: Target,
    *,
    bins: Optional[int] = None,
    kind: str = "fastap",
    range: Tuple[float, float] = (0.0, 1.0),  # noqa: A002  (the published argument name)
    ignore: Optional[Tensor] = None,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    r"""Histogram-binned AP (higher is better; the loss is ``1 - histogram_ap(...)``).

    kind="fastap" (FastAP, Cakir et al.): scores are cosine similarities of L2-normalised
    embeddings, binned by squared distance x = 2 - 2s into L = bins + 1 triangular bins
    z_l = linspace(0, 4, L) of width 4/bins (default bins=10):

    .. math:: \mathrm{AP}_i = \frac{1}{|P_i|} \sum_l \frac{h^+_l H^+_l}{H_l},\quad
              H^+ = \mathrm{cumsum}(h^+),\ H = \mathrm{cumsum}(h^+ + h^-)

    (terms with h+H+ = 0 or H = 0 dropped; mass beyond [0, 4] is lost, as published).

    kind="softbin" (listwise AP, Revaud et al.): `bins` (default 25) triangular bins over
    `range` (default (0, 1)), bin 0 centred at max, end bins open (scores beyond the range
    fall fully into the end bin); prec_b = cumsum(h+)_b / cumsum(h)_b,
    AP = sum_b prec_b h+_b / sum_b h+_b. ROADMAP's copy uses bins=20, range=(-1, 1).

    Queries without positives count 0 in reduction="none" and are left out of "mean".
    FastAP leaves the query out of its own gallery: pass ``ignore=torch.arange(Q)``.

    Example:
        >>> ap = fastrank.histogram_ap(scores, (labels, labels), kind="fastap", ignore=torch.arange(len(labels)))
    """
    fn = "fastrank.histogram_ap"
    V.check_choice(fn, "kind", kind, KINDS)
    nbins = _check_bins(fn, bins, kind)
    value_range = V.check_range(fn, "range", range)
    V.check_reduction(fn, reduction)
    params = histogram_params(kind, nbins, value_range)
    if not all(math.isfinite(v) for v in (params.scale, params.shift)):
        raise ValueError(f"{fn}: `range` {tuple(value_range)!r} is too narrow for {nbins} bins")
    scores, _, name = check_call(fn, scores, target, ignore, backend, fused=True, loss="histogram_ap_loss")
    fused_op = use_fused(name, "histogram_ap_loss")
    if fused_op and name == "cuda" and nbins > CUDA_MAX_FUSED_BINS:
        # the CUDA op keeps a row's histograms in shared memory: more bins take the two-pass
        # kernels, whose inputs are checked here (the op would have checked them in its pass)
        fused_op = False
        scores, _, name = check_call(fn, scores, target, ignore, backend)
    if fused_op:
        # one pass per row in C++ (docs/design.md §2.4; a fixed number of launches in Triton): no
        # packing, the gradient rows with it
        ap, n_pos = run_loss("histogram_ap_loss", fn, name, scores, *target_args(target), *ignore_args(ignore),
                             params=params, options=(KIND_IDS[kind],))
        return reduce_fused(ap, n_pos, reduction, name)
    pb = build_problem(target, ignore, scores.shape[0], scores.shape[1], scores.device)
    h_all, h_pos = histograms_packed(name, scores, pb.pos_idx, pb.ignore_idx, pb.ignore_mask, params)
    ap = _fastap(h_all, h_pos, pb.n_pos) if kind == "fastap" else _softbin(h_all, h_pos)
    ap = torch.where(pb.n_pos > 0, ap, torch.zeros_like(ap))
    return reduce_per_query(ap, scores, pb, reduction)
