# The two set-up commands of the README: `make run` and `make test`.
.PHONY: run test setup setup-test test-fast

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

# Installs everything the embedded default needs, then runs it (configs/smoke.yaml).
run: setup
	.venv/bin/wsg run

# Creates/updates the same .venv and runs the whole test suite (slow tests included).
test: setup-test
	.venv/bin/python -m pytest -q --durations=40

# The fast subset, for development.
test-fast: setup-test
	.venv/bin/python -m pytest -q -m "not slow"
