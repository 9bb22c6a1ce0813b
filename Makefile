# fastrank: every target installs what it needs, so each works on a fresh machine.
#   make bench   install + build, run the default CPU benchmark, print the table, write CSV + plot
#   make test    install + build, run the whole test suite (CPU; GPU tests skip without CUDA)
#   make gpu-check  on a GPU machine, offline: build with CUDA, GPU tests, parity sweep, short GPU bench
#                   -> bench/results/gpu_<device>_<date>/summary.md (GPU_CHECK_QUICK=1: ~3 minutes)
PY ?= python3
PIP := $(PY) -m pip
export MAX_JOBS ?= 2
# OFFLINE=1 (or FASTRANK_OFFLINE=1 in the environment): no target installs anything; what is
# missing is reported, optional test packages (pytorch-metric-learning, expecttest) are skipped
OFFLINE ?= $(FASTRANK_OFFLINE)
PIP_LOCAL := $(if $(filter 1 yes true,$(OFFLINE)),--no-deps --no-index,)

.PHONY: all deps build test test-slow fuzz bench bench-full cuda-check clean gpu-check

all: test

# torch and triton only when missing: a GPU machine's own CUDA build must never be replaced
ifeq ($(PIP_LOCAL),)
deps:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@$(PY) -c "import triton" 2>/dev/null || $(PIP) install triton || echo "fastrank: triton could not be installed; its tests will be skipped"
	@$(PY) -c "import pytest, hypothesis, pytest_benchmark, matplotlib, tqdm, ninja" \
		2>/dev/null || $(PIP) install "pytest>=7" "hypothesis>=6" "pytest-benchmark>=4" "matplotlib>=3.5" "tqdm>=4" ninja
	@# optional: their tests skip without them, so a failed install (no registry) is not an error
	@$(PY) -c "import expecttest, pytorch_metric_learning" 2>/dev/null || $(PIP) install expecttest \
		"pytorch-metric-learning>=2.9" || echo "deps: expecttest / pytorch-metric-learning not installed; their tests will be skipped"
else
deps:
	@echo "deps: offline (OFFLINE=$(OFFLINE)): installing nothing"
	@$(PY) -c "import torch" 2>/dev/null || { echo "deps: torch is not importable and nothing may be installed offline"; exit 1; }
	@for m in triton pytest hypothesis pytest_benchmark matplotlib tqdm ninja expecttest pytorch_metric_learning; do \
		$(PY) -c "import $$m" 2>/dev/null || echo "deps: $$m is missing (offline): what needs it is skipped"; done
endif

build: deps
	$(PIP) install --no-build-isolation $(PIP_LOCAL) -e . -q

test: build
	@if command -v nvcc >/dev/null 2>&1; then $(MAKE) --no-print-directory cuda-check; \
	 else echo "cuda-check skipped: nvcc not found"; fi
	$(PY) -m pytest tests -q -m "not slow"

# compile every .cu with nvcc -c for sm_80 and sm_90 (no GPU needed), syntax-check the CUDA glue
cuda-check:
	PY=$(PY) ./tools/cuda_check.sh

test-slow: build
	$(PY) -m pytest tests -q -m slow

# long property-based run: every CPU backend vs the fp64 reference (FUZZ_EXAMPLES per op and backend)
FUZZ_EXAMPLES ?= 2000
fuzz: build
	FASTRANK_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py -q

# Benchmarks (bench/, docs/design.md §4). BENCH_ARGS / GPU_BENCH_ARGS pass options to bench/run.py
# (e.g. BENCH_ARGS="--ops sup_ap,histogram_ap:fastap --workloads dense --modes forward,backward"; op keys are
# the public function names, histogram_ap by kind; see --help).
#   make bench        default CPU sweep (batch workload, fwd+bwd, 7 ops x naive/torch/cpp), <= ~7.5 min on 2 cores
#   make bench-full   every workload x mode x op with larger sizes (hours on 2 cores)
#   make gpu-bench    builds the CUDA kernels, runs the GPU sweep; CSV/PNG named by device in bench/results/
#   make bench-micro  pytest-benchmark micro-benchmarks (bench/test_micro.py; not collected by `make test`)
bench: build
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/fused.py

bench-full: build
	$(PY) bench/run.py --full $(BENCH_ARGS)

.PHONY: gpu-bench bench-micro
# The first command on a lent GPU machine (no network): see tools/gpu_check.py and the README.
# Installs nothing; builds with CUDA for the local arch; every step has a time limit and
# the summary is written whatever fails. GPU_CHECK_QUICK=1 for ~3 minutes.
gpu-check:
	PY=$(PY) $(PY) tools/gpu_check.py

gpu-bench: build
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || { \
		echo "gpu-bench: torch.cuda.is_available() is False on this machine (no GPU, or a CPU-only torch build)."; \
		echo "gpu-bench: run it on a CUDA machine with a CUDA build of torch; the CPU sweep is \`make bench\`."; \
		exit 1; }
	FASTRANK_FORCE_CUDA=1 \
	FASTRANK_CUDA_ARCHS="$${FASTRANK_CUDA_ARCHS:-$$($(PY) -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}" \
	MAX_JOBS="$${GPU_MAX_JOBS:-$$(nproc)}" $(PIP) install --no-build-isolation $(PIP_LOCAL) -e . -q
	@$(PY) -c "import sys, fastrank; i = fastrank.backends()['cuda']; print('gpu-bench: cuda backend:', i.reason); sys.exit(0 if i.available else 1)"
	$(PY) bench/run.py --device cuda $(GPU_BENCH_ARGS)

bench-micro: build
	$(PY) -m pytest bench/test_micro.py --benchmark-only --benchmark-sort=name \
		--benchmark-columns=min,median,iqr,ops,rounds -q

# Training example (examples/train_retrieval.py): an MLP on scikit-learn's digits with every loss on the
# fused backend, parity with the naive backend (same seed), a full-batch scale run; prints the tables and
# writes examples/results/training_curves.{png,csv} + training_results.json. ~5 min on 2 cores (DEMO_ARGS adds options).
.PHONY: demo
demo: build
	@$(PY) -c "import sklearn" 2>/dev/null || $(if $(PIP_LOCAL),{ echo "demo: scikit-learn is missing (offline)"; exit 1; },$(PIP) install "scikit-learn>=1.0")
	$(PY) examples/train_retrieval.py --loss all --parity --scale --out examples/results $(DEMO_ARGS)

# Data-parallel example (examples/train_ddp.py): 2 CPU processes (gloo) x B/2 against one process x B
# in lockstep, every loss, float32 and float64; writes examples/results/ddp_parity_*.{csv,png} (~1 min on 2 cores)
.PHONY: demo-ddp
demo-ddp: build
	@$(PY) -c "import sklearn" 2>/dev/null || $(if $(PIP_LOCAL),{ echo "demo-ddp: scikit-learn is missing (offline)"; exit 1; },$(PIP) install "scikit-learn>=1.0")
	for dt in float32 float64; do OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc_per_node=2 \
		examples/train_ddp.py --loss all --parity --no-progress --dtype $$dt --out examples/results $(DEMO_ARGS) || exit 1; done

clean:
	rm -rf build *.egg-info fastrank/_C*.so
