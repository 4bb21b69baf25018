# The template's own tasks. `make generate` and `make test` are the two commands in README.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= ..
ARGS ?=

.PHONY: help install generate test lint bench clean

help:  ## list the targets
	@grep -E "^[a-z-]+:.*## " $(MAKEFILE_LIST) | sed "s/:.*## /\t/"

$(BIN)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

install: $(BIN)/.installed  ## create .venv with the template's tooling

generate: install  ## generate a service into OUT (default ..); ARGS=--no-input takes every default
	$(BIN)/cookiecutter $(ARGS) --output-dir $(OUT) $(CURDIR)

test: install  ## the whole test suite: every combination, generated suites on real databases
	$(BIN)/pytest

lint: install  ## ruff on the template's own Python (rendered projects are linted by the tests)
	$(BIN)/ruff check hooks tests bench local_extensions.py

bench: install  ## render time against bare cookiecutter, as a ratio
	$(BIN)/python bench/bench_render.py

clean:  ## remove the virtualenv and the generated suites' scratch folder
	rm -rf $(VENV) .cache
