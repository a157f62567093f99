# `make demo` and `make test` are the two commands a newcomer needs; both set up .venv/ first.
PYTHON ?= python3
VENV ?= .venv
# The CPU build that ships on the development machines; a cluster's own torch is kept (see install).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench gpu-check lint clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "make: $(PYTHON) already has torch; the venv keeps it (--system-site-packages)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(PY) examples/quickstart/demo.py --output-dir demo_output

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

bench: $(STAMP)
	$(PY) -m pytest -q tests/benchmarks --benchmark-only --benchmark-columns=min,median,max,rounds

# On a GPU machine: the one-GPU training runs (bf16, distributed optimizer, checkpoint resume),
# the GPU benchmarks (docs/benchmarks.md records their numbers), the kernels' tests on CUDA and
# the other training tests, each step within its own time limit (`.ci/gpu-check NAME=SECONDS`
# changes one); logs go to $OUT.
gpu-check: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash .ci/gpu-check

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf demo_output .pytest_cache .benchmarks build *.egg-info
