# Two commands on a fresh machine: `make test` and `make demo`. Both create (or reuse) .venv and install the
# package with its development extras under constraints.txt, which pins every tested version (torch==2.13.0).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not distributed"

demo: $(STAMP)
	$(PY) examples/compose_skills.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# On a CUDA machine: the gpu-marked tests and the benchmarks with --device cuda, figures in gpu-results/ (< 8 min).
gpu-check: $(STAMP)
	PYTHON=$(PY) scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
