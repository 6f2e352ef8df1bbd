# Quick start:  make demo   (sets everything up, prints `flashdistill info`, runs `flashdistill demo`: a digits
#                            DiT teacher distilled into a one-step student, ~2-4 min on 2 cores)
#               make test   (sets everything up, compile-checks the CUDA sources and the Triton kernels,
#                            runs the test suite)
#
# Everything goes into .venv: torch 2.13.0 (the CPU wheel; the pin keeps pip from fetching a CUDA
# build), triton, pybind11 and ninja, then `pip install -e .` builds the C++ extension with ninja.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
NVCC   ?= $(shell command -v nvcc 2>/dev/null)
CUDA_ARCHS ?= 80 90
CSRC   := $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test test-full install build check-cuda check-triton bench info clean

demo: install
	$(VENV)/bin/flashdistill info
	$(VENV)/bin/flashdistill demo --out demo-out

test: install check-cuda check-triton
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q

test-full: install check-cuda
	FLASHDISTILL_HYPOTHESIS=full TRITON_INTERPRET=1 $(VENV)/bin/pytest -q -m "full or not full"

install: $(VENV)/.installed build

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 setuptools wheel pybind11 ninja
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $@

# Rebuild the extension (incrementally, ninja) whenever a C++/CUDA source changed.
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.installed setup.py $(CSRC)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

# Compile every .cu for each target architecture (no GPU needed): CUDA code that does not build
# never lands, even on machines that build only the CPU extension.
check-cuda: $(VENV)/.installed
	@if [ -z "$(NVCC)" ]; then echo "check-cuda: nvcc not found, skipped"; exit 0; fi; \
	set -e; tmp=$$(mktemp -d); \
	for f in csrc/cuda/*.cu; do for a in $(CUDA_ARCHS); do \
	  echo "nvcc sm_$$a $$f"; \
	  $(NVCC) -std=c++17 -O3 -Xcompiler -Wall -Icsrc/include -gencode arch=compute_$$a,code=sm_$$a \
	    -c $$f -o $$tmp/$$(basename $$f).$$a.o; \
	done; done; rm -rf $$tmp

# Compile every Triton kernel for sm_90 (no GPU needed: a fake driver, launches become warm-ups) and
# report registers, spills and shared memory; the tests only run the kernels in the interpreter, which
# never sees a GPU compile error. CHECK_TRITON_ARGS: e.g. --quick, --full, --arch 80.
CHECK_TRITON_ARGS ?=
check-triton: $(VENV)/.installed
	@if ! env -u TRITON_INTERPRET $(PY) -c "import triton" 2>/dev/null; then \
	  echo "check-triton: triton not importable, skipped"; exit 0; fi; \
	env -u TRITON_INTERPRET $(PY) tests/compile_triton.py $(CHECK_TRITON_ARGS)

bench: install
	$(PY) benchmarks/bench_dmd.py

info: install
	$(VENV)/bin/flashdistill info

clean:
	rm -rf build $(VENV) flashdistill/*.so flashdistill/_build_info.json
