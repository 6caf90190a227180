# The two commands a new user needs (see README): `make demo` and `make test`.
# Both create or reuse the local virtualenv $(VENV) and install the package with its dev and plot
# extras (plot: the curves.png a run leaves in its directory).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean-runs

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,plot]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/fast-ressl train configs/demo.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
