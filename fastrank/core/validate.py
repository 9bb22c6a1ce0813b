"""Argument checks shared by every public entry point.

Every failure raises ValueError or TypeError whose message names the function,
the argument, what was expected and what was given.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: integer dtypes every op supports (comparisons, min/max, indexing)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
#: torch's newer unsigned dtypes lack comparisons and reductions; labels only need equality,
#: so they are accepted as labels (compared as int64: uint64 values >= 2**63 wrap, still distinct)
WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)
LABEL_DTYPES = INT_DTYPES + WIDE_UNSIGNED
REDUCTIONS = ("mean", "sum", "none")
INT64_MAX = (1 << 63) - 1
SELF_MODES = (True, False, "competitor")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_storage(fn: str, name: str, t: torch.Tensor) -> None:
    """A strided tensor with data: sparse/mkldnn layouts and the meta device would otherwise fail
    deep inside a kernel (or, for meta, silently compute nothing). `name` is as it should read,
    backticks included."""
    if t.layout != torch.strided:
        raise TypeError(f"{fn}: {name} must be a dense (strided) tensor, got layout {t.layout}; "
                        "convert it with .to_dense()")
    if t.device.type == "meta":
        raise ValueError(f"{fn}: {name} is on the meta device, which holds no data; "
                         "pass a tensor on a real device (cpu or cuda)")


def check_scores(fn: str, scores: Any) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{fn}: `scores` must be a torch.Tensor of shape (Q, N), got {_describe(scores)}")
    check_storage(fn, "`scores`", scores)
    if scores.dim() != 2:
        raise ValueError(f"{fn}: `scores` must be 2-D (Q queries x N gallery items), got shape {tuple(scores.shape)}")
    if scores.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: `scores` must be a floating tensor (float16/bfloat16/float32/float64), got {scores.dtype}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"{fn}: `scores` must be non-empty, got shape {tuple(scores.shape)}")


def check_positive_number(fn: str, name: str, value: Any, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: `{name}` must be a real number, got {_describe(value)}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{fn}: `{name}` must be a finite number {bound}, got {value!r}")
    return v


def check_finite_number(fn: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: `{name}` must be a real number, got {_describe(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{fn}: `{name}` must be finite, got {value!r}")
    return v


def check_flag(fn: str, name: str, value: Any) -> bool:
    """Exactly bool or numpy.bool_, returned as bool. Numbers are refused rather than read as
    truth values: 1.0 or 0 for a flag is more likely a misplaced argument than a choice."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{fn}: `{name}` must be a bool (True or False), got {_describe(value)}")


def check_self_mode(fn: str, value: Any, modes: Sequence[Union[bool, str]] = SELF_MODES) -> Union[bool, str]:
    """`include_self`: True/False (bool or numpy.bool_) or, where allowed, the string 'competitor'.
    Normalised here once, so the modules can compare with `is True` / `is False` safely."""
    allowed = " or ".join(repr(m) for m in modes) if len(modes) == 2 else \
        ", ".join(repr(m) for m in modes[:-1]) + f" or {modes[-1]!r}"
    if isinstance(value, str):
        if value in modes:
            return value
        raise ValueError(f"{fn}: `include_self` must be {allowed}, got {value!r}")
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{fn}: `include_self` must be {allowed} (a bool, not a number), got {_describe(value)}")


