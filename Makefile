# Two entry points for a fresh machine (Python 3.11+):
#   make repro   set up .venv and run the pipeline (`dvc repro`)
#   make test    set up .venv and run the test suite
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/activate: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: setup repro test test-fast lint mlflow-server
setup: $(BIN)/activate

repro: setup
	. $(BIN)/activate && dvc repro

test: setup
	. $(BIN)/activate && python -m pytest -n auto

test-fast: setup
	. $(BIN)/activate && python -m pytest -n auto -m "not slow"

lint: setup
	$(BIN)/ruff check src tests benchmarks

mlflow-server: setup
	. $(BIN)/activate && scripts/mlflow_server.sh
