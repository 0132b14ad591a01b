# deskhive: `make run` serves, `make test` runs the whole suite. Both set up
# what they need first: a .venv with the Python packages, and the Debian
# packages the local sandbox uses.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: all install system run test test-dev bench lint fmt typecheck check clean

all: check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

system:
	bash scripts/install-system-packages.sh

install: $(STAMP) system

run: install
	$(VENV)/bin/deskhive serve $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

# Python's dev mode and asyncio's debug mode; a callback that holds the loop
# over 0.1 s fails the test it ran in (tests/conftest.py).
test-dev: install
	DESKHIVE_SLOW_CALLBACK=0.1 $(PY) -X dev -m pytest --asyncio-debug $(ARGS)

bench: install
	$(PY) bench/run.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) var artifacts .pytest_cache .mypy_cache .ruff_cache