def check_ks(fn: str, ks: Any) -> Tuple[int, ...]:
    """k of Recall@k: one integer or a non-empty sequence (tuple, list, 1-D array/tensor) of integers
    in [1, 2**63 - 1] (the kernels and torch scalars hold k as int64)."""
    if isinstance(ks, numbers.Integral) and not isinstance(ks, (bool, np.bool_)):
        ks = (ks,)
    elif isinstance(ks, (np.ndarray, torch.Tensor)) and ks.ndim == 1:
        ks = ks.tolist()
    if not isinstance(ks, (tuple, list)) or len(ks) == 0:
        raise TypeError(f"{fn}: `ks` must be a non-empty sequence of positive integers, got {_describe(ks)}")
    out = []
    for k in ks:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
            raise TypeError(f"{fn}: `ks` must contain integers, got {k!r} in {tuple(ks)!r}")
        if k <= 0:
            raise ValueError(f"{fn}: every k in `ks` must be >= 1, got {k!r} in {tuple(ks)!r}")
        if k > INT64_MAX:
            raise ValueError(f"{fn}: every k in `ks` must be <= 2**63 - 1 (int64), got {k!r}")
        out.append(int(k))
    return tuple(out)


def check_integer(fn: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: `{name}` must be an integer >= {minimum}, got {_describe(value)}")
    if value < minimum:
        raise ValueError(f"{fn}: `{name}` must be >= {minimum}, got {value!r}")
    return int(value)


def check_range(fn: str, name: str, value: Any) -> Tuple[float, float]:
    """A pair (min, max) of finite numbers with min < max."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{fn}: `{name}` must be a pair (min, max), got {_describe(value)}")
    lo = check_finite_number(fn, f"{name}[0]", value[0])
    hi = check_finite_number(fn, f"{name}[1]", value[1])
    if not lo < hi:
        raise ValueError(f"{fn}: `{name}` must satisfy min < max, got {tuple(value)!r}")
    return lo, hi


def env_positive_int(name: str, default: int) -> int:
    """An integer environment variable read at call time; unset means `default`."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"environment variable {name} must be a positive integer, got {raw!r} "
                         f"(unset it for the default, {default})")
    return value


