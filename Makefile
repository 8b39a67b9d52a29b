# Quickstart: `make demo` runs the study on the embedded corpus, `make test` runs the tests.
# Each bootstraps a local virtual environment on first use, from the committed lock of tested
# versions (constraints.txt), so a release elsewhere cannot break a fresh clone.
#
#   TORCH=...   the torch requirement (default torch==2.13.0, the CPU build served here)
#   TRANSFORMERS=...  the transformers requirement (duollm.hf and its tests); the lock picks the
#               exact version inside it
#   LOCK=FILE   the constraints file the environment is installed from (default constraints.txt;
#               empty: the newest versions in the declared ranges)
#   VENV=       empty: use $(PYTHON) as it is (e.g. on a GPU machine with torch installed)
#   PYTEST_ARGS extra pytest arguments, e.g. PYTEST_ARGS="-m gpu"
#   DEMO_ARGS   extra arguments for the demo
#
# make test-latest  the suite against the newest versions in range (.venv-latest, no lock)
# make test-oldest  the suite against the oldest declared transformers (.venv-oldest)
# make lock         test-latest, then write what it passed with into constraints.txt

PYTHON ?= python3
VENV ?= .venv
LOCK ?= constraints.txt
TORCH ?= torch==2.13.0
TRANSFORMERS ?= transformers>=5.17,<6
PYTEST_ARGS ?=
DEMO_ARGS ?=
PIP_UPGRADE ?=
PIN := $(if $(strip $(LOCK)),-c $(LOCK),)
TOOLS := setuptools wheel triton numpy safetensors tqdm matplotlib pytest hypothesis \
	pytest-benchmark ninja pybind11 ruff

ifeq ($(strip $(VENV)),)
PY := $(PYTHON)
READY := .duollm-installed-system
else
PY := $(VENV)/bin/python
READY := $(VENV)/.duollm-installed
endif

.PHONY: demo study test lint bench clean help test-latest test-oldest lock compile-check-triton36

help:
	@echo "make demo   - run the Duo-LLM study on the embedded corpus (bootstraps $(or $(VENV),the system python))"
	@echo "make study  - the full study: 3 seeds, null control (40 min on 2 quiet cores)"
	@echo "make test   - run the test suite (CPU; Triton kernels in the interpreter)"
	@echo "make lint   - ruff check duollm kernels tests benchmarks (rules in pyproject.toml)"
	@echo "make bench  - run the CPU microbenchmarks (pytest-benchmark)"
	@echo "make test-latest - the suite against the newest versions in the declared ranges"
	@echo "make test-oldest - the suite against the oldest declared transformers"
	@echo "make lock   - test-latest, then pin what it passed with in constraints.txt"
	@echo "make clean  - remove the virtual environment and build outputs"

# Remade when setup.py, this Makefile or the lock changes (new requirements reach existing
# checkouts). torch goes in first and alone, and is named again in every later step, so that
# nothing installed after it can pull a second, different torch build (transformers declares
# no torch requirement, but a future release might). Every step installs from the lock.
$(VENV)/.duollm-installed: setup.py Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_UPGRADE) $(PIN) "$(TORCH)"
	$(PY) -m pip install -q $(PIP_UPGRADE) $(PIN) $(TOOLS) "$(TORCH)"
	$(PY) -m pip install -q $(PIP_UPGRADE) $(PIN) "$(TRANSFORMERS)" "$(TORCH)"
	$(PY) -m pip install -q $(PIP_UPGRADE) $(PIN) --no-build-isolation -e ".[test,bench,hf]" \
		"$(TORCH)"
	touch $@

# No virtual environment: install the package into the given python, using what is there.
.duollm-installed-system: setup.py Makefile
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(READY)
	$(PY) -m duollm study --out runs/demo --overwrite $(DEMO_ARGS)

# The full study (issue 16): 3 training seeds, 100 evaluation sequences per holdout, the null
# control, the memory-task check, on the wide preset; measured at 2,410 s (40 min) on 2 quiet CPU
# cores (docs/study.md). Also saves the trained model in OUT/model (SHA256SUMS beside it).
# --threads 0 keeps torch's own thread count: the study's rule of one thread for d_model <= 64
# suits the small presets, but `wide`'s big FFNs (1024) train faster on both cores.
# Writes report.md, verdicts.json, results.json and the plots to be committed with this command.
study: $(READY)
	$(PY) -m duollm study --full --seeds 3 --null-control --threads 0 --overwrite \
		--out benchmarks/results/cpu-study-full $(STUDY_ARGS)

test: $(READY)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(READY)
	$(PY) -m ruff check duollm kernels tests benchmarks

bench: $(READY)
	$(PY) -m pytest benchmarks/ --benchmark-only $(PYTEST_ARGS)

# The sm_90 compile check (registers, spills, shared memory per kernel variant) against
# Triton 3.6.0, the GPU machine's, as well as the locked Triton: 3.6.0 goes into
# build/triton36 (pip --target, no dependencies; the package index is needed once) and
# shadows the locked one through PYTHONPATH; tests/test_kernels_compile.py then runs it too.
compile-check-triton36: $(READY)
	test -f build/triton36/triton/__init__.py || \
		$(PY) -m pip install -q --no-deps --target build/triton36 "triton==3.6.0"
	env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=build/triton36 \
		$(PY) tests/triton_compile.py

# Not in CI: each builds its own environment beside .venv (minutes on first use).
test-latest:
	rm -f .venv-latest/.duollm-installed
	$(MAKE) test VENV=.venv-latest LOCK= PIP_UPGRADE=--upgrade

test-oldest:
	$(MAKE) test VENV=.venv-oldest LOCK=constraints-oldest.txt

# The lock is what the suite last passed with: the newest versions in range, tested first.
lock: test-latest
	{ echo "# The versions make test, make demo, make lint and CI install (pip constraints)."; \
	  echo "# Written by make lock from .venv-latest after the suite passed there: do not edit."; \
	  .venv-latest/bin/python -m pip freeze --all --exclude-editable \
	    | grep -v -e '^pip==' -e '^#'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest build *.egg-info duollm/_C*.so \
		.duollm-installed-system
