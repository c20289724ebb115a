# The README's two commands. PYTHON defaults to the project venv that `make setup` creates.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
# A failing pip in a pipe fails the recipe.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: setup dev-setup run test sanitize bench demo gpu-wheels

# TORCH=2.11.0 pins a torch version inside the supported range (CI tests both ends); empty: the newest in range.
TORCH ?=
# The CPU kernels for this CPU only (a third of the compile time); CI and wheels build every capability
# (KL_EXT_CPU_CAPABILITIES=default,avx2,avx512). The CUDA kernels are compiled when a GPU is visible or
# TORCH_CUDA_ARCH_LIST is set (setup.py says which in one line).
KL_EXT_CPU_CAPABILITIES ?= native
export KL_EXT_CPU_CAPABILITIES

# pip without -q: each package it fetches is a line (torch's download is the long one); the build prints a line per
# compiled unit (scripts/build.py).
$(VENV)/.installed: setup.py pyproject.toml requirements.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(if $(TORCH),$(PYTHON) -m pip install --progress-bar off "torch==$(TORCH)")
	$(PYTHON) -m pip install --progress-bar off -r requirements.txt | sed '/^Requirement already satisfied/d'
	$(PYTHON) scripts/build.py
	touch $@

# What the tests need besides (pytest, TRL, safetensors, ...).
$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt
	$(PYTHON) -m pip install --progress-bar off -r requirements-dev.txt | sed '/^Requirement already satisfied/d'
	touch $@

setup: $(VENV)/.installed
dev-setup: $(VENV)/.dev-installed

# Main job: the distillation demo, then the quick benchmark (CPU backend vs nn.KLDivLoss / BCEWithLogitsLoss
# on a CPU-only machine, every GPU provider on a GPU).
run: setup
	$(PYTHON) examples/distill_demo.py --out demo_out
	$(PYTHON) -m benchmarks.run --quick --out bench_out

# The suite on every core (pytest-xdist); TEST_JOBS=0 runs it in this process; TEST_ARGS more pytest arguments
# (e.g. TEST_ARGS='-m "not emulated"').
TEST_JOBS ?= auto
TEST_ARGS ?=
test: dev-setup
	$(PYTHON) -m pytest -q -n $(TEST_JOBS) $(TEST_ARGS) tests

# memcheck and racecheck without a GPU: the CPU and the emulated CUDA kernels under ASan + UBSan and TSan, and two
# mutants they must report (scripts/sanitize.sh: three instrumented builds, then the tests; a CI stage).
sanitize: dev-setup
	bash scripts/sanitize.sh

bench: setup
	$(PYTHON) -m benchmarks.run --out bench_out

demo: setup
	$(PYTHON) examples/distill_demo.py --out demo_out

# Wheels the GPU box (no network) installs if present: Liger-Kernel, a benchmark baseline. Carry wheels/ there.
gpu-wheels: setup
	$(PYTHON) -m pip download -q --no-deps -d wheels liger-kernel
