"""Op keys of older benchmark CSVs, mapped to today's keys (the public function names).

The committed CSVs under bench/results/ were written before the op keys became the
public function names, and they stay as they were measured; whatever reads a CSV maps
its `op` column through `current_op_key`, so an old run still re-plots and compares with
a new one. This module imports nothing heavy: tools/gpu_check.py reads CSVs without
importing torch.
"""
from __future__ import annotations

from typing import Dict

RENAMED_OP_KEYS: Dict[str, str] = {
    "supap": "sup_ap",
    "smoothap": "smooth_ap",
    "recall": "recall_at_k",
    "fastap": "histogram_ap:fastap",
    "softbin": "histogram_ap:softbin",
    "hap": "h_ap",
}


def current_op_key(key: str) -> str:
    """The key an op has now, for a key read from a CSV (old or new)."""
    return RENAMED_OP_KEYS.get(key, key)
