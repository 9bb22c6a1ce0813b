"""Cross-batch memory (XBM, Wang et al., CVPR 2020): a ring buffer of detached embeddings
and labels that the current batch is ranked against (a rectangular Q x N problem).

    xbm = CrossBatchMemory(size=4096, dim=128)
    slots = xbm.enqueue(emb, labels)                 # the batch's own slots in the memory
    mem_emb, mem_labels = xbm.get()
    loss = SupAPLoss()(emb, labels, mem_emb, mem_labels, self_index=slots)

`self_index` tells the loss where each query sits in the gallery, so `include_self`
applies to memory galleries exactly as to in-batch ones.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .core import validate as V

Tensor = torch.Tensor


class CrossBatchMemory:
    """Fixed-size FIFO of (embedding, label) pairs, oldest overwritten first.

    Args:
        size: number of slots.
        dim: embedding dimension.
        dtype, device: of the stored embeddings (labels are int64).
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None) -> None:
        fn = "CrossBatchMemory"
        size = V.check_integer(fn, "size", size, 1)
        dim = V.check_integer(fn, "dim", dim, 1)
        # an integer memory would truncate every stored embedding
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"{fn}: `dtype` must be a floating torch.dtype (embeddings are stored in it), "
                            f"got {dtype!r}")
        if device is not None and torch.device(device).type == "meta":
            raise ValueError(f"{fn}: `device` is the meta device, which stores no data")
        self.size, self.dim = size, dim
        self.embeddings = torch.zeros(size, dim, dtype=dtype, device=device)
        self.labels = torch.zeros(size, dtype=torch.int64, device=device)
        self.ptr = 0  # next slot to write
        self.count = 0  # filled slots

    def __len__(self) -> int:
        return self.count

    def enqueue(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Stores a detached copy of the batch; returns the (B,) slots it went to, as indices into `get()`.

        A batch larger than the memory keeps only its last `size` items; the returned index is
        -1 for the items that did not fit.
        """
        fn = "CrossBatchMemory.enqueue"
        if not isinstance(embeddings, Tensor) or not embeddings.is_floating_point():
            raise TypeError(f"{fn}: `embeddings` must be a 2-D floating tensor (B, {self.dim}), "
                            f"got {V._describe(embeddings)}")
        if not isinstance(labels, Tensor):
            raise TypeError(f"{fn}: `labels` must be a 1-D integer tensor, got {V._describe(labels)}")
        V.check_storage(fn, "`embeddings`", embeddings)
        V.check_storage(fn, "`labels`", labels)
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"{fn}: `embeddings` must be (B, {self.dim}), got {tuple(embeddings.shape)}")
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"{fn}: `labels` must be ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        if labels.dtype not in V.LABEL_DTYPES:
            raise TypeError(f"{fn}: `labels` must be integers ({V._dtype_names(V.LABEL_DTYPES)}), got {labels.dtype}")
        # the loss ranks the batch against get(): both must live on one device, and a silent
        # cross-device copy here would hide a transfer per step
        if embeddings.device != self.embeddings.device:
            raise ValueError(f"{fn}: `embeddings` is on {embeddings.device} but the memory is on "
                             f"{self.embeddings.device}; create the memory with device={embeddings.device}")
        b = embeddings.shape[0]
        keep = min(b, self.size)
        first = b - keep
        slots = (self.ptr + torch.arange(keep, device=self.embeddings.device)) % self.size
        self.embeddings[slots] = embeddings[first:].detach().to(self.embeddings.dtype)
        self.labels[slots] = labels[first:].to(self.labels.device, torch.int64)
        self.ptr = (self.ptr + keep) % self.size
        self.count = min(self.size, self.count + keep)
        out = torch.full((b,), -1, dtype=torch.int64, device=self.embeddings.device)
        out[first:] = slots
        # get() returns the filled prefix until the buffer wraps, so slots are valid indices into it
        return out

    def get(self) -> Tuple[Tensor, Tensor]:
        """(embeddings, labels) of the filled slots, in slot order."""
        return self.embeddings[: self.count], self.labels[: self.count]
