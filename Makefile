# Two commands take a fresh clone to a working system: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/refund/demo.sh

test: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/step_overhead.py
	$(BIN)/python bench/expression_languages.py
	$(BIN)/python bench/retail_conformance.py
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache tether.db demo-run
