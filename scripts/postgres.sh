#!/usr/bin/env bash
# Install (Debian package) and start a local PostgreSQL server on 127.0.0.1 for the store tests.
# Prints the SQLAlchemy URL on its last line. Needs root (CI) or passwordless sudo.
set -euo pipefail
PORT=${AGENTSLEEP_PG_PORT:-5432}
USER_=agentsleep; PASS=agentsleep; DB=agentsleep
if [ "$(id -u)" = 0 ]; then SUDO=""; AS_PG="runuser -u postgres --"; else SUDO="sudo -n"; AS_PG="sudo -n -u postgres"; fi
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >&2
  $SUDO apt-get install -y -qq postgresql >&2
fi
VER=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h 2>/dev/null | grep -q "^$VER main"; then
  $SUDO pg_createcluster "$VER" main -p "$PORT" >&2
fi
$SUDO pg_ctlcluster "$VER" main start >&2 2>/dev/null || true
for _ in $(seq 1 30); do
  $AS_PG psql -qtAc "select 1" >/dev/null 2>&1 && break
  sleep 1
done
PORT=$($AS_PG psql -qtAc "show port")
$AS_PG psql -qtAc "select 1 from pg_roles where rolname='$USER_'" | grep -q 1 \
  || $AS_PG psql -qc "create role $USER_ login password '$PASS' createdb" >&2
$AS_PG psql -qtAc "select 1 from pg_database where datname='$DB'" | grep -q 1 \
  || $AS_PG psql -qc "create database $DB owner $USER_" >&2
echo "postgresql+psycopg://$USER_:$PASS@127.0.0.1:$PORT/$DB"
