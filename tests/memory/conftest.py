"""The store's Postgres fixtures (a scratch database per session, a schema per test) for the host and worker tests."""

from tests.store.conftest import postgres_db, postgres_schema_url, postgres_server_url  # noqa: F401  (fixtures)
