# Every target that needs Python creates .venv if it is missing, installs torch first
# (TORCH_SPEC, e.g. TORCH_SPEC='torch==2.13.0 --index-url https://pypi.org/simple': PyPI's Linux
# wheel is the CUDA 13.0 build, see infra/Dockerfile), then the project.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Reference implementations used only by the parity tests and benchmarks. Their wheels declare
# dependencies they never import (torchvision, Lightning), so they are installed with --no-deps.
REFERENCE_PKGS ?= dall-e==0.1 taming-transformers==0.0.1

DEMO_OUT ?= demo-out
CONFIG ?= tiny
DATA ?= $(DEMO_OUT)/mix.json
PRETRAIN_OUT ?= runs/$(CONFIG)

.PHONY: help install dev test demo lint bench pretrain clean

help:
	@echo "make demo      run the whole study on the embedded demo data (CPU, local Ray)"
	@echo "make test      run the test suite"
	@echo "make pretrain  pre-train (CONFIG=$(CONFIG) DATA=$(DATA))"
	@echo "make bench     run the benchmarks in bench/"
	@echo "make lint      ruff"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PIP) install $(TORCH_SPEC)
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -e .
	@touch $@

# boto3 (for moto) is pinned to the botocore that s3fs's aiobotocore already installed: they are
# released in lockstep, and an unpinned boto3 newer than aiobotocore's botocore range sends pip's
# resolver backtracking through every ray and s3fs release.
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) install -e ".[dev]" "boto3==$$($(PY) -c 'import botocore; print(botocore.__version__)')"
	$(PIP) install --no-deps $(REFERENCE_PKGS)
	@touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

test: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check pipeline trainer schemas tests bench

bench: $(VENV)/.installed-dev
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

demo: $(VENV)/.installed
	$(VENV)/bin/toto-train demo --out $(DEMO_OUT) $(DEMO_ARGS)

# Pre-training. Default: the tiny preset on the demo token data, on CPU (the demo's data, tokenize and
# mix stages run first when DATA is the demo mix and does not exist yet). A real run:
#   make pretrain CONFIG=base DATA=mix.json PRETRAIN_OUT=runs/base PRETRAIN_ARGS='lr=3e-4'
pretrain: $(VENV)/.installed
	@if [ "$(DATA)" = "$(DEMO_OUT)/mix.json" ] && [ ! -f "$(DATA)" ]; then \
		$(VENV)/bin/toto-train demo --out $(DEMO_OUT) --until mix; fi
	$(VENV)/bin/toto-train pretrain --config $(CONFIG) --data $(DATA) --out $(PRETRAIN_OUT) $(PRETRAIN_ARGS)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
