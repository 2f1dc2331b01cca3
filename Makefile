PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 3000

.PHONY: serve test test-fast bench clean-venv browser fashion-data

# The venv is created only when missing; the project is (re)installed when pyproject changes.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test,ray]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/tuneserve serve --port $(PORT)

test: $(STAMP) browser fashion-data
	$(BIN)/python -m pytest

# The console's browser tests drive Debian's chromium through chromedriver (nothing can download a
# browser build here). Installed with apt when missing and we are root; otherwise a clear stop.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "the console tests need a browser: install the Debian packages 'chromium' and 'chromium-driver' (as root: apt-get install chromium chromium-driver)"; exit 1; fi

# The transfer benchmark's Fashion-MNIST target reads Debian's dataset-fashion-mnist (the official
# IDX files under /usr/share/datasets/fashion-mnist). Installed with apt when missing and we are root.
fashion-data:
	@if [ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist || \
		 (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	else echo "the transfer benchmark's fashion target needs the Debian package 'dataset-fashion-mnist' (as root: apt-get install dataset-fashion-mnist)"; exit 1; fi

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/score.py

clean-venv:
	rm -rf $(VENV)
