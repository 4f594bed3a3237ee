# Everything runs inside .venv, created on first use and reused while pyproject.toml is unchanged
# (the stamp file carries a hash of it), so a second `make test` costs no install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell cat pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)

MODEL ?= vit_base_patch16_224
STAGES ?= 3
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean venv

venv: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[compile,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(PY) tools/demo.py --model $(MODEL) --stages $(STAGES)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check compiler agent planner models tests tools

bench: $(STAMP)
	$(PY) tools/bench_compile.py
	$(PY) tools/bench_runtime.py
	$(PY) tools/bench_planner.py

clean:
	rm -rf build .pytest_cache
