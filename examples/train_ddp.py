"""Data-parallel training with global ranking: every rank's queries against the gathered batch.

    torchrun --nproc_per_node=2 examples/train_ddp.py                      # Smooth-AP, 2 CPU processes (gloo)
    torchrun --nproc_per_node=2 examples/train_ddp.py --loss all --parity  # the README's parity run
    torchrun --nproc_per_node=8 examples/train_ddp.py                      # 8 GPUs: nccl, one GPU per process
    python examples/train_ddp.py                                           # one process (world size 1)

The same data, model, sampler and metrics as ``examples/train_retrieval.py`` (scikit-learn's
digits, MLP 64-128-128-32, Adam, class-balanced P x K batches, exact test metrics), trained with
``torch.nn.parallel.DistributedDataParallel``:

* ``--batch`` is the **global** batch B. Every rank draws the same global batches from the same
  seed (no communication) and takes its contiguous part: B / W rows with W processes.
* Each rank embeds its rows and calls :func:`fastrank.distributed.global_batch_loss`, which
  all-gathers the embeddings and labels (:func:`fastrank.distributed.gather_gallery`, gradients
  routed back to the rank that owns each row), ranks the local queries against all B items, and
  divides by the **global** number of queries that count (those with a positive; for ROADMAP's
  calibration term, its non-zero pair terms) times W. DDP averages the parameter gradients over
  the W ranks, so the step is that of one process on the whole batch: loss = mean over all B
  queries, gradient = its gradient.
* Per step each rank sends its (B/W, D) embeddings and B/W labels (all-gather), one all-reduce of
  a few counts, the (B, D) embedding gradient in backward (all-reduce) and DDP's gradient
  all-reduce of the model's parameters; scores are never communicated (each rank holds its
  (B/W, B) block).
* Rank 0 evaluates the exact test metrics after every epoch and prints the progress.

``--parity``: rank 0 also checks every step against one process with the whole batch:

1. lockstep: on the DDP model's current weights and the same global batch, the one-process loss
   and parameter gradient (``torch.func.functional_call`` on copies of the weights, so DDP's
   hooks do not fire) against the DDP loss (mean of the ranks' shares) and DDP's averaged
   gradient, before the optimiser step;
2. an independent one-process run from the same seed (same initial weights, same global batches),
   trained alongside on rank 0: its per-step loss against the DDP run's;
3. a control: one process again with every initial weight nudged up by one ulp, against the
   independent run. Training amplifies rounding-sized differences (in float32 visibly within a
   few dozen steps for some losses), so (2) drifts apart where (3) does; lockstep (1) is the
   per-step test.

Devices: CUDA when available (process i on GPU ``LOCAL_RANK``, nccl), else the CPU (gloo);
``--device`` and ``--dist-backend`` override. fastrank backend: ``--backend`` (default cpp on
the CPU where the extension is built, else auto).

``--out DIR`` (rank 0; DTYPE = ``--dtype``): ``ddp_results_DTYPE.json`` (config, per-step and
per-epoch numbers), with ``--parity`` also ``ddp_parity_DTYPE.csv`` (every step of every loss:
DDP loss, lockstep differences, the independent run's loss) and ``ddp_parity_DTYPE.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(_HERE), _HERE):  # fastrank from this checkout, and train_retrieval's pieces
    if _p not in sys.path:
        sys.path.insert(0, _p)

import fastrank  # noqa: E402
from fastrank.distributed import global_batch_loss  # noqa: E402
from train_retrieval import (KS, LOSS_NAMES, LOSSES, ClassBalancedSampler, Data,  # noqa: E402
                             evaluate, load_data, make_model, metrics_header, metrics_row)

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None  # type: ignore[assignment]


class DistributedClassBalancedSampler:
    """ClassBalancedSampler's global batches of P classes x K samples, split across W ranks.

    Every rank builds the same global batches from the same seed, so they agree without
    communicating and all take the same number of steps (DDP needs that); rank r trains on the
    r-th of W contiguous parts (sizes differ by at most one when W does not divide B).
    """

    def __init__(self, labels: torch.Tensor, classes_per_batch: int, samples_per_class: int, seed: int,
                 rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"DistributedClassBalancedSampler: rank must be in [0, {world_size}), got {rank}")
        if classes_per_batch * samples_per_class < world_size:
            raise ValueError(f"DistributedClassBalancedSampler: the global batch ({classes_per_batch} x "
                             f"{samples_per_class}) must have at least one sample per rank ({world_size} ranks)")
        self.sampler = ClassBalancedSampler(labels, classes_per_batch, samples_per_class,
                                            torch.Generator().manual_seed(seed))
        self.rank, self.world_size = rank, world_size

    def epoch(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(global batch, this rank's part) of every step of the next epoch."""
        return [(b, torch.tensor_split(b, self.world_size)[self.rank]) for b in self.sampler.epoch()]


