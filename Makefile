# kvpack developer entry points. Everything installs itself on a fresh Debian machine.
#   make up     set up, then run the stack on embedded defaults (CPU is fine)
#   make test   set up, then run the whole test suite (what .ci/run calls)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build that CI machines carry; a GPU machine brings its own.
TORCH ?= torch==2.13.0

.PHONY: setup system-deps models proto proto-check lint test up clean

$(BIN)/kvpack: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[inference,eval,dev]"
	touch $(BIN)/kvpack

setup: system-deps $(BIN)/kvpack

system-deps:
	bash scripts/install-system-deps.sh

models: setup
	$(BIN)/python -m kvpack.models

proto: setup
	$(BIN)/python -m kvpack.proto.generate

proto-check: setup
	$(BIN)/python -m kvpack.proto.generate --check

lint: setup
	$(BIN)/ruff check .

test: setup models proto-check
	KVPACK_SMOLLM2_GGUF=$$($(BIN)/python -m kvpack.models) TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -ra

up: setup
	$(BIN)/kvpack up

clean:
	rm -rf $(VENV) .pytest_cache
