"""Tests of the benchmark harness itself (bench/): small sizes, fast.

The CSV schema and statuses, OOM / timeout / unsupported recording, the peak-memory
measurement against a known allocation, the workload builders, the sweep plan and the
GPU ceiling table. The GPU paths (CUDA events, max_memory_allocated, in-process OOM)
are exercised by the `gpu`-marked tests on a CUDA machine.
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu as G
from bench import measure as M
from bench import run as R
from bench import workloads as W
from bench.memory import PeakMemory
from bench.op_keys import RENAMED_OP_KEYS
from bench.report import CSV_COLUMNS, Derived, RunInfo, load_csv, markdown_table, write_csv

from .conftest import AVAILABLE, requires

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUSED = "cpp" if "cpp" in AVAILABLE else "torch"


def _fast(spec: M.PointSpec) -> M.PointSpec:
    spec.min_time_s, spec.min_reps, spec.max_reps = 0.01, 3, 5
    return spec


# ----------------------------------------------------------------------------- workloads


def test_batch_workload():
    w = W.build("batch", 64)
    assert w.shape == (64, 64) and w.scores.dtype == torch.float32 and not w.scores.requires_grad
    assert torch.equal(w.qlab, w.glab) and torch.equal(w.self_index, torch.arange(64))
    assert torch.allclose(w.scores.diagonal(), torch.ones(64), atol=1e-5)  # unit-norm rows
    assert (W.positives_per_query(w.qlab, w.glab) == 4).all()
    assert W.label_pairs(w.qlab, w.glab) == 4 * 64 * 64
    # seeded: the same inputs in every process
    assert torch.equal(w.scores, W.build("batch", 64).scores)


def test_dense_workload():
    w = W.build("dense", 128)
    assert w.shape == (128, 128) and torch.equal(w.self_index, torch.arange(128))
    assert (W.positives_per_query(w.qlab, w.glab) == 128 // 8).all()  # |P| = B / 8
    assert W.label_pairs(w.qlab, w.glab) == 128 * 16 * 128
    assert M.work("sup_ap", "dense", 128) == 128**3 // 8


def test_xbm_workload():
    w = W.build("xbm", 2000)
    assert w.shape == (W.XBM_QUERIES, 2000) and w.self_index is None
    n_pos = W.positives_per_query(w.qlab, w.glab)
    assert (n_pos == W.XBM_PER_CLASS).all()  # every query class is a full memory class
    assert set(w.qlab.tolist()) <= set(w.glab.tolist())
    assert len(set(w.qlab.tolist())) == W.XBM_QUERIES  # distinct classes when there are enough
    assert W.label_pairs(w.qlab, w.glab) == W.XBM_QUERIES * 5 * 2000
    assert W.shape("xbm", 65536) == (256, 65536)
    # fewer classes than queries: cycled, still positives for everyone
    qlab, glab = W.xbm_labels(500)
    assert (W.positives_per_query(qlab, glab) == 5).all()


def test_work_units():
    assert M.unit_of("sup_ap") == "pair" and M.unit_of("histogram_ap:softbin") == "item"
    assert M.work("smooth_ap", "batch", 32) == 4 * 32 * 32
    assert M.work("histogram_ap:softbin", "batch", 32) == 32 * 32
    assert M.work("histogram_ap:fastap", "batch", 32) == 32 * 32 - 32  # the query left out of its gallery
    assert M.work("histogram_ap:fastap", "xbm", 1000) == 256 * 1000  # no self column in the memory
    with pytest.raises(ValueError):
        W.build("nope", 8)


# ----------------------------------------------------------------------------- memory


def test_peak_memory_sees_a_known_allocation():
    size = 256 * 2**20
    with PeakMemory() as m:
        t = torch.ones(size // 4, dtype=torch.float32)  # touched, so resident
        del t
    assert m.extra >= 0.9 * size, m.extra
    if m.exact:  # VmHWM was reset: nothing from before the block may show up
        assert m.extra <= 1.1 * size, m.extra


# ----------------------------------------------------------------------------- one point


@pytest.mark.parametrize("mode", M.MODES)
@pytest.mark.parametrize("op", ["sup_ap", "histogram_ap:fastap"])
def test_run_point_modes(op, mode):
    res = M.run_point(_fast(M.PointSpec(op=op, backend=FUSED, x=64, mode=mode)))
    assert res.status == "ok", res.note
    assert 3 <= res.reps <= 5 and len(res.times_ms) == res.reps
    assert 0 < res.p20_ms <= res.p50_ms <= res.p80_ms
    assert res.pairs == M.work(op, "batch", 64) and res.unit == M.unit_of(op)
    assert (res.q, res.n) == (64, 64) and res.peak_extra_bytes >= 0


def test_every_op_runs_on_every_workload():
    for op in M.OPS:
        for workload, x in (("batch", 32), ("dense", 32), ("xbm", 256)):
            res = M.run_point(_fast(M.PointSpec(op=op, backend=FUSED, x=x, workload=workload)))
            assert res.status == "ok", (op, workload, res.note)


@pytest.mark.parametrize("exc,status", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
    (MemoryError(), "oom"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), "oom"),
    (NotImplementedError("backend 'triton' has no histogram implementation yet"), "unsupported"),
    (ValueError("boom"), "error"),
])
def test_failures_become_statuses(monkeypatch, exc, status):
    def fail(scores, w, backend):
        raise exc

    monkeypatch.setitem(M.OP_DEFS, "sup_ap", M.Op("sup_ap", "rank", fail))
    res = M.run_point(_fast(M.PointSpec(op="sup_ap", backend="torch", x=32)))
    assert res.status == status and type(exc).__name__ in res.note
    assert math.isnan(res.p50_ms) and res.pairs == 4 * 32 * 32  # the row still says what it was


def test_subprocess_point_and_timeout():
    spec = _fast(M.PointSpec(op="smooth_ap", backend=FUSED, x=64))
    res = R.run_in_subprocess(spec, timeout_s=120)
    assert res.status == "ok", res.note
    assert res.memory_exact and res.peak_extra_bytes > 0
    # the child cannot even import torch in 0.2 s: killed and recorded, not raised
    res = R.run_in_subprocess(spec, timeout_s=0.2)
    assert res.status == "timeout" and "killed" in res.note and math.isnan(res.p50_ms)


# ----------------------------------------------------------------------------- guard and plan


def test_guard_memory_estimate_failure_chain_and_budget():
    guard = R.Guard(mem_limit_bytes=1e6, timeout_s=10.0, budget_s=60.0, overhead_s=1.0)
    naive = M.PointSpec(op="sup_ap", backend="naive", x=128)
    skipped = guard.check(naive)
    assert skipped.status == "oom" and "estimated" in skipped.note
    guard.record(skipped)
    # a larger point of the same (op, backend, workload, mode) is not tried
    assert guard.check(M.PointSpec(op="sup_ap", backend="naive", x=256)).status == "oom"
    # ... but another mode is
    assert guard.check(M.PointSpec(op="histogram_ap:fastap", backend="naive", x=16, mode="forward")) is None
    # predicted time: 1 s at x = 128 -> 16 s at 512 (pairs ~ x^2), x3 > 10 s timeout
    ok = M.PointResult(spec=M.PointSpec(op="sup_ap", backend="cpp", x=128), p50_ms=1000.0, reps=3)
    guard.record(ok)
    big = guard.check(M.PointSpec(op="sup_ap", backend="cpp", x=512))
    assert big.status == "timeout" and "predicted" in big.note
    # budget: a point that would end after it is skipped, and that does not poison larger ones
    late = guard.check(M.PointSpec(op="smooth_ap", backend="cpp", x=128), elapsed_s=59.5)
    assert late.status == "skipped" and "budget" in late.note
    guard.record(late)
    assert guard.check(M.PointSpec(op="smooth_ap", backend="cpp", x=256), elapsed_s=0.0) is None


def test_default_sweep_plan():
    sweep = R.SWEEPS[("cpu", "default")]
    points = R.plan(sweep, "cpu")
    assert {p.op for p in points} == set(M.OPS)
    assert {(p.workload, p.mode) for p in points} == {("batch", "full")}
    assert {p.backend for p in points} == {"naive", "torch", "cpp"}
    assert len(points) == len({(p.op, p.backend, p.x) for p in points})  # no duplicates
    for op in M.OPS:
        for b in ("naive", "torch", "cpp"):
            xs = [p.x for p in points if (p.op, p.backend) == (op, b)]
            assert xs == sorted(xs) and xs, (op, b)
    assert max(p.x for p in points if p.backend == "cpp") == 16384
    assert sweep.budget_min <= 8.0


def test_every_sweep_has_sizes_for_its_workloads():
    for (device, name), sweep in R.SWEEPS.items():
        points = R.plan(sweep, device)
        for workload in sweep.workloads:
            for mode in sweep.modes:
                assert any(p.workload == workload and p.mode == mode for p in points), (device, name, workload)
        if device == "cuda":
            assert "cpp" not in sweep.backends


# ----------------------------------------------------------------------------- end to end: CSV


def test_csv_schema_end_to_end(tmp_path, capsys):
    args = ["--in-process", "--sizes", "32,64", "--ops", "sup_ap,histogram_ap:fastap", "--backends", f"naive,{FUSED}",
            "--modes", "forward,full", "--min-time", "0.01", "--mem-limit-gb", "1e-6", "--budget-min", "0",
            "--out-dir", str(tmp_path), "--tag", "t"]
    assert R.main(args) == 0
    out = capsys.readouterr().out
    assert "### workload `batch`" in out and "mode `forward`" in out and "| sup_ap | naive | 32 | OOM |" in out
    latest = tmp_path / "cpu_t_latest.csv"
    with open(latest, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == 2 * 2 * 2 * 2  # op x backend x size x mode: one row per point
    assert len({(r["op"], r["backend"], r["x"], r["mode"]) for r in rows}) == len(rows)
    for r in rows:
        assert r["status"] in M.STATUSES and r["workload"] == "batch" and r["device"]
        assert r["torch_version"] == torch.__version__ and r["git_sha"] and r["timestamp"]
        if r["backend"] == "naive":  # the 1 kB memory limit: estimated OOM, recorded, not run
            assert r["status"] == "oom" and r["p50_ms"] == ""
            assert "estimated" in r["note"] or "smaller x already ended in oom" in r["note"]
        else:
            assert r["status"] == "ok", r["note"]
            assert float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
            assert float(r["pairs_per_s"]) > 0 and int(r["peak_extra_bytes"]) >= 0
            assert r["unit"] == ("pair" if r["op"] == "sup_ap" else "item")
            # % of the sigma ceiling for the rank op on a fused backend only
            assert (r["pct_ceiling"] != "") == (r["op"] == "sup_ap")
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    # without matplotlib (optional) the run still writes the table and CSV, and no PNG
    has_mpl = __import__("importlib").util.find_spec("matplotlib") is not None
    assert pngs == (["cpu_t_batch_forward.png", "cpu_t_batch_full.png"] if has_mpl else [])
    stamped = [p for p in tmp_path.glob("cpu_t_2*.csv")]
    assert len(stamped) == 1
    # --replot redraws the PNGs from the CSV alone
    for png in tmp_path.glob("*.png"):
        png.unlink()
    assert R.main(["--replot", str(latest)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == pngs


def test_table_and_speedups():
    mk = lambda b, p50: M.PointResult(spec=M.PointSpec(op="sup_ap", backend=b, x=64), p50_ms=p50, p20_ms=p50,  # noqa: E731
                                      p80_ms=p50, reps=3, pairs=4 * 64 * 64)
    rows = [mk("naive", 100.0), mk("torch", 10.0), mk("cpp", 1.0),
            M.blank_result(M.PointSpec(op="sup_ap", backend="naive", x=128), "timeout", "killed")]
    d = Derived(rows, ceiling_rate=1e9)
    assert d.speedup(rows[2], "naive") == pytest.approx(100.0) and d.speedup(rows[2], "torch") == pytest.approx(10.0)
    assert math.isnan(d.speedup(rows[0], "torch"))
    assert d.pair_evals_per_s(rows[2]) == pytest.approx(2 * 4 * 64 * 64 / 1e-3)
    table = markdown_table(d)
    assert "TIMEOUT" in table and "killed" in table


# ----------------------------------------------------------------------------- op keys


def test_ops_cli_names_the_valid_keys(tmp_path):
    # small enough to finish quickly should the selection wrongly go through
    rest = ["--in-process", "--sizes", "32", "--backends", "naive", "--min-time", "0.01", "--no-plot",
            "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        R.main(["--ops", "sup_ap,nope"] + rest)
    msg = str(e.value)
    assert "unknown --ops ['nope']" in msg and all(op in msg for op in M.OPS)
    with pytest.raises(SystemExit) as e:  # a key from before the rename says what it is called now
        R.main(["--ops", "supap,fastap"] + rest)
    assert "supap is now sup_ap" in str(e.value) and "fastap is now histogram_ap:fastap" in str(e.value)


def test_renamed_op_keys_lead_to_current_ops():
    assert set(RENAMED_OP_KEYS.values()) <= set(M.OPS) and not set(RENAMED_OP_KEYS) & set(M.OPS)
    # every committed CSV of the sweep (written with the old keys) reads back with today's keys
    # (bench/fused.py's cpu_fused_* CSVs have their own columns)
    committed = sorted(p for p in (Path(ROOT) / "bench" / "results").glob("*.csv")
                       if not p.name.startswith("cpu_fused_"))
    assert committed
    for path in committed:
        results, _ = load_csv(str(path))
        assert {r.spec.op for r in results} <= set(M.OPS), path.name


def _measured(op: str, backend: str, x: int, p50: float) -> M.PointResult:
    """An ok point of the batch workload with a given p50, as the driver would have recorded it."""
    return M.PointResult(spec=M.PointSpec(op=op, backend=backend, x=x), p50_ms=p50, p20_ms=p50, p80_ms=p50, reps=3,
                         pairs=M.work(op, "batch", x), unit=M.unit_of(op))


def _run_info(device: str, ceiling_rate: float) -> RunInfo:
    return RunInfo(device=device, torch_version=torch.__version__, git_sha="abc", timestamp="2026-01-01T00:00:00",
                   threads=2, ceiling_rate=ceiling_rate, ceiling_text="")


def _with_old_keys(path: Path) -> None:
    """Rewrites a CSV's op column with the keys it had before the rename, as the committed CSVs have."""
    old = {new: o for o, new in RENAMED_OP_KEYS.items()}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows({**r, "op": old.get(r["op"], r["op"])} for r in rows)


