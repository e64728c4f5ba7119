# The README's commands. Each sets up first (idempotent), then does one thing.
VENV ?= .venv
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo test test-all

setup:
	@bash scripts/setup.sh

## Set up and run the main job: build the embedded `small` corpus and index it.
demo: setup
	$(VENV)/bin/nds index --profile small

## Set up and run the test suite (what CI runs).
test: setup
	$(VENV)/bin/python -m pytest -m "not slow"

## Everything, slow tests included.
test-all: setup
	$(VENV)/bin/python -m pytest
