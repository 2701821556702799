# The two entry points of the README: `make demo` and `make test`.
# Each creates the virtual environment in .venv (ignored by git) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: demo test lint

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(BIN)/upop demo

test: $(STAMP)
	$(OFFLINE) $(BIN)/ruff check src tests
	$(OFFLINE) $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests
