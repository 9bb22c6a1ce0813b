"""Data-parallel training over 2 gloo processes on CPU.

* `fastrank.distributed.global_batch_loss`: the shares of 2 ranks (unequal batches, queries
  without positives, ties) reproduce the one-process loss and, averaged as DDP does, its gradient;
* pytorch-metric-learning's DistributedLossWrapper with every fastrank drop-in, efficient=False
  (exact global gradients) and efficient=True (PML's local-anchor objective);
* examples/train_ddp.py under torchrun: 2 processes with B/2 each follow one process with B in lockstep.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastrank import losses as L
from fastrank.distributed import global_batch_loss

pytestmark = pytest.mark.skipif(not (dist.is_available() and sys.platform == "linux"),
                                reason="spawned gloo workers tested on Linux with torch.distributed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


# ----------------------------------------------------------------------------- global_batch_loss

MODULES = {
    "smoothap": lambda: L.SmoothAPLoss(),
    "smoothap_noself": lambda: L.SmoothAPLoss(include_self=False),
    "supap": lambda: L.SupAPLoss(),
    "roadmap": lambda: L.ROADMAPLoss(w_ap=0.9, w_calibration=0.1),
    "calibration": lambda: L.CalibrationLoss(),
    "recall": lambda: L.RecallAtKLoss(ks=(1, 2, 4)),
    "recall_patel": lambda: L.RecallAtKLoss(ks=(1, 2, 4), variant="patel"),
    "fastap": lambda: L.FastAPLoss(),
    "softbin": lambda: L.SoftBinAPLoss(range=(-1.0, 1.0)),
}
SPLIT = 6  # rank 0: rows [0, 6), rank 1: rows [6, 15)


def _gbl_data():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(15, 5, generator=g, dtype=torch.float64)
    emb[9] = emb[2]  # an exact tie across ranks (same label: a tied positive)
    emb[12] = emb[13]  # a tie within rank 1 (different labels)
    # label 7 and 8 appear once: without the query's own entry those queries have no positive, and
    # rank 0 has 4 of 6 valid queries against rank 1's 8 of 9, so a per-rank mean would be wrong
    labels = torch.tensor([0, 7, 1, 8, 0, 1, 2, 0, 2, 1, 3, 3, 2, 0, 1])
    return emb, labels


def _gbl_worker(rank, port, out_dir):
    _init(rank, port)
    try:
        emb, labels = _gbl_data()
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        for name, make in MODULES.items():
            local = emb[rows].clone().requires_grad_()
            share = global_batch_loss(make(), local, labels[rows])
            share.backward()
            torch.save({"share": share.detach(), "grad": local.grad}, os.path.join(out_dir, f"{name}_{rank}.pt"))
        # a module without labels (graded) or not fastrank's: the same error on every rank
        for bad in (L.NDCGLoss(), torch.nn.MSELoss()):
            try:
                global_batch_loss(bad, emb[rows], labels[rows])
            except TypeError as e:
                assert "global_batch_loss: `loss_fn` must be one of fastrank.losses" in str(e), e
            else:
                raise AssertionError(f"{type(bad).__name__} accepted")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gbl_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gbl")
    mp.spawn(_gbl_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("name", list(MODULES))
def test_global_batch_loss_reproduces_one_process(name, gbl_results):
    parts = [torch.load(os.path.join(gbl_results, f"{name}_{r}.pt")) for r in range(WORLD)]
    emb, labels = _gbl_data()
    e = emb.clone().requires_grad_()
    loss = MODULES[name]()(e, labels)
    loss.backward()
    # float64 end to end; the shares' rescaling by counts and the all-reduces add a few ulps
    torch.testing.assert_close(sum(p["share"] for p in parts) / WORLD, loss.detach(), rtol=1e-12, atol=1e-13)
    # DDP averages the parameter gradients over ranks: the embedding gradients divided by W
    grad = torch.cat([p["grad"] for p in parts]) / WORLD
    torch.testing.assert_close(grad, e.grad, rtol=1e-10, atol=1e-12)
    assert e.grad.abs().max() > 1e-3  # the comparison is not between two zero gradients


def test_global_batch_loss_without_process_group_is_the_module():
    emb, labels = _gbl_data()
    for make in MODULES.values():
        mod = make()
        assert torch.equal(global_batch_loss(mod, emb, labels), mod(emb, labels))
    with pytest.raises(TypeError, match="global_batch_loss: `loss_fn` must be one of fastrank.losses"):
        global_batch_loss(L.HAPLoss(), emb, labels)
    with pytest.raises(TypeError, match="global_batch_loss: `loss_fn` must be one of fastrank.losses"):
        global_batch_loss(lambda e, y: e.sum(), emb, labels)


# ----------------------------------------------------------------------------- PML's DistributedLossWrapper

# each drop-in (with its arguments) and the fastrank.losses module computing the same loss (the reference);
# Recall@k with tau 0.1: at the default 0.01 its sigmoids saturate on 12 items and the gradient is ~1e-6
PML_CASES = {
    "SmoothAPLoss": ({}, lambda: L.SmoothAPLoss(tau=0.01)),
    "SupAPLoss": ({}, lambda: L.SupAPLoss()),
    "RecallAtKLoss": ({"ks": (1, 2, 4), "tau": 0.1}, lambda: L.RecallAtKLoss(ks=(1, 2, 4), tau=0.1)),
    "FastAPLoss": ({}, lambda: L.FastAPLoss(bins=10)),
    "SoftBinAPLoss": ({}, lambda: L.SoftBinAPLoss(bins=25, range=(0.0, 1.0))),
}
PER_RANK = 6  # PML's all_gather needs equal batches


def _pml_data():
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(WORLD * PER_RANK, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 4, 1, 2, 0, 1, 2, 3, 3])  # label 4: no positive without itself
    return emb, labels


def _pml_worker(rank, port, out_dir):
    import warnings

    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    from fastrank.integrations import pml as P

    _init(rank, port)
    try:
        emb, labels = _pml_data()
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for name in PML_CASES:
            for efficient in (False, True):
                local = emb[rows].clone().requires_grad_()
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # no "non-distributed setting" fallback
                    loss_fn = getattr(P, name)(**PML_CASES[name][0])
                    loss = DistributedLossWrapper(loss_fn, efficient=efficient)(local, labels[rows])
                loss.backward()
                torch.save({"loss": loss.detach(), "grad": local.grad},
                           os.path.join(out_dir, f"{name}_{efficient}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def pml_results(tmp_path_factory):
    pytest.importorskip("pytorch_metric_learning")
    out = tmp_path_factory.mktemp("pml")
    mp.spawn(_pml_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("name", PML_CASES)
def test_pml_distributed_wrapper_exact(name, pml_results):
    """efficient=False: every rank computes the global loss (gradients through its own rows), times
    W; DDP's average of the gradients is the one-process gradient."""
    from fastrank.integrations import pml as P

    parts = [torch.load(os.path.join(pml_results, f"{name}_False_{r}.pt")) for r in range(WORLD)]
    emb, labels = _pml_data()
    e = emb.clone().requires_grad_()
    loss = getattr(P, name)(**PML_CASES[name][0])(e, labels)
    loss.backward()
    for p in parts:  # PML's gathered batch puts this rank's rows first: the same loss, permuted
        torch.testing.assert_close(p["loss"], WORLD * loss.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]) / WORLD, e.grad, rtol=1e-10, atol=1e-12)
    assert e.grad.abs().max() > 1e-3


