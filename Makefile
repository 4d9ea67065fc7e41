# Two entry points for a fresh machine (Python 3.11+):
#   make repro   set up .venv and run the pipeline (`dvc repro`)
#   make test    set up .venv and run the test suite
VENV := .venv
BIN := $(VENV)/bin

# constraints.txt pins every package to the version the results were measured with;
# `make lock` re-resolves pyproject.toml's ranges to today's newest and pins those.
$(BIN)/activate: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

.PHONY: setup repro test test-fast lint lock mlflow-server
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

lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet -e ".[test]"
	{ echo "# pip constraints: the version of every package \`make setup\` installs, the ones the tests passed with."; \
	  echo "# Written by \`make lock\` from pyproject.toml's ranges; \`make setup\` installs with -c constraints.txt."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt && rm -rf .lock-venv
