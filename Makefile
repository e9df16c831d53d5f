# The README's two commands. Each creates .venv on first use and installs the package into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/cls2det demo --out runs/demo

test: $(VENV)/.test
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs build src/*.egg-info
