# make demo  : set up .venv (if missing) and run the whole pipeline on simulated data
# make test  : set up .venv (if missing) and run the test suite
# ARGS="..." : extra arguments, e.g. make demo ARGS="hardware.torch_threads=1", make test ARGS="-x tests/vae"
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
EXP    ?= demo

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
	$(PY) -m pytest $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m '' $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir $$(ls -td outputs/*/ 2>/dev/null | head -1 || echo outputs)

clean:
	rm -rf outputs multirun .pytest_cache