@pytest.mark.parametrize("name", PML_CASES)
def test_pml_distributed_wrapper_efficient(name, pml_results):
    """efficient=True: rank r's queries against the gathered batch (gradients through rank r's rows
    only: PML's documented approximation), times W. FastAP and SoftBin leave each query's own
    entry out of the gathered gallery, as on one process."""
    parts = [torch.load(os.path.join(pml_results, f"{name}_True_{r}.pt")) for r in range(WORLD)]
    emb, labels = _pml_data()
    for r, p in enumerate(parts):
        rows = slice(r * PER_RANK, (r + 1) * PER_RANK)
        q = emb[rows].clone().requires_grad_()
        gallery = torch.cat([emb[: rows.start], q, emb[rows.stop:]])  # the other ranks' rows: constants
        self_index = torch.arange(rows.start, rows.stop)
        ref = PML_CASES[name][1]()(q, labels[rows], gallery, labels, self_index=self_index) * WORLD
        ref.backward()
        torch.testing.assert_close(p["loss"], ref.detach(), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(p["grad"], q.grad, rtol=1e-10, atol=1e-12)


def test_pml_cross_batch_memory_keeps_its_convention():
    """Inside CrossBatchMemory the memory may hold the batch at rows 0..B-1 (after the queue wraps
    to 0): the drop-ins do not take that for the distributed layout, so every step has the memory's
    documented convention (the batch's own memory copies are seen)."""
    pytest.importorskip("pytorch_metric_learning")
    from fastrank.integrations import pml as P

    g = torch.Generator().manual_seed(1)
    xbm = P.CrossBatchMemory(P.FastAPLoss(), embedding_size=4, memory_size=8)
    labels = torch.tensor([0, 1, 0, 1])
    for step in range(3):  # memory of 2 batches: step 2 writes the batch at rows 0..3 again
        emb = torch.randn(4, 4, generator=g, dtype=torch.float64)
        got = xbm(emb, labels)
    mem_e, mem_l = xbm.embedding_memory, xbm.label_memory
    assert torch.equal(mem_e[:4], emb)  # the layout that DistributedLossWrapper(efficient=True) has too
    want = L.FastAPLoss(bins=10)(emb, labels, mem_e, mem_l)  # nothing left out
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    # the same gallery passed directly (the distributed layout): each query's own row is left out
    direct = P.FastAPLoss()(emb, labels, ref_emb=mem_e, ref_labels=mem_l)
    torch.testing.assert_close(direct, L.FastAPLoss(bins=10)(emb, labels, mem_e, mem_l, self_index=torch.arange(4)),
                               rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------- the torchrun example


def _run_example(tmp_path, dtype, extra=()):
    pytest.importorskip("sklearn")
    out = tmp_path / dtype
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", os.path.join(ROOT, "examples", "train_ddp.py"), "--loss", "all",
           "--parity", "--epochs", "1", "--max-steps", "3", "--batch", "32", "--device", "cpu", "--dtype", dtype,
           "--no-progress", "--out", str(out),
           *extra]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / f"ddp_results_{dtype}.json") as f:
        return json.load(f), proc.stdout


