# Quickstart: `make demo` runs the study on the embedded corpus, `make test` runs the tests.
# Each bootstraps a local virtual environment on first use.
#
#   TORCH=...   the torch requirement (default torch==2.13.0, the CPU build served here)
#   TRANSFORMERS=...  the transformers requirement (duollm.hf and its tests)
#   VENV=       empty: use $(PYTHON) as it is (e.g. on a GPU machine with torch installed)
#   PYTEST_ARGS extra pytest arguments, e.g. PYTEST_ARGS="-m gpu"
#   DEMO_ARGS   extra arguments for the demo

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRANSFORMERS ?= transformers>=5,<6
PYTEST_ARGS ?=
DEMO_ARGS ?=

ifeq ($(strip $(VENV)),)
PY := $(PYTHON)
READY := .duollm-installed-system
else
PY := $(VENV)/bin/python
READY := $(VENV)/.duollm-installed
endif

.PHONY: demo test lint bench clean help

help:
	@echo "make demo   - run the Duo-LLM study on the embedded corpus (bootstraps $(or $(VENV),the system python))"
	@echo "make test   - run the test suite (CPU; Triton kernels in the interpreter)"
	@echo "make lint   - ruff check duollm kernels tests benchmarks (rules in pyproject.toml)"
	@echo "make bench  - run the CPU microbenchmarks (pytest-benchmark)"
	@echo "make clean  - remove the virtual environment and build outputs"

# Remade when setup.py or this Makefile changes (new requirements reach existing checkouts).
# torch goes in first and alone, so that nothing installed after it (transformers declares no
# torch requirement, but a future release might) can pull a second, different torch build.
$(VENV)/.duollm-installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q setuptools wheel triton numpy safetensors tqdm matplotlib \
		pytest hypothesis pytest-benchmark ninja pybind11 ruff
	$(PY) -m pip install -q "$(TRANSFORMERS)" "$(TORCH)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,hf]" "$(TORCH)"
	touch $@

# No virtual environment: install the package into the given python, using what is there.
.duollm-installed-system: setup.py Makefile
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(READY)
	$(PY) -m duollm study --out runs/demo $(DEMO_ARGS)

test: $(READY)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(READY)
	$(PY) -m ruff check duollm kernels tests benchmarks

bench: $(READY)
	$(PY) -m pytest benchmarks/ --benchmark-only $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info duollm/_C*.so .duollm-installed-system
