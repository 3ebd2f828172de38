# The two commands that matter: `make demo` and `make test`. Both set everything up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The package metadata's version comes from monitor/__init__.py: a bump reinstalls too, and so does a
# change to the compiled scan (setup.py, monitor/signals/textscan.c), which the editable install builds.
STAMP_INPUTS := pyproject.toml setup.py monitor/__init__.py monitor/signals/textscan.c sdk/python/pyproject.toml
STAMP := $(VENV)/.installed-$(shell cat $(STAMP_INPUTS) | sha1sum | cut -c1-12)
PYTEST_ARGS ?=
# `make test` runs its tests in pytest-xdist workers, one per core of the 2-core machine it is sized
# for: the suite spends most of its time in one thread (24:22 in one process on a 2-core AMD EPYC
# with AVX2, 14:53 in two; tests/conftest.py keeps each worker's PyTorch to its share of the
# cores). `worksteal` hands out tests so that one file's long tests move to an idle worker;
# `loadfile` would collapse tests that share a node id (schemathesis' API operations under
# pytest 9) into one and run only that.
# `make test-slow` stays in one process: its end-to-end tests keep both cores busy on their own (the
# broker, the service, the browser), and two workers took 18:05 on that EPYC where one process had
# taken 15:11 on an earlier, AVX-512 machine. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist worksteal)

# Nothing may download models or data at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install chromium prometheus axe schema demo test test-slow test-all test-alibi bench lint imports clean

install: $(STAMP)

$(STAMP): $(STAMP_INPUTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip setuptools wheel
	# torch is pinned (2.13.0, CPU wheel on local disk) so pip never pulls a CUDA build.
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The Python SDK (oversight-client, sdk/python): its own light distribution; tests/sdk use it.
	$(BIN)/python -m pip install -q -e sdk/python
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/oversight demo $(DEMO_ARGS)

# Browser tests use Debian's Chromium (never a downloaded browser).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# Deployment tests use Debian's promtool and Prometheus server (rules unit tests, a live scrape of the monitor)
# and amtool from prometheus-alertmanager (checks of the Alertmanager routing example).
prometheus:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 && command -v amtool >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus prometheus-alertmanager >/dev/null)

# The accessibility scan (tests/review/test_axe.py) injects axe-core, from npm into .cache/axe (once: the
# file's presence makes it a no-op). Without node/npm nothing is installed and the scan skips, saying why.
AXE_JS := .cache/axe/node_modules/axe-core/axe.min.js
axe:
	@test -f $(AXE_JS) || command -v npm >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null)
	@test -f $(AXE_JS) || npm install --prefix .cache/axe --no-audit --no-fund --silent axe-core@4

# The `config:` part of helm/oversight/values.schema.json comes from the service's Settings: run this after
# changing a setting (tests/deploy/test_helm.py fails until the committed schema matches).
schema: install
	$(BIN)/python tests/deploy/chart_schema.py

# `make test` stays under 20 minutes on 2 cores (in two workers, above): the slow end-to-end
# tests (marked `slow`: closed loop with kill -9, browser, Kafka crash, live Prometheus, demo) run
# in `make test-slow`, and CI (.ci/run) runs both.
test: install chromium prometheus axe
	$(BIN)/python -m pytest -m "not slow and not alibi" $(XDIST) $(PYTEST_ARGS)

test-slow: install chromium prometheus axe
	$(BIN)/python -m pytest -m "slow and not alibi" $(PYTEST_ARGS)

test-all: install chromium prometheus axe
	$(BIN)/python -m pytest -m "not alibi" $(PYTEST_ARGS)

# alibi-detect (the `alibi` extra, BSL 1.1) is no part of the default install nor of .venv: it needs
# numpy<2 and transformers<5, so its detectors' tests (marked `alibi`) run in their own virtualenv,
# .venv-alibi with `.[dev,alibi]`. CI (.ci/run) runs this after test-slow.
ALIBI_VENV := .venv-alibi
ALIBI_STAMP := $(ALIBI_VENV)/.installed-$(shell cat $(STAMP_INPUTS) | sha1sum | cut -c1-12)

$(ALIBI_STAMP): $(STAMP_INPUTS)
	test -x $(ALIBI_VENV)/bin/python || $(PY) -m venv $(ALIBI_VENV)
	$(ALIBI_VENV)/bin/python -m pip install -q -U pip setuptools wheel
	$(ALIBI_VENV)/bin/python -m pip install -q -e '.[dev,alibi]'
	# tests/sdk import the SDK: collecting them (before -m alibi deselects them) needs it.
	$(ALIBI_VENV)/bin/python -m pip install -q -e sdk/python
	rm -f $(ALIBI_VENV)/.installed-*
	touch $@

test-alibi: $(ALIBI_STAMP)
	$(ALIBI_VENV)/bin/python -m pytest -m alibi $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/run_all.py

# CI (.ci/run) runs this before the tests. mypy is strict on the product, the benchmarks and the
# tests (pyproject.toml); each test folder's conftest.py is module `conftest`, so all but the top
# one are checked one at a time.
lint: install
	$(BIN)/ruff check monitor sampling detectors tests bench sdk/python
	$(BIN)/ruff format --check monitor sampling detectors tests bench sdk/python
	$(BIN)/mypy
	for f in tests/*/conftest.py tests/*/*/conftest.py; do $(BIN)/mypy "$$f" || exit 1; done

# The package import graph (from ruff's analysis), cycles and private names imported across
# modules; tests/test_architecture.py asserts the same.
imports: install
	$(BIN)/python tests/import_graph.py

clean:
	rm -rf $(VENV) $(ALIBI_VENV) .cache/axe .oversight-demo .pytest_cache .mypy_cache .ruff_cache build *.egg-info
