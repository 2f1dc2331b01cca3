PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 3000

.PHONY: serve test test-fast bench clean-venv

# The venv is created only when missing; the project is (re)installed when pyproject changes.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test,ray]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/tuneserve serve --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/score.py

clean-venv:
	rm -rf $(VENV)
