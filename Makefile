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

# Stage 1 (f=8 autoencoder), stage 2 (text-conditional U-Net on its latents), then a grid of the ten classes.
demo: setup
	$(PY) train.py experiment=ae_f8
	$(PY) train.py experiment=ldm_f8
	$(PY) sample.py model_path=exports/ldm_f8 num_images=8 out_dir=samples/demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
