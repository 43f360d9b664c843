# Two commands set up a fresh machine: `make demo` and `make test`. Both install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

# torch first, pinned: the CPU wheel installs offline in seconds; an unpinned torch pulls CUDA.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/fldd demo

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) .fldd .pytest_cache
