# Quick start on a fresh machine:
#   make demo   # sets up .venv and runs the end-to-end demo on phantom data
#   make test   # sets up .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUTPUT ?= demo_output

.PHONY: demo test test-ddp mutants setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/python -m nnunetv2_csa.tools.demo --output $(DEMO_OUTPUT)

test: setup
	$(BIN)/python -m pytest -q -ra

# on demand, not in CI (about 10 minutes): nnU-Net's multi-GPU flow for every row in 2 and 3 CPU processes,
# CSA on ResEnc M and in 3d_fullres; make test runs two of these runs (documentation/gpus.md)
test-ddp: setup
	NNUNETV2_CSA_DDP_ALL=1 $(BIN)/python -m pytest -q -ra tests/test_ddp.py

# on demand, not in CI: one-line bugs applied one at a time to a scratch copy, each run against the fast tests
mutants: setup
	$(BIN)/python scripts/mutants.py --json mutants_result.json

clean:
	rm -rf $(VENV) $(DEMO_OUTPUT)