def _lockstep(model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor
              ) -> Tuple[float, List[torch.Tensor]]:
    """One process on the whole batch, on copies of the model's weights: loss and parameter gradients."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    loss = criterion(torch.func.functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    return float(loss.detach()), list(grads)


def train(loss_name: str, args: argparse.Namespace, data: Data, device: torch.device, rank: int, world: int,
          backend: str) -> Optional[dict]:
    """Trains one loss with DDP; rank 0 returns the record (the other ranks None)."""
    dtype = data.x_train.dtype
    torch.manual_seed(args.seed)
    model = make_model(args.dim, dtype).to(device)
    shadow = copy.deepcopy(model) if args.parity and rank == 0 else None  # the independent one-process run
    control = None
    if shadow is not None:  # one process again, every initial weight one ulp up: training's own sensitivity
        control = copy.deepcopy(model)
        with torch.no_grad():
            for p in control.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = LOSSES[loss_name](backend)
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    shadow_opt = torch.optim.Adam(shadow.parameters(), lr=args.lr) if shadow is not None else None
    control_opt = torch.optim.Adam(control.parameters(), lr=args.lr) if control is not None else None
    sampler = DistributedClassBalancedSampler(data.y_train.cpu(), args.classes_per_batch,
                                              args.batch // args.classes_per_batch, args.seed, rank, world)
    plan = [sampler.epoch() for _ in range(args.epochs)]
    if args.max_steps:
        plan = [ep[: max(0, args.max_steps - sum(map(len, plan[:i])))] for i, ep in enumerate(plan)]
        plan = [ep for ep in plan if ep]
    rec: dict = dict(loss=loss_name, ddp_losses=[], independent_losses=[], control_losses=[], lockstep=[],
                     epoch_metrics=[],
                     epoch_losses=[], step_ms=[])
    if rank == 0:
        rec["epoch_metrics"].append(evaluate(model, data))
    bar = None
    if rank == 0 and not args.no_progress and tqdm is not None:
        bar = tqdm(total=sum(map(len, plan)), desc=f"{loss_name:>8s} W={world} B={args.batch}", unit="step",
                   leave=False, mininterval=0.5, dynamic_ncols=True, file=sys.stderr)
    for epoch in plan:
        losses = []
        for global_idx, local_idx in epoch:
            ref = None
            if shadow is not None:  # before the step: the weights the DDP step is about to use
                ref = _lockstep(model, criterion, data.x_train[global_idx], data.y_train[global_idx])
            t0 = time.perf_counter()
            share = global_batch_loss(criterion, ddp(data.x_train[local_idx]), data.y_train[local_idx])
            opt.zero_grad(set_to_none=True)
            share.backward()  # DDP: every parameter gradient is now the average over the ranks
            opt.step()
            step_s = time.perf_counter() - t0
            value = share.detach().clone()
            dist.all_reduce(value)  # the mean of the shares is the loss of the global batch
            loss = float(value) / world
            losses.append(loss)
            if rank != 0:
                continue
            rec["ddp_losses"].append(loss)
            rec["step_ms"].append(step_s * 1000)
            if ref is not None:
                # opt.step() changed the weights, not the gradients the step used
                ref_loss, ref_grads = ref
                dg = max(float((p.grad - g).abs().max()) for p, g in zip(model.parameters(), ref_grads))
                gm = max(float(g.abs().max()) for g in ref_grads)
                rec["lockstep"].append(dict(ref_loss=ref_loss, loss_diff=abs(loss - ref_loss), grad_diff=dg,
                                            grad_max=gm))
                for net, net_opt, key in ((shadow, shadow_opt, "independent_losses"),
                                          (control, control_opt, "control_losses")):
                    s_loss = criterion(net(data.x_train[global_idx]), data.y_train[global_idx])
                    net_opt.zero_grad(set_to_none=True)
                    s_loss.backward()
                    net_opt.step()
                    rec[key].append(float(s_loss.detach()))
            if bar is not None:
                bar.update(1)
        if rank == 0:
            rec["epoch_losses"].append(float(np.mean(losses)))
            rec["epoch_metrics"].append(evaluate(model, data))
            if bar is not None:
                bar.set_postfix(loss=f"{rec['epoch_losses'][-1]:.4f}", R1=f"{rec['epoch_metrics'][-1]['R@1']:.3f}",
                                refresh=False)
    if bar is not None:
        bar.close()
    if rank != 0:
        return None
    rec["final_metrics"] = rec["epoch_metrics"][-1]
    if shadow is not None:
        rec["independent_final_metrics"] = evaluate(shadow, data)
        rec["control_final_metrics"] = evaluate(control, data)
    return rec


# ----------------------------------------------------------------------------- output (rank 0)


def write_outputs(out_dir: str, payload: dict) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []
    tag = payload["config"]["dtype"]
    path = os.path.join(out_dir, f"ddp_results_{tag}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    written.append(path)
    runs = payload["runs"]
    if not any(r["lockstep"] for r in runs.values()):
        return written
    path = os.path.join(out_dir, f"ddp_parity_{tag}.csv")
    with open(path, "w") as f:
        f.write("loss,dtype,world_size,batch,step,ddp_loss,one_process_loss,lockstep_loss_diff,"
                "lockstep_grad_diff,lockstep_grad_max,independent_loss,independent_loss_diff,control_loss,"
                "control_loss_diff\n")
        cfg = payload["config"]
        for name, r in runs.items():
            for i, (l, s, ind, c) in enumerate(zip(r["ddp_losses"], r["lockstep"], r["independent_losses"],
                                                   r["control_losses"])):
                f.write(f"{name},{cfg['dtype']},{cfg['world_size']},{cfg['batch']},{i + 1},{l:.9g},"
                        f"{s['ref_loss']:.9g},{s['loss_diff']:.3e},{s['grad_diff']:.3e},{s['grad_max']:.3e},"
                        f"{ind:.9g},{abs(ind - l):.3e},{c:.9g},{abs(c - ind):.3e}\n")
    written.append(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return written
    cfg = payload["config"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    eps = float(torch.finfo(getattr(torch, cfg["dtype"])).eps)
    floor = eps * 1e-3  # exact zeros on the log axis are drawn here
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, r) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        steps = np.arange(1, len(r["lockstep"]) + 1)
        ls = r["lockstep"]
        axes[0].plot(steps, [max(s["loss_diff"], floor) for s in ls], color=c, ls="none", marker=".", ms=4,
                     label=LOSS_NAMES[name])
        axes[1].plot(steps, [max(s["grad_diff"] / s["grad_max"], floor) for s in ls], color=c, ls="none",
                     marker=".", ms=4)
        d = np.abs(np.array(r["independent_losses"]) - np.array(r["ddp_losses"]))
        dc = np.abs(np.array(r["control_losses"]) - np.array(r["independent_losses"]))
        axes[2].plot(steps, np.maximum(d, floor), color=c, lw=1)
        axes[2].plot(steps, np.maximum(dc, floor), color=c, lw=1, ls=":")
    titles = (f"lockstep: |loss DDP - loss one process|", "lockstep: max |dgrad| / max |grad| (parameters)",
              "independent runs: DDP vs one process (solid),\none process vs one-ulp control (dotted)")
    for ax, title in zip(axes, titles):
        ax.axhline(eps, color="grey", ls=":", lw=1)
        ax.annotate(f"{cfg['dtype']} eps", (1, eps), textcoords="offset points", xytext=(2, 3), fontsize=7,
                    color="grey")
        ax.set(xlabel=f"training step (0 drawn at {floor:.0e})", yscale="log", title=title, ylim=(floor / 3, 1))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"fastrank DDP parity: {cfg['world_size']} processes x B/{cfg['world_size']} = "
                 f"{cfg['batch'] // cfg['world_size']} vs one process x B = {cfg['batch']} ({cfg['device']}, "
                 f"{cfg['dist_backend']}, backend {cfg['backend']}, {cfg['dtype']}, seed {cfg['seed']})", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, f"ddp_parity_{tag}.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)
    return written


# ----------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", default="smoothap", choices=list(LOSSES) + ["all"],
                    help="loss to train with, or 'all' (default: smoothap)")
    ap.add_argument("--backend", default=None, choices=["naive", "torch", "cpp", "triton", "cuda", "auto"],
                    help="fastrank backend (default: cpp on the CPU where built, else auto)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto (default): CUDA when available, one GPU per process (LOCAL_RANK)")
    ap.add_argument("--dist-backend", default="auto", choices=["auto", "gloo", "nccl"],
                    help="process-group backend (default: nccl on CUDA, gloo on the CPU)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs (default 3)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop each run after this many steps (0: no limit)")
    ap.add_argument("--seed", type=int, default=0, help="initial weights and batches (default 0)")
    ap.add_argument("--split-seed", type=int, default=0, help="train/test split (default 0)")
    ap.add_argument("--batch", type=int, default=64, help="global batch B = P x K over all ranks (default 64)")
    ap.add_argument("--classes-per-batch", type=int, default=8, help="P classes per global batch (default 8)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    ap.add_argument("--dim", type=int, default=32, help="embedding dimension (default 32)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="training precision")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--parity", action="store_true",
                    help="rank 0 checks every step against one process with the whole batch")
    ap.add_argument("--out", default=os.path.join("examples", "results"),
                    help="directory for ddp_results_DTYPE.json (+ ddp_parity_DTYPE.csv/png with --parity; '' writes "
                         "nothing)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = ap.parse_args(argv)
    for name in ("epochs", "batch", "classes_per_batch", "dim", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_steps < 0:
        ap.error("--max-steps must be >= 0")
    if args.batch % args.classes_per_batch:
        ap.error(f"--batch {args.batch} must be a multiple of --classes-per-batch {args.classes_per_batch}")
    return args


def _setup(args: argparse.Namespace) -> Tuple[int, int, torch.device, str]:
    """(rank, world size, device, process-group backend); a process group of one without torchrun."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("train_ddp: --device cuda but torch.cuda.is_available() is False")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    pg = args.dist_backend if args.dist_backend != "auto" else ("nccl" if use_cuda else "gloo")
    if "RANK" not in os.environ:  # plain `python examples/train_ddp.py`: world size 1, same code path
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get(
            "MASTER_PORT", "29511"))
    dist.init_process_group(pg, device_id=device if use_cuda else None)
    return dist.get_rank(), dist.get_world_size(), device, pg


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rank, world, device, pg = _setup(args)
    try:
        backend = args.backend or ("cpp" if device.type == "cpu" and fastrank.backends()["cpp"].available
                                   else "auto")
        if backend != "auto" and not fastrank.backends()[backend].available:
            raise SystemExit(f"train_ddp: fastrank backend {backend!r} is not available: "
                             f"{fastrank.backends()[backend].reason}")
        if args.batch < world:
            raise SystemExit(f"train_ddp: --batch {args.batch} is smaller than the world size {world}")
        data32 = load_data(args.split_seed)
        data = data32.to(getattr(torch, args.dtype))
        data = Data(data.x_train.to(device), data.y_train.to(device), data.x_test.to(device), data.y_test.to(device))
        log = print if rank == 0 else (lambda *a, **k: None)
        names = list(LOSSES) if args.loss == "all" else [args.loss]
        per_rank = [len(p) for p in torch.tensor_split(torch.arange(args.batch), world)]
        log(f"fastrank {fastrank.__version__}, torch {torch.__version__}; {world} process(es), {pg}, {device.type}, "
            f"fastrank backend {backend}, {torch.get_num_threads()} torch thread(s) each")
        log(f"global batch {args.batch} = {args.classes_per_batch} classes x {args.batch // args.classes_per_batch}"
            f" images, per rank {'/'.join(map(str, per_rank))}; each rank's queries ranked against all "
            f"{args.batch}; MLP 64-128-128-{args.dim}, Adam lr {args.lr}, {args.dtype}, {args.epochs} epoch(s)"
            + (f", at most {args.max_steps} steps" if args.max_steps else "") + f", seed {args.seed}\n")
        runs: Dict[str, dict] = {}
        t0 = time.perf_counter()
        for name in names:
            rec = train(name, args, data, device, rank, world, backend)
            if rec is None:
                continue
            runs[name] = rec
            m0, m = rec["epoch_metrics"][0], rec["final_metrics"]
            log(f"  {LOSS_NAMES[name]:<20s} {len(rec['ddp_losses'])} steps, median {np.median(rec['step_ms']):.1f}"
                f" ms/step, loss {rec['ddp_losses'][0]:.4f} -> {rec['ddp_losses'][-1]:.4f}, R@1 {m0['R@1']:.4f} ->"
                f" {m['R@1']:.4f}, mAP@R {m0['mAP@R']:.4f} -> {m['mAP@R']:.4f}", flush=True)
        if rank != 0:
            return 0
        W = 26
        print(f"\nFinal metrics on the test set (exact, rank 0; {len(data32.y_test)} queries, ks {KS})")
        print(metrics_header(W))
        for name, r in runs.items():
            print(metrics_row(LOSS_NAMES[name], r["final_metrics"], W))
        if args.parity:
            print(f"\nParity: {world} processes x {'/'.join(map(str, per_rank))} vs one process x {args.batch}, "
                  f"{args.dtype}; lockstep = same weights and global batch at every step")
            print(f"{'loss':<20s}{'steps':>6s}{'max |dloss|':>13s}{'max |dgrad|':>13s}{'max |grad|':>12s}"
                  f"{'ratio':>9s}{'indep. |dloss|':>16s}{'step 1':>10s}{'control':>10s}{'same R@1':>10s}")
            for name, r in runs.items():
                ls = r["lockstep"]
                dl = max(s["loss_diff"] for s in ls)
                dg = max(s["grad_diff"] for s in ls)
                gm = max(s["grad_max"] for s in ls)
                ratio = max(s["grad_diff"] / s["grad_max"] for s in ls)
                ind = np.abs(np.array(r["independent_losses"]) - np.array(r["ddp_losses"]))
                ctl = np.abs(np.array(r["control_losses"]) - np.array(r["independent_losses"]))
                same = r["independent_final_metrics"]["R@1"] == r["final_metrics"]["R@1"]
                print(f"{LOSS_NAMES[name]:<20s}{len(ls):>6d}{dl:>13.1e}{dg:>13.1e}{gm:>12.1e}{ratio:>9.1e}"
                      f"{ind.max():>16.1e}{ind[0]:>10.1e}{ctl.max():>10.1e}{'yes' if same else 'no':>10s}")
            print("dloss: DDP loss (mean of the ranks' shares) minus the one-process loss of the global batch; dgrad: "
                  "DDP's averaged parameter gradient\nminus the one-process gradient, max over parameters and steps; "
                  "ratio: max over steps of max |dgrad| / max |grad|. indep.: an independent\none-process run from the "
                  "same seed trained alongside, max over steps (step 1: the first); control: that run vs one with "
                  "every initial\nweight one ulp up. Where the control drifts as far, training itself amplifies "
                  "rounding; lockstep is the per-step test. same R@1: DDP vs independent.")
        if args.out:
            config = dict(vars(args), world_size=world, device=device.type, dist_backend=pg, backend=backend,
                          per_rank_batch=per_rank)
            payload = {"config": config,
                       "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                       "fastrank": fastrank.__version__, "cpu_count": os.cpu_count(),
                                       "platform": platform.platform()},
                       "runs": runs, "seconds": time.perf_counter() - t0}
            print("wrote " + ", ".join(write_outputs(args.out, payload)))
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
