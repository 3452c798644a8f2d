# Two entry points: `make demo` (the main job) and `make test` (lint, types, tests).
# Each creates .venv when missing and installs the known-good versions pinned in
# constraints.txt, so a new release of a dependency cannot turn CI red overnight.
# torch==2.13.0 is installed first: it is the CPU wheel on this machine's disk; any other
# spec would pull a multi-GB CUDA build.
# `make test-newest` / `make test-oldest` test the newest releases and the oldest supported
# versions (README, "Supported versions") in their own venvs.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.gradckpt-installed
PYTEST_ARGS ?= -n 2 --durations=15

.PHONY: demo test lint typecheck pytest test-newest test-oldest gpu-check gpu-check-smoke clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q -c constraints.txt --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[hf,plot,dev]'
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/gradckpt bench --budgets 50%,70% --plot bench.png --json bench.json

lint: $(STAMP)
	.venv/bin/ruff check src tests benchmarks examples
	.venv/bin/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	.venv/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# The newest releases of everything but torch. torch==2.13.0 is named in every install (with
# --upgrade-strategy eager pip would otherwise upgrade torch too: a multi-GB CUDA build).
test-newest:
	test -x .venv-newest/bin/python || python3 -m venv .venv-newest
	.venv-newest/bin/pip install -q --upgrade pip
	.venv-newest/bin/pip install -q torch==2.13.0
	.venv-newest/bin/pip install -q --upgrade --upgrade-strategy eager torch==2.13.0 -e '.[hf,plot,dev]'
	.venv-newest/bin/pip freeze --exclude-editable | grep -iE '^(torch|transformers|peft|trl|accelerate|datasets)=='
	.venv-newest/bin/python -m pytest $(PYTEST_ARGS)

# The oldest supported Hugging Face stack, pinned with its transitive dependencies in
# constraints-oldest.txt (torch stays 2.13.0).
test-oldest:
	test -x .venv-oldest/bin/python || python3 -m venv .venv-oldest
	.venv-oldest/bin/pip install -q -c constraints-oldest.txt --upgrade pip
	.venv-oldest/bin/pip install -q -c constraints-oldest.txt torch==2.13.0
	.venv-oldest/bin/pip install -q -c constraints-oldest.txt -e '.[hf,plot,dev]'
	.venv-oldest/bin/pip freeze --exclude-editable | grep -iE '^(torch|transformers|peft|trl|accelerate|datasets)=='
	.venv-oldest/bin/python -m pytest $(PYTEST_ARGS)

# On a GPU machine: `make gpu-check` (benchmarks/gpu_check.py, under 8 minutes on one H100/H200).
# Nothing is installed: it runs from the checkout with whatever python already has torch (CUDA)
# and transformers (GPU_PY=... to choose another); parts whose optional packages are missing are
# skipped with a line. Results: benchmarks/results/gpu-<device>-<date>.{json,md}; then
# `python -m benchmarks.render_readme --section gpu`. `make gpu-check-smoke` runs the same code
# on tiny models on CPU (tests/test_gpu_check.py runs it in `make test`). ARGS=... passes options.
GPU_PY ?= python3
SMOKE_PY ?= $(shell test -x .venv/bin/python && echo .venv/bin/python || echo python3)

gpu-check:
	PYTHONPATH=src:.$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m benchmarks.gpu_check $(ARGS)

gpu-check-smoke:
	PYTHONPATH=src:.$${PYTHONPATH:+:$$PYTHONPATH} $(SMOKE_PY) -m benchmarks.gpu_check --cpu-smoke $(ARGS)

clean:
	rm -rf .venv .venv-newest .venv-oldest build *.egg-info
