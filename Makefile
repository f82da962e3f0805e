# The README's two commands are `make demo` and `make test`; everything else is a convenience.
.PHONY: setup demo test lint bench

setup:  ## create .venv with every dependency (idempotent)
	bash scripts/setup_env.sh

demo: setup  ## the main job: short sleep/revive episodes on the shipped checkpoints, report under results/demo
	.venv/bin/agentsleep demo

test:  ## lint + the whole test suite (starts a local PostgreSQL; installs what is missing)
	bash scripts/test.sh $(ARGS)

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench: setup  ## every benchmark; each prints the ratios its claim is about
	for b in benchmarks/bench_*.py; do .venv/bin/python -m benchmarks.$$(basename $$b .py) || exit 1; done
