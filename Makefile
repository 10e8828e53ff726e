# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/tiny

.PHONY: install demo test test-fast lint bench

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m distil_jax.main --config=experiments/tiny.py --workdir=$(WORKDIR)

# Every test, in two workers (a file per worker).
test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The edit-test loop: all but the tests marked slow (multi-process, gs://, end to end).
test-fast: install
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check .