def check_choice(fn: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{fn}: `{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_reduction(fn: str, reduction: Any) -> str:
    return check_choice(fn, "reduction", reduction, REDUCTIONS)


def check_target(fn: str, target: Any, scores: torch.Tensor, values: bool = True) -> None:
    """Dense (Q, N) relevance, or a pair (query_labels (Q,), gallery_labels (N,)) of integer tensors.
    values=False skips the pass over the relevance values (NaN): for a fused op that checks them."""
    q, n = scores.shape
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError(
                f"{fn}: `target` as labels must be a pair (query_labels, gallery_labels), got a sequence of {len(target)}"
            )
        for name, lab, size in (("query_labels", target[0], q), ("gallery_labels", target[1], n)):
            if not isinstance(lab, torch.Tensor):
                raise TypeError(f"{fn}: `target` {name} must be a 1-D integer tensor, got {_describe(lab)}")
            check_storage(fn, f"`target` {name}", lab)
            if lab.dtype not in LABEL_DTYPES:
                raise TypeError(f"{fn}: `target` {name} must be an integer tensor "
                                f"({_dtype_names(LABEL_DTYPES)}), got {lab.dtype}")
            if lab.dim() != 1 or lab.shape[0] != size:
                raise ValueError(
                    f"{fn}: `target` {name} must have shape ({size},) to match scores {tuple(scores.shape)}, "
                    f"got {tuple(lab.shape)}"
                )
            if lab.device != scores.device:
                raise ValueError(f"{fn}: `target` {name} is on {lab.device} but `scores` is on {scores.device}")
        return
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            f"{fn}: `target` must be a (Q, N) relevance tensor or a pair (query_labels, gallery_labels), "
            f"got {_describe(target)}"
        )
    check_storage(fn, "`target`", target)
    if tuple(target.shape) != (q, n):
        raise ValueError(f"{fn}: `target` must have the shape of scores {(q, n)}, got {tuple(target.shape)}")
    if target.device != scores.device:
        raise ValueError(f"{fn}: `target` is on {target.device} but `scores` is on {scores.device}")
    if target.dtype.is_complex or target.dtype in WIDE_UNSIGNED:
        raise TypeError(f"{fn}: `target` must be bool, integer or floating (as relevance, integer means "
                        f"{_dtype_names(INT_DTYPES)}), got {target.dtype}")
    if values and target.dtype.is_floating_point and bool(torch.isnan(target).any()):
        raise ValueError(f"{fn}: `target` contains NaN; relevance must be a number (> 0 = positive)")


def check_key(fn: str, key: Any, scores: torch.Tensor, values: bool = True) -> Optional[torch.Tensor]:
    """(Q, N) ordering key of the graded losses (None: order by the relevance): floating, integer
    or bool, on the device of scores; returned detached in the ranks' dtype. Its values must be
    finite and survive that cast exactly (two keys that compare unequal must stay unequal): the
    cast always here (where the key is not already in that dtype), finiteness here with
    values=True, else by the fused op in its pass (a NaN key there makes its query NaN on the GPU)."""
    if key is None:
        return None
    q, n = scores.shape
    if not isinstance(key, torch.Tensor):
        raise TypeError(f"{fn}: `key` must be None or a (Q, N) tensor (e.g. the hierarchy level each item "
                        f"shares with the query), got {_describe(key)}")
    if tuple(key.shape) != (q, n):
        raise ValueError(f"{fn}: `key` must have the shape of scores {(q, n)}, got {tuple(key.shape)}")
    if key.device != scores.device:
        raise ValueError(f"{fn}: `key` is on {key.device} but `scores` is on {scores.device}")
    if key.dtype.is_complex or not (key.dtype.is_floating_point or key.dtype in INT_DTYPES or key.dtype == torch.bool):
        raise TypeError(f"{fn}: `key` must be a floating, integer or bool tensor, got {key.dtype}")
    dtype = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    out = key.detach().to(dtype).contiguous()
    if key.dtype == torch.bool or key.numel() == 0:
        return out
    if key.dtype != dtype:
        # a narrowing cast may merge two keys (float64 1 + 1e-12 and 1, or int64 2^24 + 1 and 2^24):
        # checked here also for the fused ops, which only see the cast key (a key already in the
        # dtype of the ranks needs no check, and costs no host sync on a GPU); NaN != NaN is left
        # to the finiteness check
        back = out.to(key.dtype)
        if not bool(((back == key) | torch.isnan(out)).all()):
            raise ValueError(f"{fn}: `key` has values that {dtype} (the dtype the ranks are computed in) does not "
                             "represent exactly, so keys that differ would compare equal; pass fewer distinct "
                             "levels, or float64 scores")
    if values and key.dtype.is_floating_point and not bool(torch.isfinite(key).all()):
        raise ValueError(f"{fn}: `key` must be finite, got NaN or inf values")
    return out


def check_relevance(fn: str, relevance: Any, scores: torch.Tensor, values: bool = True) -> torch.Tensor:
    """(Q, N) graded relevance: floating, integer or bool, finite, >= 0, on the device of scores.

    Returns it detached in the dtype the ranks are computed in (that of scores, float32 for
    half scores), where it is checked as well: a value that does not survive the cast (float64
    1e-50 becomes 0 in float32 and 1e39 inf; a subnormal is flushed on GPUs) is rejected."""
    q, n = scores.shape
    if not isinstance(relevance, torch.Tensor):
        raise TypeError(f"{fn}: `relevance` must be a (Q, N) tensor of graded relevance, got {_describe(relevance)}")
    if tuple(relevance.shape) != (q, n):
        raise ValueError(f"{fn}: `relevance` must have the shape of scores {(q, n)}, got {tuple(relevance.shape)}")
    if relevance.device != scores.device:
        raise ValueError(f"{fn}: `relevance` is on {relevance.device} but `scores` is on {scores.device}")
    if relevance.dtype.is_complex or not (
        relevance.dtype.is_floating_point or relevance.dtype in INT_DTYPES or relevance.dtype == torch.bool
    ):
        raise TypeError(f"{fn}: `relevance` must be a floating or integer tensor, got {relevance.dtype}")
    dtype = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    rel = relevance.detach().to(dtype).contiguous()
    # values=False: a fused op checks the values (finite, >= 0, normal) in its own pass, on the
    # cast relevance; a narrowing float cast can still turn a value into 0, so that one is checked here
    lossless = relevance.dtype == dtype or not relevance.dtype.is_floating_point
    if (not values and lossless) or relevance.dtype == torch.bool or relevance.numel() == 0:
        return rel
    # one reduction pass (aminmax propagates NaN); isfinite + any would take three
    stats = list(torch.aminmax(relevance))
    if relevance.dtype.is_floating_point:  # integers cannot underflow
        stats.append(torch.where(relevance > 0, relevance, torch.inf).amin())
    lo, hi, *smallest = torch.stack(stats).double().tolist()  # one host sync
    if math.isnan(lo) or math.isinf(hi) or math.isinf(lo):
        raise ValueError(f"{fn}: `relevance` must be finite, got NaN or inf values")
    if lo < 0:
        raise ValueError(f"{fn}: `relevance` must be >= 0 (0 = irrelevant), got a minimum of {lo!r}")
    info = torch.finfo(dtype)
    # the cast is monotone: its extremes are the casts of the extremes
    if math.isinf(torch.tensor(hi, dtype=torch.float64).to(dtype).item()):
        raise ValueError(
            f"{fn}: `relevance` has values up to {hi:g}, beyond the largest {dtype} ({info.max:g}), the dtype "
            "the ranks are computed in; rescale the relevance or pass float64 scores"
        )
    if smallest and math.isfinite(smallest[0]) and torch.tensor(smallest[0], dtype=torch.float64).to(dtype) < info.tiny:
        raise ValueError(
            f"{fn}: `relevance` has positive values down to {smallest[0]:g}, below the smallest normal {dtype} "
            f"({info.tiny:g}), the dtype the ranks are computed in (they become 0 or lose their precision); "
            "rescale the relevance or pass float64 scores"
        )
    return rel


def check_ignore(fn: str, ignore: Any, scores: torch.Tensor, values: bool = True) -> None:
    """None, a (Q,) integer index of one item per query (-1 = none), or a (Q, N) bool mask (True = ignored).
    values=False skips the range of the index (a host sync): for a fused op that checks it."""
    if ignore is None:
        return
    q, n = scores.shape
    if not isinstance(ignore, torch.Tensor):
        raise TypeError(
            f"{fn}: `ignore` must be None, a (Q,) int64 index or a (Q, N) bool mask, got {_describe(ignore)}"
        )
    check_storage(fn, "`ignore`", ignore)
    if ignore.device != scores.device:
        raise ValueError(f"{fn}: `ignore` is on {ignore.device} but `scores` is on {scores.device}")
    if ignore.dtype == torch.bool:
        if tuple(ignore.shape) != (q, n):
            raise ValueError(f"{fn}: `ignore` as a bool mask must have shape {(q, n)}, got {tuple(ignore.shape)}")
        return
    if ignore.dtype not in INT_DTYPES:
        raise TypeError(f"{fn}: `ignore` must be an integer index (Q,) ({_dtype_names(INT_DTYPES)}) or a bool "
                        f"mask (Q, N), got {ignore.dtype}")
    if tuple(ignore.shape) != (q,):
        raise ValueError(f"{fn}: `ignore` as an index must have shape ({q},), got {tuple(ignore.shape)}")
    if values and ignore.numel() and (int(ignore.min()) < -1 or int(ignore.max()) >= n):
        raise ValueError(
            f"{fn}: `ignore` indices must lie in [-1, {n - 1}] (-1 = none), got values in "
            f"[{int(ignore.min())}, {int(ignore.max())}]"
        )


def check_backend(fn: str, backend: Optional[str], choices: Sequence[str]) -> None:
    if backend is not None and (not isinstance(backend, str) or backend not in choices):
        raise ValueError(f"{fn}: `backend` must be None or one of {', '.join(map(repr, choices))}, got {backend!r}")
