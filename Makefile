# Two commands do all the set-up on a fresh machine (Python 3.11 + pip):
#   make demo   -> create .venv, install, run the main job (outputs in outputs/demo)
#   make test   -> create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned in constraints.txt so pip never pulls a CUDA build.
PIP_INSTALL := $(BIN)/python -m pip install --constraint constraints.txt
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint docs notebooks clean install

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(PIP_INSTALL) "torch==2.13.0"
	$(PIP_INSTALL) -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/mcvi-ops demo --out outputs/demo $(DEMO_ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Warnings are errors: every cross-reference must resolve (docs/conf.py sets nitpicky).
docs: $(BIN)/.installed
	$(PIP_INSTALL) -e ".[doc]"
	$(BIN)/sphinx-build -M html docs docs/_build -W --keep-going

# Runs every tutorial top to bottom (nbmake); the stored outputs are left unchanged.
notebooks: $(BIN)/.installed
	$(PIP_INSTALL) -e ".[doc]"
	$(BIN)/python -m pytest --nbmake --nbmake-timeout=1800 -p no:cacheprovider tutorials/

clean:
	rm -rf $(VENV) outputs docs/_build .pytest_cache .ruff_cache