def test_old_key_csv_still_reads(tmp_path):
    rows = [_measured("sup_ap", "naive", 64, 100.0), _measured("sup_ap", "cpp", 64, 1.0),
            _measured("histogram_ap:fastap", "naive", 64, 8.0), _measured("histogram_ap:fastap", "cpp", 64, 2.0),
            _measured("ndcg", "cpp", 64, 3.0)]
    path = tmp_path / "cpu_old_latest.csv"
    write_csv(str(path), Derived(rows, 1e9), _run_info("cpu", 1e9))
    _with_old_keys(path)
    with open(path, newline="") as f:
        assert {r["op"] for r in csv.DictReader(f)} == {"supap", "fastap", "ndcg"}
    results, _ = load_csv(str(path))
    assert [r.spec.op for r in results] == [r.spec.op for r in rows]
    d = Derived(results, 1e9)
    assert d.speedup(results[1], "naive") == pytest.approx(100.0)
    assert d.speedup(results[3], "naive") == pytest.approx(4.0)
    assert not math.isnan(d.pct_ceiling(results[1]))  # the op's family is known again
    table = markdown_table(d)
    assert "| sup_ap | cpp | 64 |" in table and "| histogram_ap:fastap | cpp | 64 |" in table


def test_gpu_check_pairs_old_and_new_key_csvs(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    info = _run_info("gpu", math.nan)
    old, new = tmp_path / "gpu_old_latest.csv", tmp_path / "gpu_new_latest.csv"
    triton = [_measured("sup_ap", "triton", 256, 2.0), _measured("smooth_ap", "triton", 256, 8.0)]
    write_csv(str(old), Derived(triton, math.nan), info)
    _with_old_keys(old)
    cuda = [_measured("sup_ap", "cuda", 256, 1.0), _measured("smooth_ap", "cuda", 256, 4.0)]
    write_csv(str(new), Derived(cuda, math.nan), info)
    who, why = gpu_check.preferred_backend([str(old), str(new)])
    # each old-key triton row paired with its new-key cuda row: unpaired, there would be no ratio at all
    assert who == "cuda" and "mean 2.00 over 2 points" in why, why


# ----------------------------------------------------------------------------- GPU ceiling table


@pytest.mark.parametrize("name,key,sms,mhz", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 132, 1980),
    ("NVIDIA H100 PCIe", "H100 PCIe", 114, 1755),
    ("NVIDIA H100 NVL", "H100 NVL", 132, 1785),
    ("NVIDIA H200", "H200 SXM", 132, 1980),
    ("NVIDIA H200 NVL", "H200 NVL", 132, 1785),
    ("NVIDIA GH200 480GB", "GH200", 132, 1980),
])
def test_gpu_table_lookup(name, key, sms, mhz):
    spec = G.lookup_gpu(name)
    assert spec is not None and (spec.key, spec.sms, spec.boost_mhz) == (key, sms, mhz) and spec.source
    c = G.sfu_ceiling(name)
    assert c.rate == pytest.approx(16 * sms * mhz * 1e6)


