"""Block sizes of the chunked PyTorch backends: every `torch` backend evaluates at most
~FASTRANK_TORCH_CHUNK elements at a time (default 2^22), so its memory is O(Q*N + chunk)."""
from __future__ import annotations

from typing import Iterator, Tuple

from . import validate as V


def chunk_elements() -> int:
    """The element budget of one block (the one reader of FASTRANK_TORCH_CHUNK)."""
    return V.env_positive_int("FASTRANK_TORCH_CHUNK", 1 << 22)


def blocks(q: int, p: int, n: int) -> Iterator[Tuple[int, int, int, int]]:
    """(q0, q1, p0, p1) blocks of query rows x ranked items, each of at most ~chunk_elements()
    pair evaluations (P * N per query row): whole rows while a row fits, else slices of one row."""
    budget = max(1, chunk_elements())
    per_row = max(1, p * n)
    if per_row <= budget:
        rows = max(1, budget // per_row)
        for q0 in range(0, q, rows):
            yield q0, min(q, q0 + rows), 0, p
    else:
        cols = max(1, budget // max(1, n))
        for q0 in range(q):
            for p0 in range(0, p, cols):
                yield q0, q0 + 1, p0, min(p, p0 + cols)


def rows_per_chunk(n: int, width: int) -> int:
    """Query rows per block when each row costs N * width elements (the histograms' (N, bins))."""
    return max(1, chunk_elements() // max(1, n * width))