# float32: losses and gradients are sums over B = 32 queries of rank-sum terms; the two runs add
# them in different orders (per-rank matmuls, all-reduce, DDP's average), a few ulps per term
TOLERANCE = {"float32": (2e-6, 2e-5), "float64": (1e-13, 1e-12)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ddp_example_follows_one_process(tmp_path, dtype):
    res, stdout = _run_example(tmp_path, dtype)
    assert res["config"]["world_size"] == 2 and res["config"]["batch"] == 32
    loss_tol, grad_tol = TOLERANCE[dtype]
    names = set()
    for name, run in res["runs"].items():
        names.add(name)
        steps = run["lockstep"]
        assert len(steps) == 3
        for s in steps:
            assert s["loss_diff"] <= loss_tol, (name, s)
            assert s["grad_diff"] <= grad_tol * s["grad_max"], (name, s)
            assert s["grad_max"] > 0
        # the independent one-process run took the same first step from the same weights
        assert abs(run["independent_losses"][0] - run["ddp_losses"][0]) <= loss_tol
        assert set(run["final_metrics"]) >= {"R@1", "mAP@R"}
    assert names == {"smoothap", "supap", "roadmap", "recall", "fastap", "softbin"}
    assert "Parity" in stdout and stdout.count("lockstep") >= 1
