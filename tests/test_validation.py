"""Bad input raises ValueError/TypeError naming the argument, on every backend it reaches."""
import pytest
import torch

import fastrank

from .conftest import CPU_BACKENDS

Q, N = 4, 6
S = torch.rand(Q, N)
LAB = (torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1, 2, 2]))

BAD = [
    # (kwargs overriding the good call, exception, text the message must contain)
    (dict(scores=[[0.1, 0.2]]), TypeError, "`scores` must be a torch.Tensor"),
    (dict(scores=torch.rand(N)), ValueError, "`scores` must be 2-D"),
    (dict(scores=torch.rand(2, 3, 4)), ValueError, "`scores` must be 2-D"),
    (dict(scores=torch.ones(Q, N, dtype=torch.int64)), TypeError, "`scores` must be a floating tensor"),
    (dict(scores=torch.rand(0, N), target=torch.zeros(0, N)), ValueError, "`scores` must be non-empty"),
    (dict(scores=torch.rand(Q, 0), target=torch.zeros(Q, 0)), ValueError, "`scores` must be non-empty"),
    (dict(target=torch.zeros(Q, N + 1)), ValueError, "`target` must have the shape of scores"),
    (dict(target="labels"), TypeError, "`target` must be a (Q, N) relevance tensor"),
    (dict(target=(LAB[0],)), ValueError, "pair (query_labels, gallery_labels)"),
    (dict(target=(LAB[0].float(), LAB[1])), TypeError, "query_labels must be an integer tensor"),
    (dict(target=(LAB[0], LAB[1][:5])), ValueError, "gallery_labels must have shape (6,)"),
    (dict(target=(LAB[0][:3], LAB[1])), ValueError, "query_labels must have shape (4,)"),
    (dict(target=(LAB[0], [0, 1, 0, 1, 2, 2])), TypeError, "gallery_labels must be a 1-D integer tensor"),
    (dict(target=torch.full((Q, N), float("nan"))), ValueError, "`target` contains NaN"),
    (dict(target=torch.zeros(Q, N, dtype=torch.complex64)), TypeError, "`target` must be bool, integer or floating"),
    (dict(ignore=torch.tensor([0, 1, 2])), ValueError, "`ignore` as an index must have shape (4,)"),
    (dict(ignore=torch.tensor([0, 1, 2, 6])), ValueError, "`ignore` indices must lie in [-1, 5]"),
    (dict(ignore=torch.tensor([0, 1, 2, -2])), ValueError, "`ignore` indices must lie in [-1, 5]"),
    (dict(ignore=torch.zeros(Q, N + 1, dtype=torch.bool)), ValueError, "`ignore` as a bool mask must have shape"),
    (dict(ignore=torch.zeros(Q, dtype=torch.float32)), TypeError, "`ignore` must be an integer index"),
    (dict(ignore=[0, 1, 2, 3]), TypeError, "`ignore` must be None"),
    (dict(tau=0.0), ValueError, "`tau` must be a finite number > 0"),
    (dict(tau=-0.01), ValueError, "`tau` must be a finite number > 0"),
    (dict(tau=float("inf")), ValueError, "`tau` must be a finite number > 0"),
    (dict(tau=float("nan")), ValueError, "`tau` must be a finite number > 0"),
    (dict(tau="0.01"), TypeError, "`tau` must be a real number"),
    (dict(reduction="avg"), ValueError, "`reduction` must be one of"),
    (dict(backend="gpu"), ValueError, "`backend` must be None or one of"),
]

SUPAP_BAD = [
    (dict(rho=-1.0), ValueError, "`rho` must be a finite number >= 0"),
    (dict(delta=-0.1), ValueError, "`delta` must be a finite number >= 0"),
    (dict(start=float("nan")), ValueError, "`start` must be finite"),
    (dict(offset=float("inf")), ValueError, "`offset` must be finite"),
]


def _call(fn, default_backend, **over):
    kw = dict(scores=S, target=LAB)
    if fn is not fastrank.calibration_loss:
        kw["backend"] = default_backend
    kw.update(over)
    scores, target = kw.pop("scores"), kw.pop("target")
    return fn(scores, target, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("over,exc,text", BAD, ids=[b[2][:40] for b in BAD])
@pytest.mark.parametrize("fn", [fastrank.smooth_ap, fastrank.sup_ap])
def test_bad_arguments_ap(fn, backend, over, exc, text):
    with pytest.raises(exc) as info:
        _call(fn, backend, **over)
    assert text in str(info.value)
    assert fn.__name__ in str(info.value)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("over,exc,text", SUPAP_BAD, ids=[b[2][:40] for b in SUPAP_BAD])
def test_bad_suprank_parameters(backend, over, exc, text):
    with pytest.raises(exc) as info:
        _call(fastrank.sup_ap, backend, **over)
    assert text in str(info.value)
    with pytest.raises(exc) as info:
        _call(fastrank.rank_sums, backend, step="suprank", **over)
    assert text in str(info.value)


@pytest.mark.parametrize("over,exc,text", [b for b in BAD if "tau" not in b[2] and "reduction" not in b[2]
                                           and "backend" not in b[2]])
def test_bad_arguments_calibration(over, exc, text):
    with pytest.raises(exc) as info:
        _call(fastrank.calibration_loss, None, **over)
    assert text in str(info.value)


def test_bad_step_and_margins():
    with pytest.raises(ValueError, match="`step` must be one of 'sigmoid', 'suprank'"):
        fastrank.rank_sums(S, LAB, step="heaviside")
    with pytest.raises(ValueError, match="`pos_margin` must be finite"):
        fastrank.calibration_loss(S, LAB, pos_margin=float("nan"))
    with pytest.raises(TypeError, match="`neg_margin` must be a real number"):
        fastrank.calibration_loss(S, LAB, neg_margin=None)


def test_env_backend_is_validated(monkeypatch):
    monkeypatch.setenv("FASTRANK_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FASTRANK_BACKEND must be one of"):
        fastrank.sup_ap(S, LAB)
