# jungletrap: every target installs what it needs into .venv first (pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= data/demo
DEMO_N ?= 400
PYTEST_ARGS ?=

.PHONY: install demo demo-data test test-fast bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,gpu,s3]"
	touch $(STAMP)

install: $(STAMP)

demo-data: $(STAMP)
	$(BIN)/jungletrap demo-data --out $(DEMO_DIR) --n $(DEMO_N) --seed 0

demo: demo-data
	$(BIN)/jungletrap run --config conf/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
