# curvlab — two commands for a newcomer:
#   make test        lint + unit tests + doctests + notebooks (nbval, quick mode)
#   make reproduce   quick CPU reproduction of every documented experiment -> results/
# Override the torch pin with e.g. `make test TORCH="torch==2.5.1"`.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.curvlab-installed

.PHONY: install test lint unit notebooks reproduce reproduce-full benchmarks clean device-suite

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check curvlab tests benchmarks notebooks conftest.py

test: lint
	$(BIN)/python -m pytest -q tests curvlab notebooks --nbval-lax --nbval-current-env

unit: install
	$(BIN)/python -m pytest -q tests curvlab

notebooks: install
	$(BIN)/python -m pytest -q notebooks --nbval-lax --nbval-current-env

reproduce: install
	$(BIN)/python -m curvlab reproduce --out results

reproduce-full: install
	$(BIN)/python -m curvlab reproduce --full --out results

# Peers (pyproject's `benchmarks` extra) with --no-deps: no torchvision, no CUDA wheels.
# BENCH_ARGS / TTT_ARGS / DIST_ARGS pass options through, e.g. a check that every table runs:
#   make benchmarks BENCH_ARGS="--repeats 1" TTT_ARGS="--repeats 1 --quick" DIST_ARGS=--smoke
BENCH_PEERS := curvlinops-for-pytorch backpack-for-pytorch asdfghjkl heavyball einops einconv \
	unfoldnd opt-einsum linear-operator
benchmarks: install
	$(BIN)/python -m pip install -q --no-deps $(BENCH_PEERS)
	$(BIN)/python benchmarks/flops.py
	$(BIN)/python benchmarks/products.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/optimizers.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/kfac_step.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/kfac_refresh.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/peers.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/time_to_target.py $(TTT_ARGS)
	$(BIN)/python benchmarks/distributed.py $(DIST_ARGS)

clean:
	rm -rf $(VENV) results .pytest_cache

# One prepared GPU run (papers/README_gpu.md): on the lent machine `make device-suite` writes
# to $OUT; here `make device-suite ARGS=--smoke` runs the same path at tiny CPU sizes.
device-suite:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) benchmarks/device_suite.py \
		--out $${OUT:-results/device-suite} --budget-s 520 $(ARGS)
