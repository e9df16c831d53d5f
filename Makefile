# The README's two commands (demo, test) and lint. Each creates .venv on first use and installs the package into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.lint: $(VENV)/.base
	$(PY) -m pip install -q -e '.[lint]'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/cls2det demo --out runs/demo

test: $(VENV)/.test
	$(PY) -m pytest

# ruff (lint + format check) and mypy ([tool.mypy] in pyproject.toml: src/cls2det, against the venv's packages)
lint: $(VENV)/.lint
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs build src/*.egg-info
