"""Train a retrieval embedding on scikit-learn's digits with fastrank's losses.

    python examples/train_retrieval.py                              # Smooth-AP, fused C++ backend
    python examples/train_retrieval.py --loss supap --epochs 30
    python examples/train_retrieval.py --loss all --parity --scale  # what `make demo` runs

Data: ``sklearn.datasets.load_digits`` (1,797 8x8 grey images, 10 classes; it ships with
scikit-learn, nothing is downloaded), pixels scaled to [0, 1].

Split: **by sample**, stratified, 70 % train (1,257 images) / 30 % test (540), fixed by
``--split-seed``. With only 10 classes a split by class would leave 5 training classes and
5 unseen test classes, a much noisier benchmark; the by-sample split measures how well the
embedding ranks unseen images of known classes. Evaluation: every test image is a query
against the other 539 test images (itself excluded), with the exact metrics of
:mod:`fastrank.metrics` (R@1, R@2, R@4, R@8, mAP@R, mAP; ties broken pessimistically).

Model: MLP 64 -> 128 -> 128 -> ``--dim`` (ReLU), Adam; the losses L2-normalise the output
(cosine similarity). Batches come from a class-balanced sampler: P classes x K images
(``--batch`` = P*K, ``--classes-per-batch`` = P); an epoch walks each class's images once in
a random order, so it has about 1,257 / B steps.

Baselines printed next to the results: random embeddings (chance level), the untrained
network (same seed: the starting point of every run) and the raw pixels.

``--parity``: compares the fused backend with ``backend="naive"`` (the reference that builds
B x B x B tensors), in each dtype of ``--parity-dtypes`` (default float32 and float64):

1. lockstep: at every step of the fused run, the naive backend evaluates the loss and its
   gradient on the same embeddings; the largest differences over the run are printed
   (rounding level: ~1e-7 relative in float32, ~1e-16 in float64);
2. independent runs from the same seed (same initial weights, same batches): the per-step
   loss difference, the final metrics, the median time of a training step and the peak
   memory of one forward+backward of each backend. A control run of the fused backend with
   every initial weight nudged by one ulp shows how fast training itself amplifies a
   rounding-sized difference: the rank losses in float64 stay together to the end (same
   final metrics); in float32, and for the histogram losses even in float64, training is
   chaotic at this scale and the control drifts away as fast as the naive run does.

``--scale``: trains each loss with the whole training set as one batch (B = 1,257) on the
fused backend. The naive backend would need about 10 * 4 * B^3 bytes (~79 GB) for it, so it
is not run; the estimate is printed instead.

``--out DIR`` (default examples/results): writes ``training_curves.png`` (loss, R@1 and
mAP@R per epoch for each loss; with --parity, the per-step differences), ``training_results.json``
(every number, per-step losses and lockstep differences included) and ``training_curves.csv``
(the per-epoch numbers of every run).

Threads: ``--threads`` (default 1, for every run). A B = 64 step is far too small to split
across cores, and on a busy machine extra OpenMP threads make it much slower, not faster;
on an idle machine ``--threads 2`` speeds up the full-batch scale run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # bench.memory, when run as `python examples/train_retrieval.py`
    sys.path.insert(0, _ROOT)

import fastrank  # noqa: E402
from fastrank import losses as L  # noqa: E402
from fastrank.metrics import retrieval_metrics  # noqa: E402

try:
    from bench.memory import PeakMemory  # noqa: E402
except ImportError:  # pragma: no cover - the example copied out of the repository
    PeakMemory = None  # type: ignore[assignment,misc]

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None  # type: ignore[assignment]

LOSSES: Dict[str, Callable[[str], nn.Module]] = {
    "smoothap": lambda backend: L.SmoothAPLoss(backend=backend),
    "supap": lambda backend: L.SupAPLoss(backend=backend),
    "roadmap": lambda backend: L.ROADMAPLoss(backend=backend),
    "recall": lambda backend: L.RecallAtKLoss(backend=backend),
    "fastap": lambda backend: L.FastAPLoss(backend=backend),
    "softbin": lambda backend: L.SoftBinAPLoss(backend=backend),
}
LOSS_NAMES = {
    "smoothap": "Smooth-AP", "supap": "SupAP", "roadmap": "ROADMAP", "recall": "Recall@k (SupRank)",
    "fastap": "FastAP", "softbin": "SoftBin AP",
}
KS = (1, 2, 4, 8)
METRIC_KEYS = [f"R@{k}" for k in KS] + ["mAP@R", "mAP"]
NAIVE_CUBES = 10  # float32 B x B x B tensors alive in a naive forward+backward (bench/measure.py fits the same)


# ----------------------------------------------------------------------------- data, sampler, model


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, dtype: torch.dtype) -> "Data":
        return Data(self.x_train.to(dtype), self.y_train, self.x_test.to(dtype), self.y_test)


def load_data(split_seed: int) -> Data:
    """Digits, pixels in [0, 1], stratified 70/30 split by sample (float32)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.3, stratify=y, random_state=split_seed)
    return Data(torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr, dtype=torch.int64),
                torch.tensor(x_te, dtype=torch.float32), torch.tensor(y_te, dtype=torch.int64))


