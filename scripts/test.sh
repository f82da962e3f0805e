#!/usr/bin/env bash
# The project's test command (`make test`): environment, a local PostgreSQL for the store tests, lint, then pytest.
# Extra arguments go to pytest, e.g. `make test ARGS="-k store"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ -z "${AGENTSLEEP_TEST_POSTGRES_URL:-}" ]; then
  if url=$(bash scripts/postgres.sh | tail -n 1); then
    export AGENTSLEEP_TEST_POSTGRES_URL="$url"
  else
    echo "warning: could not start PostgreSQL; Postgres tests will fail under CI=1 and skip otherwise" >&2
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
