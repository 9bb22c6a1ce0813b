"""64-bit offsets: a CPU kernel on a (2, 2^30 + 8) matrix, whose second row starts past 2^31 elements.

8.6 GB of float32 scores: marked slow (`make test-slow`). With 32-bit row offsets the kernel would
read row 1 from the wrong place (or crash); the histograms of row 1 are known exactly.
"""
import pytest
import torch

from fastrank.core.problem import build_problem
from fastrank.histogram import histogram_params
from fastrank.core.registry import register_cpp_ops

from .conftest import requires


@pytest.mark.slow
@requires("cpp")
def test_histogram_kernel_offsets_beyond_2_pow_31():
    n = (1 << 30) + 8
    # s = 5 puts x = 2 - 2s = -8 outside FastAP's [0, 4]: those items fall in no bin, so the few
    # that do are counted exactly in float32
    scores = torch.full((2, n), 5.0, dtype=torch.float32)
    scores[0, :3] = 1.0  # x = 0: bin 0
    scores[1, 0] = -1.0  # x = 4: the last bin; the first element of row 1 sits at offset 2^30 + 8
    scores[1, -3:] = 0.0  # x = 2: the middle bin, at offsets just below 2^31 + 16
    assert scores.numel() > 2**31
    pos_idx = torch.tensor([[0, -1], [n - 1, n - 2]])  # positives: one in row 0, two at the far end of row 1
    register_cpp_ops()
    p = histogram_params("fastap", 10, (0.0, 1.0))
    h_all, h_pos = torch.ops.fastrank.histogram_fwd(scores, pos_idx, None, None, *p.as_op_args())
    assert h_all[0, 0].item() == 3 and h_all[0].sum().item() == 3
    assert h_all[1, 10].item() == 1 and h_all[1, 5].item() == 3 and h_all[1].sum().item() == 4
    assert h_pos[1, 5].item() == 2 and h_pos[1].sum().item() == 2
    assert h_pos[0, 0].item() == 1 and h_pos[0].sum().item() == 1
