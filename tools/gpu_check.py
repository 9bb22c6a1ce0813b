"""`make gpu-check`: the one offline command to run first on a GPU machine.

    python tools/gpu_check.py            # or: make gpu-check
    GPU_CHECK_QUICK=1 make gpu-check     # ~3 minutes: one parity case, test_gpu.py, a short bench

Steps, most informative first; each runs in a subprocess with its own time limit, its
output goes to a log in the results folder, and a failing step never stops the next one:

  1. env          versions (python, torch, CUDA, triton, nvcc, driver), the device, git
  2. build        `pip install --no-build-isolation --no-deps --no-index -e .` with the CUDA
                  kernels for the local arch, all cores (falls back to `setup.py build_ext
                  --inplace` if pip itself fails); then fastrank.backends()
  -- without a CUDA device it stops here, with the summary ("no CUDA device")
  3. parity       fp64 values + gradients of every op on cuda and triton vs naive, host syncs
                  and kernel launches per call (tools/gpu_parity.py)
  4. gpu-tests    tests/test_gpu.py and tests/test_cuda_fused.py (per-test timeout when
                  pytest-timeout is installed)
  5. bench-batch  bench/run.py --device cuda: batch workload, a few sizes up to the largest
                  naive fits, every op on naive/torch/triton/cuda
  6. bench-dense  the dense workload once
  6b. bench-xbm   the xbm workload (Q = 256 against N = 16k / 64k), torch/triton/cuda
  6c. bench-large SupAP, Smooth-AP, H-AP at B = 16384 and 65536 on triton/cuda (fused losses)
  7. triton-tests the Triton test files compiled on the GPU (not in quick mode)

Everything lands in bench/results/gpu_<device>_<date>/ (the build log, each step's log, CSVs,
PNGs, JUnit XML) with summary.md, which is printed last. When every parity row and GPU test
of a backend passed, fastrank/gpu_evidence.json records the summary as that backend's evidence
(and, once both GPU backends have it, which one the benchmark found faster): `auto` on CUDA
reads it (fastrank/core/backend.py). Commit the folder and the JSON.

Budget (GPU_CHECK_BUDGET_S, default 450 s; quick 180 s): a step that cannot start with at
least its minimum time left is recorded as skipped. Needs no network: nothing is installed
from a registry.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python tools/gpu_check.py` puts tools/, not the repository, on sys.path
    sys.path.insert(0, ROOT)

from bench.op_keys import current_op_key  # noqa: E402 - torch-free: this process never imports torch

PY = os.environ.get("PY", sys.executable)
QUICK = os.environ.get("GPU_CHECK_QUICK", "0") == "1"
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "180" if QUICK else "450"))
EVIDENCE = os.path.join(ROOT, "fastrank", "gpu_evidence.json")
GPU_BACKENDS = ("cuda", "triton")


@dataclass
class Step:
    name: str
    status: str = "not run"  # ok | failed | timeout | skipped | not run
    seconds: float = 0.0
    log: str = ""
    note: str = ""


@dataclass
class Check:
    out: str
    start: float = field(default_factory=time.monotonic)
    steps: List[Step] = field(default_factory=list)
    facts: Dict[str, str] = field(default_factory=dict)

    def left(self) -> float:
        return BUDGET_S - (time.monotonic() - self.start)

    def run(self, name: str, cmd: List[str], limit_s: float, min_s: float = 20.0,
            env: Optional[Dict[str, str]] = None) -> Step:
        """Runs `cmd` with at most min(limit_s, budget left) seconds; output to <out>/<name>.log."""
        step = Step(name, log=f"{name}.log")
        self.steps.append(step)
        left = self.left()
        if left < min_s:
            step.status, step.note = "skipped", f"budget: {left:.0f} s left, needs >= {min_s:.0f} s"
            print(f"[gpu-check] {name}: skipped ({step.note})", flush=True)
            return step
        limit = max(1.0, min(limit_s, left))
        print(f"[gpu-check] {name}: {' '.join(shlex.quote(c) for c in cmd)}  (limit {limit:.0f} s)", flush=True)
        full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        full_env.update(env or {})
        t0 = time.monotonic()
        with open(os.path.join(self.out, step.log), "w") as log:
            log.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                        start_new_session=True)
                try:
                    rc = proc.wait(timeout=limit)
                    step.status = "ok" if rc == 0 else "failed"
                    step.note = "" if rc == 0 else f"exit {rc}"
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()
                    step.status, step.note = "timeout", f"killed after {limit:.0f} s"
            except OSError as e:
                step.status, step.note = "failed", f"could not start: {e}"
        step.seconds = time.monotonic() - t0
        print(f"[gpu-check] {name}: {step.status} in {step.seconds:.0f} s {step.note}", flush=True)
        return step


# ----------------------------------------------------------------------------- facts


def _probe(code: str) -> str:
    try:
        r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=ROOT))
        return (r.stdout.strip() or r.stderr.strip().splitlines()[-1]) if (r.stdout or r.stderr) else ""
    except (OSError, subprocess.TimeoutExpired, IndexError) as e:
        return f"unavailable ({e})"


def _cmd_line(cmd: List[str], pattern: str = "") -> str:
    if shutil.which(cmd[0]) is None:
        return "not found"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    lines = [ln.strip() for ln in out.splitlines() if ln.strip() and (not pattern or re.search(pattern, ln))]
    return lines[-1] if lines else ""


def gather_facts() -> Dict[str, str]:
    raw = _probe(
        "import json, torch\n"
        "d = {'torch': torch.__version__, 'torch_cuda': str(torch.version.cuda), 'cuda_available': torch.cuda.is_available()}\n"
        "if d['cuda_available']:\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    d.update(device=p.name, capability='%d.%d' % (p.major, p.minor), sms=p.multi_processor_count,\n"
        "             memory_gib=round(p.total_memory / 2**30, 1), devices=torch.cuda.device_count())\n"
        "print(json.dumps(d))")
    try:
        torch_facts = json.loads(raw.splitlines()[-1])
    except (ValueError, IndexError):
        torch_facts = {"torch": f"not importable ({raw})"}
    facts = {k: str(v) for k, v in torch_facts.items()}
    facts["python"] = platform.python_version()
    facts["triton"] = _probe("import triton; print(triton.__version__)") or "?"
    facts["nvcc"] = _cmd_line(["nvcc", "--version"], r"release")
    facts["driver"] = _cmd_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    facts["cpu_cores"] = str(os.cpu_count())
    facts["git"] = os.environ.get("GPU_CHECK_GIT_SHA") or _cmd_line(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]) \
        or "unknown (no .git here; set GPU_CHECK_GIT_SHA)"
    facts["quick"] = str(QUICK)
    return facts


def cuda_home() -> Optional[str]:
    """A CUDA toolkit root holding include/cuda_runtime.h: $CUDA_HOME, nvcc's (through links), /usr/local/cuda.

    torch guesses CUDA_HOME from the directory `nvcc` is found in, which is wrong when nvcc is a
    wrapper script or link in /usr/local/bin: the glue then misses cuda_runtime.h."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


