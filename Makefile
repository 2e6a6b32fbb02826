# Two commands do everything: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mtpress-installed

# Quiet, offline Prefect.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT := false

.PHONY: install toolchain demo test lint clean

# pip compiles bytecode at install time (PYTHONDONTWRITEBYTECODE is set on our machines and
# importing Prefect uncompiled costs seconds per process).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet --compile -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

toolchain: install
	$(BIN)/mtpress toolchain build

demo: toolchain
	$(BIN)/mtpress demo

test: toolchain
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src flows tests scripts

clean:
	rm -rf releases .pytest_cache
