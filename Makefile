# Quickstart: `make demo` runs the study on the embedded corpus, `make test` runs the tests.
# Each bootstraps a local virtual environment on first use.
#
#   TORCH=...   the torch requirement (default torch==2.13.0, the CPU build served here)
#   VENV=       empty: use $(PYTHON) as it is (e.g. on a GPU machine with torch installed)
#   PYTEST_ARGS extra pytest arguments, e.g. PYTEST_ARGS="-m gpu"
#   DEMO_ARGS   extra arguments for the demo

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_ARGS ?=

ifeq ($(strip $(VENV)),)
PY := $(PYTHON)
READY := .duollm-installed-system
else
PY := $(VENV)/bin/python
READY := $(VENV)/.duollm-installed
endif

.PHONY: demo test bench clean help

help:
	@echo "make demo   - run the Duo-LLM study on the embedded corpus (bootstraps $(or $(VENV),the system python))"
	@echo "make test   - run the test suite (CPU; Triton kernels in the interpreter)"
	@echo "make bench  - run the CPU microbenchmarks (pytest-benchmark)"
	@echo "make clean  - remove the virtual environment and build outputs"

$(VENV)/.duollm-installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q setuptools wheel triton numpy safetensors tqdm matplotlib \
		pytest hypothesis pytest-benchmark ninja pybind11
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

# No virtual environment: install the package into the given python, using what is there.
.duollm-installed-system: setup.py
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(READY)
	$(PY) -m duollm study --out runs/demo $(DEMO_ARGS)

test: $(READY)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(READY)
	$(PY) -m pytest benchmarks/ --benchmark-only $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info duollm/_C*.so .duollm-installed-system