class ClassBalancedSampler:
    """Batches of P classes x K samples; an epoch walks every class's samples once, shuffled.

    Each batch takes the next K unused samples of P classes drawn at random among those with
    at least K left; the epoch ends when fewer than P classes have. Everything is drawn from
    `generator`, so two samplers seeded alike give the same batches.
    """

    def __init__(self, labels: torch.Tensor, classes_per_batch: int, samples_per_class: int,
                 generator: torch.Generator) -> None:
        self.by_class = [torch.nonzero(labels == c).squeeze(1) for c in torch.unique(labels)]
        if not 1 <= classes_per_batch <= len(self.by_class):
            raise ValueError(f"classes_per_batch must be in 1..{len(self.by_class)} (the number of classes), "
                             f"got {classes_per_batch}")
        if samples_per_class < 1 or any(len(ix) < samples_per_class for ix in self.by_class):
            raise ValueError(f"samples_per_class={samples_per_class}: every class needs at least that many samples")
        self.p, self.k, self.g = classes_per_batch, samples_per_class, generator

    def epoch(self) -> List[torch.Tensor]:
        queues = [ix[torch.randperm(len(ix), generator=self.g)] for ix in self.by_class]
        used = [0] * len(queues)
        out = []
        while True:
            ready = [c for c, q in enumerate(queues) if len(q) - used[c] >= self.k]
            if len(ready) < self.p:
                return out
            pick = [ready[i] for i in torch.randperm(len(ready), generator=self.g)[: self.p].tolist()]
            out.append(torch.cat([queues[c][used[c]: used[c] + self.k] for c in pick]))
            for c in pick:
                used[c] += self.k


def make_model(dim: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, dim)).to(dtype)


@torch.no_grad()
def evaluate(model: nn.Module, data: Data) -> Dict[str, float]:
    """Exact metrics on the test set: each test image queries the other test images."""
    model.eval()
    emb = model(data.x_test)
    model.train()
    m = retrieval_metrics(emb, data.y_test, ks=KS, exclude_self=True)
    return {k: float(m[k]) for k in METRIC_KEYS}


# ----------------------------------------------------------------------------- training


@dataclass
class RunResult:
    loss: str
    backend: str
    dtype: str
    batch: int
    epochs: int
    step_losses: List[float] = field(default_factory=list)
    epoch_steps: List[int] = field(default_factory=list)        # steps in each epoch
    epoch_losses: List[float] = field(default_factory=list)     # mean training loss of each epoch
    epoch_metrics: List[Dict[str, float]] = field(default_factory=list)  # [0]: before training
    train_seconds: float = 0.0    # the training steps only (no evaluation)
    step_ms_median: float = 0.0
    step_peak_bytes: Optional[int] = None  # peak extra RSS of one forward+backward at this batch size
    lockstep_loss_diff: List[float] = field(default_factory=list)      # see train(lockstep=...)
    lockstep_grad_diff: List[float] = field(default_factory=list)      # max |grad difference| wrt the embeddings
    lockstep_grad_max: List[float] = field(default_factory=list)       # max |grad| (naive) wrt the embeddings

    @property
    def final(self) -> Dict[str, float]:
        return self.epoch_metrics[-1]


