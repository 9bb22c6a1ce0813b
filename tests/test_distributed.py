"""Global ranking over 2 gloo processes on CPU: summed per-rank gradients equal single-process ones."""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastrank
from fastrank.distributed import gather_gallery
from fastrank.losses import FastAPLoss, SmoothAPLoss, SupAPLoss

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

LOSSES = {"smoothap": SmoothAPLoss, "supap": SupAPLoss, "fastap": FastAPLoss}


def _data():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(13, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3, 3, 2, 0, 1])
    return emb, labels


SPLIT = 6  # rank 0 holds rows [0, 6), rank 1 rows [6, 13): unequal local batches


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        emb, labels = _data()
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        for name, cls in LOSSES.items():
            local = emb[rows].clone().requires_grad_()
            all_emb, all_labels, self_index = gather_gallery(local, labels[rows])
            # mean over local queries times their count: the per-rank losses add up to the global sum
            loss = cls()(local, labels[rows], all_emb, all_labels, self_index=self_index) * local.shape[0]
            loss.backward()
            torch.save({"grad": local.grad, "loss": loss.detach()}, os.path.join(out_dir, f"{name}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    if sys.platform != "linux":
        pytest.skip("spawned gloo workers tested on Linux")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_two_rank_gradients_match_single_process(name, two_rank_results):
    parts = [torch.load(os.path.join(two_rank_results, f"{name}_{r}.pt")) for r in range(2)]
    emb, labels = _data()
    e = emb.clone().requires_grad_()
    loss_fn = LOSSES[name]()
    # single process: every query of the concatenated batch, same include_self convention
    per_query_sum = loss_fn(e, labels) * emb.shape[0]
    per_query_sum.backward()
    torch.testing.assert_close(parts[0]["loss"] + parts[1]["loss"], per_query_sum.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([parts[0]["grad"], parts[1]["grad"]]), e.grad, rtol=1e-9, atol=1e-10)


def test_gather_gallery_without_process_group_is_identity():
    emb, labels = _data()
    all_emb, all_labels, idx = gather_gallery(emb, labels)
    assert all_emb is emb and all_labels is labels and torch.equal(idx, torch.arange(13))
    with pytest.raises(ValueError, match="`labels` must have shape"):
        gather_gallery(emb, labels[:3])
    assert fastrank.distributed.all_gather_with_grad(emb) is emb


def test_gather_gallery_arguments_are_checked_without_a_process_group():
    # the checks run before the process-group test, so a bad call fails the same on one rank as on many
    emb, labels = _data()
    with pytest.raises(TypeError, match="gather_gallery: `embeddings` must be a tensor"):
        gather_gallery(emb.tolist(), labels)
    with pytest.raises(ValueError, match=r"gather_gallery: `embeddings` must be 2-D \(batch, dim\)"):
        gather_gallery(emb[0], labels)
    with pytest.raises(TypeError, match="gather_gallery: `labels` must be a tensor"):
        gather_gallery(emb, labels.tolist())
    with pytest.raises(ValueError, match="gather_gallery: `labels` is on the meta device"):
        gather_gallery(emb, labels.to("meta"))
    with pytest.raises(TypeError, match="all_gather_with_grad: `x` must be a tensor"):
        fastrank.distributed.all_gather_with_grad(emb.tolist())
