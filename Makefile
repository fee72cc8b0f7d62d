# `make demo`: set up .venv and run the main job on built-in data. `make test`: set up and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test

setup: $(VENV)/.installed

# torch and torchvision are pinned here (they install from this machine's disk); pyproject keeps ranges.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/upernet info upernet_convnext_tiny

test: setup
	$(BIN)/python -m pytest -q
