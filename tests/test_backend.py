"""Backend selection: argument, FASTRANK_BACKEND, auto; unavailable backends explain themselves."""
import pytest
import torch

import fastrank
from fastrank.core import backend as _backend

S = torch.rand(4, 6, dtype=torch.float64)
LAB = (torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1, 2, 2]))


def test_backends_report_every_backend_with_a_reason():
    info = fastrank.backends()
    assert set(info) == set(fastrank.BACKENDS)
    for name, b in info.items():
        assert isinstance(b.available, bool) and b.reason, name
    assert info["naive"].available and info["torch"].available


def test_auto_picks_cpp_on_cpu_when_built(monkeypatch):
    monkeypatch.delenv("FASTRANK_BACKEND", raising=False)
    expect = "cpp" if fastrank.backends()["cpp"].available else "torch"
    assert _backend.resolve("f", None, torch.device("cpu")) == expect
    assert _backend.resolve("f", "auto", torch.device("cpu")) == expect


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTRANK_BACKEND", "naive")
    assert _backend.resolve("f", None, torch.device("cpu")) == "naive"
    # an explicit argument wins over the environment
    assert _backend.resolve("f", "torch", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("name", [n for n, b in fastrank.backends().items() if not b.available])
def test_unavailable_backend_raises_with_reason(name):
    with pytest.raises(RuntimeError, match=f"backend {name!r} is not available"):
        fastrank.sup_ap(S, LAB, backend=name)


def test_results_agree_across_selection_paths(monkeypatch):
    ref = fastrank.sup_ap(S, LAB, backend="naive")
    monkeypatch.setenv("FASTRANK_BACKEND", "torch")
    torch.testing.assert_close(fastrank.sup_ap(S, LAB), ref)
    monkeypatch.setenv("FASTRANK_BACKEND", "auto")
    torch.testing.assert_close(fastrank.sup_ap(S, LAB), ref)


def test_cpp_refuses_non_cpu_tensors():
    if not fastrank.backends()["cpp"].available:
        pytest.skip("cpp not built")
    with pytest.raises(ValueError, match="backend 'cpp' runs on CPU tensors"):
        _backend.resolve("f", "cpp", torch.device("meta"))


def test_triton_kernels_package_is_importable():
    import fastrank.triton_kernels  # noqa: F401  (the package-dir mapping of the editable install)


# ---- GPU evidence: `auto` on CUDA prefers the more verified GPU backend (issue 13)


def _evidence(monkeypatch, tmp_path, **entries):
    path = tmp_path / "gpu_evidence.json"
    path.write_text(__import__("json").dumps(entries))
    monkeypatch.setattr(_backend, "_EVIDENCE_PATH", str(path))


@pytest.mark.parametrize("entries, order", [
    ({}, ["triton", "cuda"]),  # neither verified: Triton, the interpreter-tested one
    ({"cuda": None, "triton": None, "preferred_on_cuda": "cuda"}, ["triton", "cuda"]),  # no evidence: ignored
    ({"cuda": "bench/results/x/summary.md"}, ["cuda", "triton"]),
    ({"triton": "bench/results/x/summary.md"}, ["triton", "cuda"]),
    ({"cuda": "a", "triton": "b", "preferred_on_cuda": "cuda"}, ["cuda", "triton"]),
    ({"cuda": "a", "triton": "b", "preferred_on_cuda": "triton"}, ["triton", "cuda"]),
    ({"cuda": "a", "triton": "b", "preferred_on_cuda": "bogus"}, ["triton", "cuda"]),
])
def test_cuda_preference_follows_the_evidence(monkeypatch, tmp_path, entries, order):
    _evidence(monkeypatch, tmp_path, **entries)
    assert _backend.cuda_preference() == order


def test_unreadable_evidence_means_nothing_verified(monkeypatch, tmp_path):
    path = tmp_path / "gpu_evidence.json"
    path.write_text("{not json")
    monkeypatch.setattr(_backend, "_EVIDENCE_PATH", str(path))
    assert _backend.gpu_evidence() == {"cuda": None, "triton": None, "preferred_on_cuda": None}
    assert _backend.cuda_preference() == ["triton", "cuda"]


def test_backends_report_gpu_verification(monkeypatch, tmp_path):
    info = fastrank.backends()
    for b in ("cuda", "triton"):
        assert "verified on a GPU" in info[b].reason
    _evidence(monkeypatch, tmp_path, triton="bench/results/gpu_x/summary.md")
    info = fastrank.backends()
    assert info["triton"].gpu_verified == "bench/results/gpu_x/summary.md"
    assert "bench/results/gpu_x/summary.md" in info["triton"].reason
    assert info["cuda"].gpu_verified is None and "not yet verified" in info["cuda"].reason


def test_committed_evidence_names_existing_summaries():
    # a backend may only be called verified by a summary that is in the repository
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for b, path in _backend.gpu_evidence().items():
        if b in ("cuda", "triton") and path:
            assert os.path.exists(os.path.join(root, path)), (b, path)