def _step_peak(model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Optional[int]:
    """Peak extra memory of one forward+backward (warm: measured on the second of two)."""
    if PeakMemory is None:
        return None
    extra = None
    for _ in range(2):
        with PeakMemory() as m:
            criterion(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        extra = m.extra
    return int(extra)


def _lockstep(criterion: nn.Module, reference: nn.Module, emb: torch.Tensor,
              y: torch.Tensor) -> Tuple[float, float, float]:
    """|loss difference|, max |gradient difference| and max |gradient| (reference) of two backends on one input."""
    out = []
    for crit in (criterion, reference):
        e = emb.detach().requires_grad_()
        loss = crit(e, y)
        (g,) = torch.autograd.grad(loss, e)
        out.append((loss.detach(), g))
    (lf, gf), (ln, gn) = out
    return abs(float(lf - ln)), float((gf - gn).abs().max()), float(gn.abs().max())


def train(loss_name: str, backend: str, data: Data, *, epochs: int, seed: int, batch: int, classes_per_batch: int,
          lr: float, dim: int, full_batch: bool = False, progress: bool = True, lockstep: Optional[str] = None,
          nudge: bool = False) -> RunResult:
    """Trains a fresh model; `seed` fixes the initial weights and every batch, whatever the backend.

    lockstep: at every step, also evaluate the loss and its gradient with this backend on the same
    embeddings (outside the timed step) and record the differences. nudge: move every initial
    weight up by one ulp (a control: how fast training amplifies a rounding-sized difference).
    """
    torch.manual_seed(seed)
    model = make_model(dim, data.x_train.dtype)
    if nudge:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    criterion = LOSSES[loss_name](backend)
    reference = LOSSES[loss_name](lockstep) if lockstep else None
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if full_batch:
        everything = torch.arange(len(data.y_train))
        plan = [[everything] for _ in range(epochs)]
        batch = len(everything)
    else:
        sampler = ClassBalancedSampler(data.y_train, classes_per_batch, batch // classes_per_batch,
                                       torch.Generator().manual_seed(seed))
        plan = [sampler.epoch() for _ in range(epochs)]
    res = RunResult(loss_name, backend, str(data.x_train.dtype).replace("torch.", ""), batch, epochs)
    res.epoch_metrics.append(evaluate(model, data))
    bar = None
    if progress and tqdm is not None:
        bar = tqdm(total=sum(map(len, plan)), desc=f"{loss_name:>8s} {backend:>5s} {res.dtype} B={batch}",
                   unit="step", leave=False, mininterval=0.5, dynamic_ncols=True, file=sys.stderr)
    step_times = []
    for batches in plan:
        losses = []
        for idx in batches:
            t0 = time.perf_counter()
            emb = model(data.x_train[idx])
            loss = criterion(emb, data.y_train[idx])
            if reference is not None:
                t1 = time.perf_counter()
                dl, dg, g = _lockstep(criterion, reference, emb, data.y_train[idx])
                res.lockstep_loss_diff.append(dl)
                res.lockstep_grad_diff.append(dg)
                res.lockstep_grad_max.append(g)
                t0 += time.perf_counter() - t1  # not part of the training step's time
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
        res.step_losses.extend(losses)
        res.epoch_steps.append(len(losses))
        res.epoch_losses.append(float(np.mean(losses)))
        res.epoch_metrics.append(evaluate(model, data))
        if bar is not None:
            bar.set_postfix(loss=f"{res.epoch_losses[-1]:.4f}", R1=f"{res.final['R@1']:.3f}", refresh=False)
    if bar is not None:
        bar.close()
    res.train_seconds = float(sum(step_times))
    res.step_ms_median = float(np.median(step_times) * 1000)
    idx = plan[-1][-1]
    res.step_peak_bytes = _step_peak(model, criterion, data.x_train[idx], data.y_train[idx])
    return res


# ----------------------------------------------------------------------------- reporting


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def machine_ram() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def metrics_header(width: int) -> str:
    return f"{'':<{width}s}" + "".join(f"{k:>8s}" for k in METRIC_KEYS)


def metrics_row(name: str, m: Dict[str, float], width: int) -> str:
    return f"{name:<{width}s}" + "".join(f"{m[k]:>8.4f}" for k in METRIC_KEYS)


def baselines(data: Data, dim: int, seed: int) -> Dict[str, Dict[str, float]]:
    rand = torch.randn(len(data.y_test), dim, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    with torch.no_grad():
        untrained = make_model(dim, data.x_test.dtype)(data.x_test)
    pick = lambda m: {k: float(m[k]) for k in METRIC_KEYS}  # noqa: E731
    return {
        "random embeddings (chance)": pick(retrieval_metrics(rand, data.y_test, ks=KS)),
        "untrained network": pick(retrieval_metrics(untrained, data.y_test, ks=KS)),
        "raw pixels": pick(retrieval_metrics(data.x_test, data.y_test, ks=KS)),
    }


@dataclass
class Parity:
    fused: RunResult    # trained with the fused backend, naive evaluated alongside at every step (lockstep)
    naive: RunResult    # trained with the naive backend, same seed
    control: RunResult  # fused backend again, every initial weight nudged by one ulp


def parity_stats(pr: Parity, early_epochs: int) -> dict:
    f, n, c = pr.fused, pr.naive, pr.control
    d = np.abs(np.array(f.step_losses) - np.array(n.step_losses))
    dc = np.abs(np.array(f.step_losses) - np.array(c.step_losses))
    early = sum(f.epoch_steps[:early_epochs])
    return dict(dtype=f.dtype, steps=int(len(d)), early_steps=int(early),
                lockstep_max_loss_diff=float(max(f.lockstep_loss_diff)),
                lockstep_max_grad_diff=float(max(f.lockstep_grad_diff)),
                lockstep_max_grad=float(max(f.lockstep_grad_max)),
                lockstep_grad_rel=float(max(f.lockstep_grad_diff) / max(max(f.lockstep_grad_max), 1e-300)),
                first_step=float(d[0]), max_early=float(d[:early].max()), max_all=float(d.max()),
                control_max_early=float(dc[:early].max()), control_max_all=float(dc.max()),
                final_fused=f.final, final_naive=n.final, final_control=c.final,
                same_final_metrics=f.final == n.final,
                step_ms=dict(fused=f.step_ms_median, naive=n.step_ms_median),
                train_seconds=dict(fused=f.train_seconds, naive=n.train_seconds),
                step_peak_bytes=dict(fused=f.step_peak_bytes, naive=n.step_peak_bytes))


ENVELOPE = 5  # the per-step difference panels plot the running max over this many steps (0 shown as 1e-18)


def _envelope(d: np.ndarray) -> np.ndarray:
    pad = np.concatenate([np.zeros(ENVELOPE - 1), d])
    windows = np.lib.stride_tricks.sliding_window_view(pad, ENVELOPE)
    return np.maximum(windows.max(axis=1), 1e-18)


def write_outputs(out_dir: str, payload: dict, runs: Dict[str, RunResult],
                  parity: Dict[Tuple[str, str], Parity], scale: Dict[str, RunResult],
                  base: Dict[str, Dict[str, float]], config: dict) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []
    path = os.path.join(out_dir, "training_results.json")
    with open(path, "w") as f:
        json.dump(payload, f, separators=(",", ":"))
    written.append(path)

    path = os.path.join(out_dir, "training_curves.csv")
    all_runs: List[RunResult] = list(runs.values())
    for pr in parity.values():
        all_runs += [r for r in (pr.fused, pr.naive) if all(r is not x for x in all_runs)]
    all_runs += list(scale.values())
    with open(path, "w") as f:
        f.write("loss,backend,dtype,batch,epoch,steps_done,train_loss," + ",".join(METRIC_KEYS) + "\n")
        for r in all_runs:
            for e, m in enumerate(r.epoch_metrics):
                tl = "" if e == 0 else f"{r.epoch_losses[e - 1]:.8f}"
                f.write(f"{r.loss},{r.backend},{r.dtype},{r.batch},{e},{sum(r.epoch_steps[:e])},{tl},"
                        + ",".join(f"{m[k]:.6f}" for k in METRIC_KEYS) + "\n")
    written.append(path)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return written
    rows = 2 if parity else 1
    fig, axes = plt.subplots(rows, 3, figsize=(16, 4.4 * rows), squeeze=False)
    ax_loss, ax_r1, ax_map = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    first = next(iter(runs.values()))
    for i, (name, r) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        ep = np.arange(0, r.epochs + 1)
        ax_loss.plot(ep[1:], r.epoch_losses, color=c, label=LOSS_NAMES[name])
        ax_r1.plot(ep, [m["R@1"] for m in r.epoch_metrics], color=c, label=LOSS_NAMES[name])
        ax_map.plot(ep, [m["mAP@R"] for m in r.epoch_metrics], color=c, label=LOSS_NAMES[name])
        pr = parity.get((name, r.dtype))
        if pr is not None:  # the naive run of the same dtype, as markers on top of the fused lines
            p = pr.naive
            ax_loss.plot(ep[1:], p.epoch_losses, color=c, ls="none", marker="x", ms=4)
            ax_r1.plot(ep, [m["R@1"] for m in p.epoch_metrics], color=c, ls="none", marker="x", ms=4)
            ax_map.plot(ep, [m["mAP@R"] for m in p.epoch_metrics], color=c, ls="none", marker="x", ms=4)
        if rows == 2:
            for dt, ls in (("float32", "-"), ("float64", ":")):
                pr = parity.get((name, dt))
                if pr is None:
                    continue
                label = f"{LOSS_NAMES[name]}" if dt == first.dtype else None
                gmax = max(max(pr.fused.lockstep_grad_max), 1e-300)
                lock = _envelope(np.array(pr.fused.lockstep_grad_diff) / gmax)
                axes[1][0].plot(np.arange(1, len(lock) + 1), lock, color=c, ls=ls, lw=1, label=label)
                for ax, other in ((axes[1][1], pr.naive), (axes[1][2], pr.control)):
                    d = _envelope(np.abs(np.array(pr.fused.step_losses) - np.array(other.step_losses)))
                    ax.plot(np.arange(1, len(d) + 1), d, color=c, ls=ls, lw=1, label=label)
    for name, m in base.items():
        if name.startswith("raw"):
            continue
        for ax, key, lo in ((ax_r1, "R@1", 0.85), (ax_map, "mAP@R", 0.0)):
            y = m[key]
            text = f"baseline: {name} ({y:.3f})"
            if y < lo:  # off the axis: say so at the bottom
                ax.annotate(text + ", below the axis", (0.02, 0.02), xycoords="axes fraction", fontsize=7,
                            color="grey")
                continue
            ax.axhline(y, color="grey", ls=":" if name.startswith("random") else "--", lw=1)
            ax.annotate(text, (first.epochs * 0.3, y), textcoords="offset points", xytext=(0, 3), fontsize=7,
                        color="grey")
    ax_loss.set(xlabel="epoch", ylabel="training loss (mean over the epoch)", yscale="log",
                title="training loss (1 - score; ROADMAP adds calibration)")
    ax_r1.set(xlabel="epoch (0 = untrained)", ylabel="R@1", ylim=(0.85, 1.0),
              title="exact R@1, 540 held-out test images")
    ax_map.set(xlabel="epoch (0 = untrained)", ylabel="mAP@R", ylim=(0.0, 1.0),
               title="exact mAP@R, 540 held-out test images")
    ax_loss.legend(fontsize=7)
    ax_map.legend(fontsize=7, loc=(0.62, 0.45))
    if rows == 2:
        titles = (f"lockstep: naive vs {first.backend} gradient on the same weights",
                  f"independent runs, same seed: {first.backend} vs naive loss",
                  f"control: {first.backend} vs {first.backend} with weights nudged 1 ulp")
        ylabels = ("max |dgrad| / max |grad| of the run", "|loss difference|", "|loss difference|")
        for ax, title, ylabel in zip(axes[1], titles, ylabels):
            ax.set(xlabel="training step", ylabel=f"{ylabel}, max over {ENVELOPE} steps", yscale="log",
                   ylim=(1e-18, 1), title=title + "\nfloat32 solid, float64 dotted")
        axes[1][0].legend(fontsize=7, loc="upper left")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"fastrank on sklearn digits: MLP 64-128-128-{config['dim']}, batch {first.batch} = "
                 f"{config['classes_per_batch']} classes x {first.batch // config['classes_per_batch']}, "
                 f"seed {config['seed']}; lines: backend {first.backend} ({first.dtype})"
                 + (", x: naive" if parity else ""), fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "training_curves.png")
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
    ap.add_argument("--backend", default="cpp", choices=["naive", "torch", "cpp", "auto"],
                    help="fastrank backend for training (default: cpp, the fused CPU kernels; the example runs on "
                         "the CPU, so the GPU backends triton and cuda do not apply)")
    ap.add_argument("--epochs", type=int, default=15, help="epochs (default 15)")
    ap.add_argument("--seed", type=int, default=0, help="initial weights and batches (default 0)")
    ap.add_argument("--split-seed", type=int, default=0, help="train/test split (default 0)")
    ap.add_argument("--batch", type=int, default=64, help="batch size B = P x K (default 64)")
    ap.add_argument("--classes-per-batch", type=int, default=8, help="P classes per batch (default 8 of 10)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    ap.add_argument("--dim", type=int, default=32, help="embedding dimension (default 32)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="training precision")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see the module docstring)")
    ap.add_argument("--parity", action="store_true", help="also train with backend='naive' and compare")
    ap.add_argument("--parity-dtypes", default="float32,float64",
                    help="comma-separated dtypes of the parity runs (default float32,float64)")
    ap.add_argument("--parity-epochs", type=int, default=3,
                    help="report the max per-step loss difference over these first epochs too (default 3)")
    ap.add_argument("--scale", action="store_true", help="also train with the whole training set as one batch")
    ap.add_argument("--scale-epochs", type=int, default=40, help="full-batch steps of the scale run (default 40)")
    ap.add_argument("--scale-lr", type=float, default=1e-2, help="learning rate of the scale run (default 1e-2)")
    ap.add_argument("--out", default=os.path.join("examples", "results"),
                    help="directory for the plot, JSON and CSV ('' writes nothing)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = ap.parse_args(argv)
    for name in ("epochs", "batch", "classes_per_batch", "dim", "threads", "scale_epochs", "parity_epochs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch % args.classes_per_batch:
        ap.error(f"--batch {args.batch} must be a multiple of --classes-per-batch {args.classes_per_batch}")
    args.parity_dtypes = [d.strip() for d in args.parity_dtypes.split(",") if d.strip()]
    for d in args.parity_dtypes:
        if d not in ("float32", "float64"):
            ap.error(f"--parity-dtypes: {d!r} is not float32 or float64")
    if args.backend != "auto":
        info = fastrank.backends()[args.backend]
        if not info.available:
            ap.error(f"backend {args.backend!r} is not available here: {info.reason}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    data32 = load_data(args.split_seed)
    data = {"float32": data32, "float64": data32.to(torch.float64)}
    names = list(LOSSES) if args.loss == "all" else [args.loss]
    fused, dt = args.backend, args.dtype
    kw = dict(epochs=args.epochs, seed=args.seed, batch=args.batch, classes_per_batch=args.classes_per_batch,
              lr=args.lr, dim=args.dim, progress=progress)
    W = 38

    print(f"fastrank {fastrank.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"data: sklearn digits, {len(data32.y_train)} train / {len(data32.y_test)} test images (stratified split by "
          f"sample, split seed {args.split_seed}); each test image queries the other {len(data32.y_test) - 1}")
    print(f"model: MLP 64-128-128-{args.dim}, Adam lr {args.lr}, {dt}; batch {args.batch} = {args.classes_per_batch} "
          f"classes x {args.batch // args.classes_per_batch} images, class-balanced; {args.epochs} epochs; "
          f"seed {args.seed}\n")

    base = baselines(data[dt], args.dim, args.seed)
    print("Baselines on the test set")
    print(metrics_header(W))
    for name, m in base.items():
        print(metrics_row(name, m, W))
    print(flush=True)

    runs: Dict[str, RunResult] = {}
    parity: Dict[Tuple[str, str], Parity] = {}
    do_parity = args.parity and fused != "naive"
    print(f"Training (backend {fused}" + (", then naive and a one-ulp control for parity" if do_parity else "") + ")")
    for name in names:
        lockstep = "naive" if do_parity and dt in args.parity_dtypes else None
        r = runs[name] = train(name, fused, data[dt], lockstep=lockstep, **kw)
        print(f"  {LOSS_NAMES[name]:<20s} {fused:>5s} {dt}: {len(r.step_losses)} steps, {r.train_seconds:5.1f} s, "
              f"loss {r.epoch_losses[0]:.4f} -> {r.epoch_losses[-1]:.4f}, R@1 {r.epoch_metrics[0]['R@1']:.4f} -> "
              f"{r.final['R@1']:.4f}, mAP@R {r.epoch_metrics[0]['mAP@R']:.4f} -> {r.final['mAP@R']:.4f}", flush=True)
        if not do_parity:
            continue
        for pdt in args.parity_dtypes:
            f = r if pdt == dt else train(name, fused, data[pdt], lockstep="naive", **kw)
            n = train(name, "naive", data[pdt], **kw)
            c = train(name, fused, data[pdt], nudge=True, **kw)
            parity[(name, pdt)] = Parity(f, n, c)
            print(f"  {'':<20s} naive {pdt}: {n.train_seconds:5.1f} s ({fused} {f.train_seconds:.1f} s), "
                  f"final R@1 {n.final['R@1']:.4f} ({fused} {f.final['R@1']:.4f}), mAP@R {n.final['mAP@R']:.4f} "
                  f"({fused} {f.final['mAP@R']:.4f})", flush=True)
    print()

    print(f"Final metrics on the test set after {args.epochs} epochs (backend {fused}, {dt})")
    print(metrics_header(W))
    for name, m in base.items():
        print(metrics_row(f"baseline: {name}", m, W))
    for name, r in runs.items():
        print(metrics_row(LOSS_NAMES[name], r.final, W))
    print()

    parity_summary: Dict[str, dict] = {}
    if parity:
        for (name, pdt), pr in parity.items():
            parity_summary[f"{name}/{pdt}"] = parity_stats(pr, args.parity_epochs)
        ps = lambda name, pdt: parity_summary[f"{name}/{pdt}"]  # noqa: E731
        print(f"Parity 1, lockstep: at every training step of the {fused} run, the naive backend evaluates the loss "
              f"and its gradient\non the same embeddings (B = {args.batch}); largest differences over all "
              f"{len(runs[names[0]].step_losses)} steps")
        print(f"{'loss':<20s}{'dtype':>8s}{'max |dloss|':>13s}{'max |dgrad|':>13s}{'max |grad|':>12s}{'ratio':>9s}")
        for (name, pdt) in parity:
            st = ps(name, pdt)
            print(f"{LOSS_NAMES[name]:<20s}{pdt:>8s}{st['lockstep_max_loss_diff']:>13.1e}"
                  f"{st['lockstep_max_grad_diff']:>13.1e}{st['lockstep_max_grad']:>12.1e}{st['lockstep_grad_rel']:>9.1e}")
        print("dgrad: gradient wrt the embeddings, naive minus fused; max over all steps and entries; ratio: "
              "max |dgrad| / max |grad|.\n")
        print(f"Parity 2, two trainings from the same seed (same initial weights, same batches): {fused} vs naive.\n"
              f"|dloss|: per-step difference of the training loss; control: {fused} vs {fused} with every initial "
              f"weight nudged by one ulp.")
        h1 = f"ep 1-{args.parity_epochs}"
        print(f"{'':<28s}{'max |dloss| ' + fused + ' vs naive':>27s}{'control':>18s}{'same':>6s}"
              f"{'R@1':>8s}{'R@1':>8s}{'mAP@R':>8s}{'mAP@R':>8s}{'ms/step':>9s}{'ms/step':>9s}"
              f"{'step mem':>10s}{'step mem':>10s}")
        print(f"{'loss':<20s}{'dtype':>8s}{'step 1':>9s}{h1:>9s}{'all':>9s}{h1:>9s}{'all':>9s}{'final':>6s}"
              f"{fused:>8s}{'naive':>8s}{fused:>8s}{'naive':>8s}{fused:>9s}{'naive':>9s}{fused:>10s}{'naive':>10s}")
        for (name, pdt), pr in parity.items():
            st, f, n = ps(name, pdt), pr.fused, pr.naive
            print(f"{LOSS_NAMES[name]:<20s}{pdt:>8s}{st['first_step']:>9.1e}{st['max_early']:>9.1e}{st['max_all']:>9.1e}"
                  f"{st['control_max_early']:>9.1e}{st['control_max_all']:>9.1e}"
                  f"{'yes' if st['same_final_metrics'] else 'no':>6s}{f.final['R@1']:>8.4f}{n.final['R@1']:>8.4f}"
                  f"{f.final['mAP@R']:>8.4f}{n.final['mAP@R']:>8.4f}{f.step_ms_median:>9.2f}{n.step_ms_median:>9.2f}"
                  f"{fmt_bytes(f.step_peak_bytes):>10s}{fmt_bytes(n.step_peak_bytes):>10s}")
        print(f"same final: all six test metrics equal. ms/step: median training step (forward, backward, Adam). "
              f"step mem: peak extra RSS of one\nforward+backward; naive estimate at B = {args.batch}: "
              f"{NAIVE_CUBES} x 4 x B^3 = {fmt_bytes(NAIVE_CUBES * 4 * args.batch ** 3)} in float32.")
        print("Where the control diverges as fast as naive does, training itself amplifies rounding-sized differences "
              "(chaotic dynamics);\nlockstep (parity 1) is then the per-step test of the backends.\n")

    scale: Dict[str, RunResult] = {}
    scale_summary: dict = {}
    if args.scale:
        n_train = len(data32.y_train)
        est = NAIVE_CUBES * 4.0 * n_train ** 3
        ram = machine_ram()
        print(f"Scale run: the whole training set as one batch (B = {n_train}), backend {fused}, {dt}, "
              f"{args.scale_epochs} full-batch steps, Adam lr {args.scale_lr}")
        print(f"naive backend not run: it would need ~{NAIVE_CUBES} x 4 x B^3 bytes = {fmt_bytes(est)}"
              + (f", {est / ram:.1f}x this machine's {fmt_bytes(ram)} of RAM" if ram else ""))
        for name in names:
            scale[name] = train(name, fused, data[dt], epochs=args.scale_epochs, seed=args.seed, batch=n_train,
                                classes_per_batch=args.classes_per_batch, lr=args.scale_lr, dim=args.dim,
                                full_batch=True, progress=progress)
        print(f"{'loss':<20s}{'s/step':>8s}{'step mem':>10s}{'R@1':>8s}{'mAP@R':>8s}{'mAP':>8s}"
              f"{f'R@1 B={args.batch}':>11s}{f'mAP@R B={args.batch}':>13s}")
        for name, r in scale.items():
            mb = runs[name].final
            print(f"{LOSS_NAMES[name]:<20s}{r.step_ms_median / 1000:>8.2f}{fmt_bytes(r.step_peak_bytes):>10s}"
                  f"{r.final['R@1']:>8.4f}{r.final['mAP@R']:>8.4f}{r.final['mAP']:>8.4f}{mb['R@1']:>11.4f}"
                  f"{mb['mAP@R']:>13.4f}")
        print(f"s/step: median full-batch training step; B={args.batch} columns: the mini-batch runs above.\n")
        scale_summary = dict(batch=n_train, steps=args.scale_epochs, lr=args.scale_lr, naive_estimate_bytes=est,
                             machine_ram_bytes=ram)

    total = time.perf_counter() - t_start
    if args.out:
        config = dict(vars(args))
        payload = {
            "config": config,
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "fastrank": fastrank.__version__, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
            "baselines": base,
            "runs": {k: asdict(v) for k, v in runs.items()},
            "parity_runs": {f"{k[0]}/{k[1]}": {"fused": asdict(v.fused), "naive": asdict(v.naive),
                                                "control": asdict(v.control)} for k, v in parity.items()},
            "parity_summary": parity_summary,
            "scale_runs": {k: asdict(v) for k, v in scale.items()},
            "scale_summary": scale_summary,
            "seconds_before_writing": total,
        }
        written = write_outputs(args.out, payload, runs, parity, scale, base, config)
        print("wrote " + ", ".join(written))
    print(f"total wall time {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
