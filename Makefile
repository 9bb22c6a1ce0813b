# fastrank: every target installs what it needs, so each works on a fresh machine.
#   make bench   install + build, run the default CPU benchmark, print the table, write CSV + plot
#   make test    install + build, run the whole test suite (CPU; GPU tests skip without CUDA)
PY ?= python3
PIP := $(PY) -m pip
export MAX_JOBS ?= 2

.PHONY: all deps build test test-slow bench bench-full cuda-check clean

all: test

# torch and triton only when missing: a GPU machine's own CUDA build must never be replaced
deps:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@$(PY) -c "import triton" 2>/dev/null || $(PIP) install triton || echo "fastrank: triton could not be installed; its tests will be skipped"
	@$(PY) -c "import pytest, hypothesis, pytest_benchmark, matplotlib, tqdm, ninja, expecttest" 2>/dev/null || \
		$(PIP) install "pytest>=7" "hypothesis>=6" "pytest-benchmark>=4" "matplotlib>=3.5" "tqdm>=4" ninja expecttest

build: deps
	$(PIP) install --no-build-isolation -e . -q

test: build
	@if command -v nvcc >/dev/null 2>&1; then $(MAKE) --no-print-directory cuda-check; \
	 else echo "cuda-check skipped: nvcc not found"; fi
	$(PY) -m pytest tests -q -m "not slow"

# compile every .cu with nvcc -c for sm_80 and sm_90 (no GPU needed), syntax-check the CUDA glue
cuda-check:
	PY=$(PY) ./tools/cuda_check.sh

test-slow: build
	$(PY) -m pytest tests -q -m slow

bench: build
	$(PY) bench/run.py

bench-full: build
	$(PY) bench/run.py --full

clean:
	rm -rf build *.egg-info fastrank/_C*.so
