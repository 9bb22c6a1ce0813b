"""GPU facts for the benchmark: the special-function-unit ceiling of docs/design.md §4, and device/version strings.

The ceiling is a paper figure, not a measurement: a fused rank kernel evaluates one
sigma per pair (per pass), and on Hopper the special-function unit (SFU, the MUFU
instructions: ex2, rcp, tanh.approx, ...) returns 16 results per SM per clock. With
sigma(x) = 0.5 + 0.5 * tanh.approx(x / 2) a sigma costs one SFU op, so

    ceiling [sigma/s] = 16 * SMs * boost clock

and 1 / (1 + exp(-x)) (ex2 + rcp) costs two, halving what a kernel can reach.

Sources:
  * 16 results / clock / SM: NVIDIA CUDA C++ Programming Guide, "Arithmetic
    Instructions" throughput table, compute capability 9.0 row "32-bit floating-point
    reciprocal, reciprocal square root, base-2 logarithm (__log2f), base 2 exponential
    (exp2f), sine (__sinf), cosine (__cosf)".
  * SM counts and max boost clocks: NVIDIA H100 Tensor Core GPU datasheet and the
    "NVIDIA H100 Tensor Core GPU Architecture" whitepaper (H100 SXM5: 132 SMs; H100
    PCIe: 114 SMs, 1755 MHz per the H100 PCIe product brief PB-11133-001); NVIDIA H200
    datasheet (the same GH100 with 132 SMs and HBM3e). Boost clocks are cross-checked
    against the datasheets' FP32 peaks: FP32 TFLOPS = SMs * 128 FMA * 2 * clock
    (H100/H200 SXM 66.9-67 TFLOPS -> 1.98 GHz; PCIe 51 -> 1.755 GHz; NVL 60 -> 1.785 GHz).

docs/design.md §4 quotes ~3.9e12/s for an H100: 16 * 132 SMs * 1.83 GHz (the clock NVIDIA quotes
for sustained tensor-core load). This table uses the max boost clock (1.98 GHz on
SXM, 4.18e12/s), the figure an SFU-bound kernel can reach, so % of ceiling is the
conservative number. The SM count is taken from the device itself when known (a MIG
slice has fewer SMs), the clock from the table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

SFU_RESULTS_PER_SM_PER_CLOCK = 16  # compute capability 9.0 (and 8.x)


@dataclass(frozen=True)
class GpuSpec:
    key: str  # short name, e.g. "H100 SXM"
    sms: int
    boost_mhz: float
    source: str


# most specific pattern first: matched against torch.cuda.get_device_name() case-insensitively
_DATASHEET = "NVIDIA {} datasheet / H100 architecture whitepaper"
GPU_TABLE: Tuple[Tuple[str, GpuSpec], ...] = (
    (r"gh200", GpuSpec("GH200", 132, 1980.0, "NVIDIA GH200 Grace Hopper Superchip datasheet (H100 SXM5-class GPU)")),
    (r"h200\s*nvl", GpuSpec("H200 NVL", 132, 1785.0, _DATASHEET.format("H200 NVL"))),
    (r"h200", GpuSpec("H200 SXM", 132, 1980.0, _DATASHEET.format("H200 (SXM)"))),
    (r"h100\s*nvl", GpuSpec("H100 NVL", 132, 1785.0, _DATASHEET.format("H100 NVL"))),
    (r"h100.*pcie", GpuSpec("H100 PCIe", 114, 1755.0, "NVIDIA H100 PCIe product brief PB-11133-001")),
    # "NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 ...": the SXM5 module
    (r"h100", GpuSpec("H100 SXM", 132, 1980.0, _DATASHEET.format("H100 SXM5"))),
)


def lookup_gpu(name: str) -> Optional[GpuSpec]:
    """The table row of a device name as torch.cuda.get_device_name() spells it, or None."""
    low = name.lower()
    for pattern, spec in GPU_TABLE:
        if re.search(pattern, low):
            return spec
    return None


@dataclass(frozen=True)
class GpuCeiling:
    rate: float  # sigma evaluations/s (NaN when the device is not in the table)
    sms: int
    boost_mhz: float
    text: str


def sfu_ceiling(name: str, sm_count: Optional[int] = None) -> GpuCeiling:
    """docs/design.md §4's GPU ceiling for a device name: 16 SFU results / SM / clock at the max boost clock.

    `sm_count` (from torch.cuda.get_device_properties().multi_processor_count) overrides
    the table's SM count, e.g. for a MIG slice; the clock always comes from the table.
    Unknown devices get a NaN rate (no % of ceiling is reported).
    """
    spec = lookup_gpu(name)
    if spec is None:
        return GpuCeiling(float("nan"), sm_count or 0, float("nan"),
                          f"no SFU ceiling: {name!r} is not in bench/gpu.py's GPU_TABLE")
    sms = int(sm_count) if sm_count else spec.sms
    rate = SFU_RESULTS_PER_SM_PER_CLOCK * sms * spec.boost_mhz * 1e6
    note = "" if sms == spec.sms else f" (device reports {sms} SMs; table {spec.sms})"
    return GpuCeiling(
        rate, sms, spec.boost_mhz,
        f"SFU ceiling {rate / 1e12:.2f} T sigma/s = {SFU_RESULTS_PER_SM_PER_CLOCK}/SM/clk x {sms} SMs x "
        f"{spec.boost_mhz:.0f} MHz ({spec.key}{note}; source: {spec.source}; CUDA C++ Programming Guide cc 9.0)",
    )


def slug(name: str) -> str:
    """A file-name-safe form of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def device_ceiling(index: int = 0) -> Tuple[str, GpuCeiling]:
    """(device name, ceiling) of a visible CUDA device."""
    import torch

    props = torch.cuda.get_device_properties(index)
    return props.name, sfu_ceiling(props.name, props.multi_processor_count)
