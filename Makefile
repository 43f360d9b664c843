# Two commands set up a fresh machine: `make demo` and `make test`. Both install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install molecules demo test bench clean browser

install: $(STAMP)

# torch first, pinned: the CPU wheel installs offline in seconds; an unpinned torch pulls CUDA.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The optional molecules extra (RDKit, fcd) and the MOSES data files (molsets, without its
# dependencies: see pyproject.toml). The tests and the molecule benchmark need it; the demo does not.
MOLECULES_STAMP := $(VENV)/.installed-molecules
molecules: $(MOLECULES_STAMP)

$(MOLECULES_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[molecules]"
	$(PY) -m pip install -q --no-deps molsets==0.3.1
	touch $(MOLECULES_STAMP)

demo: install
	$(VENV)/bin/fldd demo

test: install molecules browser
	$(PY) -m pytest -q tests

# The playground's browser test drives Debian's chromium through chromium-driver. Installed where
# apt works (root); elsewhere that test is skipped and says why. Never fails the target.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "could not install chromium: the playground's browser test will be skipped"; \
	else echo "no chromium and no root for apt-get: the playground's browser test will be skipped"; fi

bench: install
	$(PY) -m benchmarks.speed

clean:
	rm -rf $(VENV) .fldd .pytest_cache
