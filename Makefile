# make demo  : set up .venv (if missing) and run the whole pipeline on simulated data
# make test  : set up .venv (if missing) and run the test suite
# ARGS="..." : extra arguments, e.g. make demo ARGS="hardware.torch_threads=1", make test ARGS="-x tests/vae"
# TEST_WORKERS: pytest-xdist processes for make test / test-all (auto: one per CPU core;
#   0: one process, no xdist). Each test runs in one torch thread (tests/conftest.py), so
#   two workers on two cores halve the suite's wall time (README "Tests, CI and benchmarks")
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
EXP    ?= demo
TEST_WORKERS ?= auto
# a test file stays on one worker: its module fixtures (a trained toy study) are built once
XDIST   = -n $(TEST_WORKERS) --dist loadfile

.PHONY: demo test test-all lint tensorboard clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipeline stage=all +preset=demo experiment=$(EXP) overwrite=true $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(XDIST) $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m '' $(XDIST) $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# make tensorboard DIR=outputs/demo/train/tb: that folder; without DIR the newest outputs/*/
tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir $(if $(DIR),'$(DIR)',$$(ls -td outputs/*/ 2>/dev/null | head -1 || echo outputs))

clean:
	rm -rf outputs multirun .pytest_cache
