# Two entry points: `make demo` (the main job) and `make test` (lint, types, tests).
# Each creates .venv when missing. torch==2.13.0 is installed first: it is the CPU wheel
# on this machine's disk; any other spec would pull a multi-GB CUDA build.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.gradckpt-installed

.PHONY: demo test lint typecheck pytest clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[hf,plot,dev]'
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/gradckpt bench --budgets 50%,70% --plot bench.png --json bench.json

lint: $(STAMP)
	.venv/bin/ruff check src tests benchmarks examples
	.venv/bin/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	.venv/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15

test: lint typecheck pytest

clean:
	rm -rf .venv build *.egg-info
