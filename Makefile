# The two set-up commands of the README. Both install what they need first (scripts/setup.sh).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: run test setup bench

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/python -m examples.sklearn_iris.serve $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python -m benchmarks.run $(ARGS)
