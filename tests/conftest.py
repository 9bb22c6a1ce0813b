import os

import torch

# Triton's interpreter must be chosen before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastrank  # noqa: E402

AVAILABLE = [name for name, info in fastrank.backends().items() if info.available]
CPU_BACKENDS = [b for b in ("naive", "torch", "cpp") if b in AVAILABLE]
FUSED_CPU = [b for b in ("torch", "cpp") if b in AVAILABLE]


def requires(backend: str):
    info = fastrank.backends()[backend]
    return pytest.mark.skipif(not info.available, reason=f"{backend}: {info.reason}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
