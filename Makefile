# Everyday commands.
.PHONY: install test test-fast lint format demo

install:
	pip install torch==2.13.0 && pip install -e ".[dev]"

test:
	python -m pytest -q

test-fast:  # unit tests only, no multi-process jobs
	python -m pytest -q -m "not distributed"

lint:
	ruff check vkd_ds launcher tests bench
	ruff format --check vkd_ds launcher tests bench

format:
	ruff format vkd_ds launcher tests bench
	ruff check --fix vkd_ds launcher tests bench

demo:
	vkd-ds demo --quick
