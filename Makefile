# Two entry points for a fresh machine: `make demo` (main job on the built-in dataset) and
# `make test` (the test suite). Both set up what they need and are quick once set up.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint

setup: $(FMNIST) $(STAMP)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# torch first (the pair from local disk where it lies there), then the project, so nothing replaces it.
$(STAMP): pyproject.toml
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The demo within 30 minutes on this machine: Fashion-MNIST shards, a probe of this CPU's speed, stage 1
# (f=8 autoencoder) and stage 2 (text-conditional U-Net) with budgets planned from it, a grid of the ten
# classes and a per-class accuracy table (scripts/demo.py; MINUTES=45 make demo for a longer one).
# The deadline counts from make's start: the set-up (venv, packages) comes out of the demo's 30 minutes.
MINUTES ?= 30
DEMO_SINCE := $(shell date +%s.%N)
demo: setup
	$(PY) scripts/demo.py --minutes $(MINUTES) --since $(DEMO_SINCE)

# One pytest worker per core (pytest-xdist; TEST_WORKERS=1 for one process), idle workers taking tests from busy
# ones; the longer tests start first (tests/conftest.py).
TEST_WORKERS ?= auto
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: setup
	$(VENV)/bin/ruff check .