def test_gpu_ceiling_values():
    h100 = G.sfu_ceiling("NVIDIA H100 80GB HBM3")
    assert 3.9e12 <= h100.rate <= 4.3e12  # docs/design.md §4: ~3.9e12 at 1.83 GHz; 4.18e12 at the 1.98 GHz boost
    assert "H100 SXM" in h100.text and "Programming Guide" in h100.text
    mig = G.sfu_ceiling("NVIDIA H100 80GB HBM3", sm_count=66)  # a MIG slice: the device's own SM count
    assert mig.rate == pytest.approx(h100.rate / 2) and "66 SMs" in mig.text
    unknown = G.sfu_ceiling("NVIDIA A100-SXM4-80GB")
    assert G.lookup_gpu("NVIDIA A100-SXM4-80GB") is None and math.isnan(unknown.rate) and "not in" in unknown.text
    assert G.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


# ----------------------------------------------------------------------------- micro-benchmarks


def test_micro_benchmarks_run_with_benchmark_disabled():
    """bench/test_micro.py is not under tests/; CI runs it once per case with --benchmark-disable."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_micro.py", "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


# ----------------------------------------------------------------------------- GPU (CUDA machines only)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", M.MODES)
def test_gpu_point(mode):
    backend = "cuda" if "cuda" in AVAILABLE else "torch"
    res = R.run_in_process(_fast(M.PointSpec(op="sup_ap", backend=backend, x=256, mode=mode, device="cuda")))
    assert res.status == "ok", res.note
    assert 0 < res.p20_ms <= res.p50_ms <= res.p80_ms and res.peak_extra_bytes >= 0


@pytest.mark.gpu
@cuda
def test_gpu_memory_sees_a_known_allocation():
    size = 256 * 2**20
    with M.CudaPeakMemory(torch.device("cuda")) as m:
        t = torch.empty(size // 4, dtype=torch.float32, device="cuda")
        del t
    assert abs(m.extra - size) <= 0.1 * size


@pytest.mark.gpu
@cuda
def test_gpu_real_oom_is_recorded():
    free, _ = torch.cuda.mem_get_info()
    # naive rank op: ~10 float32 (B, B, B) cubes; pick B so that even one cube does not fit
    B = int((free / 4) ** (1 / 3)) + 64
    res = R.run_in_process(_fast(M.PointSpec(op="smooth_ap", backend="naive", x=B, device="cuda")))
    assert res.status == "oom", res.note
    # and the device is usable again afterwards
    assert R.run_in_process(_fast(M.PointSpec(op="smooth_ap", backend="torch", x=64, device="cuda"))).status == "ok"


@requires("cpp")
def test_fused_comparison_runs_and_writes_its_csv(tmp_path, capsys):
    from bench import fused

    assert fused.main(["--quick", "--ops", "sup_ap,histogram_ap:softbin", "--min-time", "0", "--max-reps", "3",
                       "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| sup_ap | 64 |" in out and "Per-call overhead" in out
    with open(tmp_path / "cpu_fused_latest.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["op"], int(r["B"])) for r in rows] == [("sup_ap", 64), ("sup_ap", 256), ("histogram_ap:softbin", 64),
                                                      ("histogram_ap:softbin", 256)]
    for r in rows:
        assert float(r["full_fused_ms"]) > 0 and float(r["full_two_pass_ms"]) > 0
    # the largest size of each op carries its peak memory: the gradient plus per-thread scratch
    assert float(rows[1]["fused_peak_extra_over_scores"]) > 0.9
    assert os.environ.get("FASTRANK_FUSED") is None  # the switch is restored


@requires("cpp")
def test_fused_breakdown_prints_every_op(capsys):
    from bench import fused_breakdown

    assert fused_breakdown.main(["--ops", "sup_ap,smooth_ap", "--size", "67", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| sup_ap") or
            line.startswith("| smooth_ap")]
    assert [r[0].strip() for r in rows] == ["sup_ap", "smooth_ap"]
    for r in rows:
        assert all(float(c) > 0 for c in r[1:5])  # every timed call ran
    assert os.environ.get("FASTRANK_FUSED") is None  # the switch is restored


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                    reason="the sweep loop is timed on the x86 vector lanes")
def test_sweep_loop_builds_and_times_both_steps(tmp_path):
    from bench import sweep_loop

    exe = sweep_loop.build(str(tmp_path))
    for step in sweep_loop.STEPS:
        # N = 101: a partial last vector
        t = sweep_loop.run(exe, 101, 3, step)
        assert set(t) == {"forward_us", "store_us", "grad_us", "checksum"}
        assert all(t[k] > 0 for k in ("forward_us", "store_us", "grad_us"))
        assert math.isfinite(t["checksum"]) and t["checksum"] != 0