# ----------------------------------------------------------------------------- results


def junit_counts(path: str) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """({passed, failed, errors, skipped, xfailed, xpassed}, [(test id, first line of failure)])."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0, xfailed=0, xpassed=0)
    failures: List[Tuple[str, str]] = []
    if not os.path.exists(path):
        return counts, failures
    try:
        tree = ET.parse(path)
    except ET.ParseError:
        return counts, [("(junit xml unreadable)", path)]
    for tc in tree.iter("testcase"):
        tid = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        kids = {c.tag: c for c in tc}
        if "failure" in kids or "error" in kids:
            node = kids.get("failure", kids.get("error"))
            msg = (node.get("message") or node.text or "").strip().splitlines()
            counts["failed" if "failure" in kids else "errors"] += 1
            failures.append((tid, msg[0][:240] if msg else ""))
        elif "skipped" in kids:
            kind = kids["skipped"].get("type", "")
            counts["xfailed" if "xfail" in kind else "skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failures


def read_rows(path: str) -> List[Dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def bench_table(log_path: str) -> str:
    """The markdown table bench/run.py printed (from its '## fastrank' line to the 'wrote' line)."""
    if not os.path.exists(log_path):
        return ""
    lines = open(log_path, errors="replace").read().splitlines()
    out, on = [], False
    for ln in lines:
        if ln.startswith("## fastrank"):
            on = True
        if on:
            out.append(ln)
        if on and ln.startswith("wrote "):
            break
    return "\n".join(out)


def backend_verdicts(parity: List[Dict[str, str]], failures: List[Tuple[str, str]],
                     junit_ran: bool) -> Dict[str, Tuple[bool, str]]:
    """Per GPU backend: (verified, why). Verified = it has parity rows, all pass, and no GPU test whose
    id names it (or names neither backend) failed."""
    out = {}
    for b in GPU_BACKENDS:
        rows = [r for r in parity if r["backend"] == b]
        bad = [r for r in rows if r["status"] != "pass"]
        test_bad = [t for t, _ in failures if b in t or not any(x in t for x in GPU_BACKENDS)]
        if not rows:
            out[b] = (False, "no parity rows")
        elif bad:
            out[b] = (False, f"{len(bad)} of {len(rows)} parity rows not passing")
        elif not junit_ran:
            out[b] = (False, "GPU tests did not run")
        elif test_bad:
            out[b] = (False, f"{len(test_bad)} GPU tests failed")
        else:
            out[b] = (True, f"{len(rows)} parity rows pass, GPU tests pass")
    return out


def preferred_backend(bench_csvs: List[str]) -> Tuple[Optional[str], str]:
    """Geometric mean over the bench points both GPU backends ran of t_triton / t_cuda.

    Op keys go through bench/op_keys.py, so a CSV from before the rename pairs with a new one.
    """
    import math

    times: Dict[Tuple[str, ...], Dict[str, float]] = {}
    for path in bench_csvs:
        for r in read_rows(path):
            if r.get("status") == "ok" and r.get("backend") in GPU_BACKENDS and r.get("p50_ms"):
                key = (current_op_key(r["op"]), r["workload"], r["mode"], r["x"])
                times.setdefault(key, {})[r["backend"]] = float(r["p50_ms"])
    ratios = [t["triton"] / t["cuda"] for t in times.values() if len(t) == 2 and t["cuda"] > 0]
    if not ratios:
        return None, "no benchmark point ran on both GPU backends"
    g = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    who = "cuda" if g > 1 else "triton"
    return who, f"t_triton / t_cuda geometric mean {g:.2f} over {len(ratios)} points"


def update_evidence(verdicts: Dict[str, Tuple[bool, str]], summary_rel: str, bench_csvs: List[str]) -> str:
    try:
        with open(EVIDENCE) as f:
            ev = json.load(f)
    except (OSError, ValueError):
        ev = {}
    changed = []
    for b, (ok, _) in verdicts.items():
        if ok:
            ev[b] = summary_rel
            changed.append(b)
    if all(ev.get(b) for b in GPU_BACKENDS) and changed:
        who, why = preferred_backend(bench_csvs)
        if who is not None:
            ev["preferred_on_cuda"], ev["preferred_because"] = who, f"{why} ({summary_rel})"
    if not changed:
        return "fastrank/gpu_evidence.json unchanged (no GPU backend verified in this run)"
    with open(EVIDENCE, "w") as f:
        json.dump(ev, f, indent=2, sort_keys=True)
        f.write("\n")
    return f"fastrank/gpu_evidence.json: {', '.join(changed)} verified by {summary_rel}"


def write_summary(chk: Check, no_device: bool) -> str:
    f = chk.facts
    lines = [f"# fastrank gpu-check — {f.get('device', 'no CUDA device')}", ""]
    lines.append(f"{_dt.datetime.now().isoformat(timespec='seconds')}, git {f.get('git')}, "
                 f"{'quick' if QUICK else 'full'} run, {time.monotonic() - chk.start:.0f} s of a {BUDGET_S:.0f} s budget")
    lines.append("")
    if no_device:
        lines += ["**No CUDA device**: `torch.cuda.is_available()` is False here "
                  f"(torch {f.get('torch')}, built for CUDA {f.get('torch_cuda')}). The CPU-side steps (versions, "
                  "build) ran; the GPU steps need a CUDA machine.", ""]
    lines += ["## Versions", "", "| | |", "|---|---|"]
    for k in ("device", "capability", "sms", "memory_gib", "driver", "torch", "torch_cuda", "triton", "nvcc",
              "python", "cpu_cores", "git"):
        if k in f:
            lines.append(f"| {k} | {f[k]} |")
    lines += ["", "## Steps", "", "| step | status | seconds | log | note |", "|---|---|---|---|---|"]
    for s in chk.steps:
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.log} | {s.note} |")
    backends_txt = os.path.join(chk.out, "backends.txt")
    if os.path.exists(backends_txt):
        lines += ["", "## fastrank.backends()", "", "```", open(backends_txt).read().strip(), "```"]

    parity = read_rows(os.path.join(chk.out, "parity.csv"))
    if parity:
        lines += ["", "## Parity (fp64 vs naive; values rtol 1e-10, gradients rtol 1e-8)", ""]
        for b in sorted({r["backend"] for r in parity}):
            rows = [r for r in parity if r["backend"] == b]
            n = {s: sum(1 for r in rows if r["status"] == s) for s in ("pass", "fail", "error", "unavailable")}
            lines.append(f"- **{b}**: {n['pass']} pass, {n['fail']} fail, {n['error']} error"
                         + (f" (unavailable: {rows[0]['note']})" if n["unavailable"] else ""))
        bad = [r for r in parity if r["status"] in ("fail", "error")]
        for r in bad[:30]:
            lines.append(f"  - {r['op']} / {r['backend']} / {r['case']}: {r['status']} "
                         f"value_err {r['value_err'] or '-'} grad_err {r['grad_err'] or '-'} {r['note']}")
        counted = [r for r in parity if r.get("syncs")]
        if counted:
            lines += ["", "Host syncs and CUDA kernel launches per forward+backward call (first case; the target "
                      "of the sync-free kernels is 0 syncs and <= 4 launches):", "",
                      "| op | backend | host syncs | launches |", "|---|---|---|---|"]
            for r in counted:
                lines.append(f"| {r['op']} | {r['backend']} | {r['syncs']} | {r['launches']} |")

    all_failures: List[Tuple[str, str]] = []
    junit_ran = False
    for name in ("gpu-tests", "triton-tests"):
        counts, failures = junit_counts(os.path.join(chk.out, f"{name}.xml"))
        if sum(counts.values()) == 0:
            continue
        junit_ran = junit_ran or name == "gpu-tests"
        all_failures += failures
        lines += ["", f"## {name}", "", ", ".join(f"{v} {k}" for k, v in counts.items())]
        for tid, msg in failures[:40]:
            lines.append(f"- `{tid}`: {msg}")
        if len(failures) > 40:
            lines.append(f"- ... {len(failures) - 40} more in {name}.xml")

    bench_csvs = []
    for name in ("bench-batch", "bench-dense", "bench-xbm", "bench-large"):
        table = bench_table(os.path.join(chk.out, f"{name}.log"))
        if table:
            lines += ["", f"## {name}", "", table]
        bench_csvs += sorted(os.path.join(chk.out, p) for p in os.listdir(chk.out)
                             if p.startswith("gpu_") and p.endswith("_latest.csv") and name.split("-")[1] in p)

    if not no_device:
        verdicts = backend_verdicts(parity, all_failures, junit_ran)
        lines += ["", "## Verdict", ""]
        for b, (ok, why) in verdicts.items():
            lines.append(f"- {b}: {'VERIFIED on this GPU' if ok else 'not verified'} ({why})")
        summary_rel = os.path.relpath(os.path.join(chk.out, "summary.md"), ROOT)
        lines.append("- " + update_evidence(verdicts, summary_rel, bench_csvs))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(chk.out, "summary.md"), "w") as fh:
        fh.write(text)
    return text


# ----------------------------------------------------------------------------- main


def _has(module: str) -> bool:
    return _probe(f"import {module}") == ""


def main() -> int:
    facts = gather_facts()
    date = _dt.date.today().strftime("%Y%m%d")
    device = facts.get("device")
    out = os.environ.get("GPU_CHECK_OUT") or os.path.join(
        ROOT, "bench", "results", f"gpu_{_slug(device) if device else 'no-cuda-device'}_{date}")
    os.makedirs(out, exist_ok=True)
    chk = Check(out, facts=facts)
    print(f"[gpu-check] results in {os.path.relpath(out, ROOT)}; budget {BUDGET_S:.0f} s"
          f"{' (quick)' if QUICK else ''}", flush=True)
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(facts, f, indent=2)
    chk.steps.append(Step("env", "ok", 0.0, "env.json"))

    # 2. build: the CUDA kernels when torch has CUDA, for this device's arch (9.0, the lent H200's, without one)
    jobs = str(os.cpu_count() or 2)
    build_env = {"MAX_JOBS": jobs}
    if facts.get("torch_cuda", "None") != "None" and shutil.which("nvcc"):
        build_env["FASTRANK_FORCE_CUDA"] = "1"
        build_env["FASTRANK_CUDA_ARCHS"] = os.environ.get("FASTRANK_CUDA_ARCHS") or facts.get("capability", "9.0")
        home = cuda_home()
        if home:
            build_env["CUDA_HOME"] = home
    if os.environ.get("GPU_CHECK_SKIP_BUILD") == "1":  # the test of this script: the tree is built already
        chk.steps.append(Step("build", "skipped", note="GPU_CHECK_SKIP_BUILD=1"))
    else:
        step = chk.run("build", [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                                 "-e", "."], limit_s=420, min_s=0, env=build_env)
        if step.status != "ok":
            chk.run("build-inplace", [PY, "setup.py", "build_ext", "--inplace"], limit_s=420, min_s=60, env=build_env)
    chk.run("backends", [PY, "-c", "import fastrank\nfor k, v in fastrank.backends().items(): print(f'{k:7s} {v}')"],
            limit_s=60, min_s=0)
    with open(os.path.join(out, "backends.log")) as src, open(os.path.join(out, "backends.txt"), "w") as dst:
        dst.writelines(ln for ln in src if not ln.startswith("$ "))  # the log's first line is the command

    no_device = facts.get("cuda_available") != "True"
    if no_device:
        print("[gpu-check] no CUDA device (torch.cuda.is_available() is False): the GPU steps need a CUDA "
              "machine; wrote the summary of the CPU-side steps", flush=True)
    else:
        quick = ["--quick"] if QUICK else []
        # tests: one Triton config per kernel (autotuning every test shape would take most of the budget)
        test_env = {"FASTRANK_TRITON_AUTOTUNE": "0"}
        pytest_extra = ["-p", "pytest_timeout", "--timeout", "120"] if _has("pytest_timeout") else []
        chk.run("parity", [PY, "tools/gpu_parity.py", "--out", os.path.join(out, "parity.csv")] + quick,
                limit_s=90 if QUICK else 150, min_s=20)
        chk.run("gpu-tests", [PY, "-m", "pytest", "tests/test_gpu.py", "tests/test_cuda_fused.py", "-q", "-rfE",
                              "-p", "no:cacheprovider",
                              "--junitxml", os.path.join(out, "gpu-tests.xml")] + pytest_extra,
                limit_s=120 if QUICK else 240, min_s=30, env=test_env)
        bench = [PY, "bench/run.py", "--device", "cuda", "--modes", "full", "--backends", "naive,torch,triton,cuda",
                 "--out-dir", out, "--min-time", "0.1" if QUICK else "0.2"]
        sizes = "256,1024,4096" if QUICK else "256,1024,2048,4096,8192"
        chk.run("bench-batch", bench + ["--tag", "batch", "--workloads", "batch", "--sizes", sizes,
                                              "--budget-min", "1.0" if QUICK else "2.5"],
                limit_s=90 if QUICK else 200, min_s=30)
        chk.run("bench-dense", bench + ["--tag", "dense", "--workloads", "dense", "--sizes", "2048" if QUICK else "4096",
                                              "--budget-min", "0.5" if QUICK else "1.0"],
                limit_s=45 if QUICK else 90, min_s=20)
        # the cross-batch-memory workload (Q = 256 queries against a 64k memory: the split rows) and
        # one batch far past what naive holds (issue 17's B = 65,536 in one step), fused backends only
        chk.run("bench-xbm", bench + ["--tag", "xbm", "--workloads", "xbm", "--backends", "torch,triton,cuda",
                                      "--sizes", "16384" if QUICK else "16384,65536",
                                      "--budget-min", "0.5" if QUICK else "1.0"],
                limit_s=45 if QUICK else 90, min_s=20)
        chk.run("bench-large", bench + ["--tag", "large", "--workloads", "batch", "--backends", "triton,cuda",
                                        "--ops", "sup_ap,smooth_ap,h_ap",
                                        "--sizes", "16384" if QUICK else "16384,65536",
                                        "--budget-min", "0.5" if QUICK else "1.0"],
                limit_s=45 if QUICK else 90, min_s=20)
        if not QUICK:
            xdist = ["-n", "4"] if _has("xdist") else []
            # the kernel-API files, and every family's backend-vs-naive tests on the triton (and cuda) backend
            chk.run("triton-tests", [PY, "-m", "pytest", "tests/test_triton.py", "tests/test_triton_graded.py",
                                     "tests/test_triton_histogram.py", "tests/test_triton_fused.py",
                                     "tests/test_triton_fused_graded.py", "tests/test_triton_fused_histogram.py",
                                     "tests/test_triton_graded_key.py", "tests/test_hrank.py",
                                     "tests/test_rank_sums.py", "tests/test_graded.py",
                                     "tests/test_histogram.py", "tests/test_gradcheck.py", "-k",
                                     "triton or cuda or kernel", "-q", "-rfE", "-m", "not slow",
                                     "-p", "no:cacheprovider", "--junitxml", os.path.join(out, "triton-tests.xml")]
                    + xdist + pytest_extra, limit_s=600, min_s=45, env=test_env)
    text = write_summary(chk, no_device)
    print("\n" + "=" * 100 + "\n" + text)
    print(f"[gpu-check] wrote {os.path.relpath(out, ROOT)}/summary.md")
    if no_device:
        return 2
    return 0 if all(s.status in ("ok", "skipped") for s in chk.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
