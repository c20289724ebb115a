# The README's two commands. PYTHON defaults to the project venv that `make setup` creates.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python

.PHONY: setup run test bench demo gpu-wheels

# TORCH=2.11.0 pins a torch version inside the supported range (CI tests both ends); empty: the newest in range.
TORCH ?=

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(if $(TORCH),$(PYTHON) -m pip install -q "torch==$(TORCH)")
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

# Main job: the distillation demo, then the quick benchmark (CPU backend vs nn.KLDivLoss / BCEWithLogitsLoss
# on a CPU-only machine, every GPU provider on a GPU).
run: setup
	$(PYTHON) examples/distill_demo.py --out demo_out
	$(PYTHON) -m benchmarks.run --quick --out bench_out

# The suite on every core (pytest-xdist); TEST_JOBS=0 runs it in this process.
TEST_JOBS ?= auto
test: setup
	$(PYTHON) -m pytest -q -n $(TEST_JOBS) tests

bench: setup
	$(PYTHON) -m benchmarks.run --out bench_out

demo: setup
	$(PYTHON) examples/distill_demo.py --out demo_out

# Wheels the GPU box (no network) installs if present: Liger-Kernel, a benchmark baseline. Carry wheels/ there.
gpu-wheels: setup
	$(PYTHON) -m pip download -q --no-deps -d wheels liger-kernel
