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

# pip's and setuptools' chatter goes to a log, shown only if the install fails.
$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing EdgePipe into $(VENV) (first time about 3 minutes and 6 GB: PyTorch and its CUDA libraries; CPU-only: docs/install.md; log: $(VENV)/install.log)"
	@$(PY) -m pip install --upgrade pip > $(VENV)/install.log 2>&1 \
		&& $(PY) -m pip install -e '.[compile,dev]' >> $(VENV)/install.log 2>&1 \
		|| { tail -n 40 $(VENV)/install.log; echo "install failed; full log: $(VENV)/install.log"; exit 1; }
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "Installed."

demo: $(STAMP)
	$(PY) tools/demo.py --model $(MODEL) --stages $(STAGES)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check compiler agent planner models tests tools

# Minutes to an hour; the testbed benchmarks need root. Results go to build/bench-*.json.
bench: $(STAMP)
	@mkdir -p build
	$(PY) tools/bench_compile.py --json > build/bench-compile.json
	$(PY) tools/bench_models.py --json build/bench-models.json --markdown build/bench-models.md
	$(PY) tools/bench_runtime.py --json build/bench-runtime.json
	$(PY) tools/bench_planner.py --json build/bench-planner.json
	$(PY) tools/bench_testbed.py --json build/bench-testbed.json
	$(PY) tools/bench_cluster.py all --json build/bench-cluster.json
	$(PY) tools/plot_bench.py build/bench-cluster.json -o docs/img
	$(PY) tools/bench_memory.py --json > build/bench-memory.json
	$(PY) tools/bench_prediction.py --stages 2,3 --repeats 3 --json build/bench-prediction.json

clean:
	rm -rf build .pytest_cache
