"""The one rule for caller-chosen ids (agent ids, thread ids, worker ids), shared by every layer.

An id is stored in a ``varchar(128)`` column on SQLite and Postgres alike, logged, printed by the CLI and sent in
HTTP bodies, so it must survive all of them unchanged: 1–128 characters, valid UTF-8 (no lone surrogates), no
control characters (NUL, newline, tab, ...), and no leading or trailing whitespace (``" alice"`` and ``"alice"``
would otherwise be two agents that look the same). The store, the engines, the scheduler, the server and the
LangChain middleware all call `check_id`, so an id refused anywhere is refused everywhere, before any work is done.
"""

from __future__ import annotations

import unicodedata

from agentsleep.errors import InvalidInput

ID_LEN = 128  # the store's id columns (agents.id, snapshots.thread_id, jobs' worker ids)


def check_id(value: object, what: str = "agent id") -> str:
    """Return ``value`` if it is a valid id, else raise `InvalidInput` saying what is wrong with it."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidInput(f"{what} must not be empty")
    if len(value) > ID_LEN:
        raise InvalidInput(f"{what} must be at most {ID_LEN} characters, got {len(value)}: {value[:32]!r}...")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(f"{what} is not valid UTF-8 (a lone surrogate at {e.start}): {value!r}") from None
    if value != value.strip():
        raise InvalidInput(f"{what} must not start or end with whitespace, got {value!r}")
    bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        raise InvalidInput(f"{what} must not contain control characters (found {bad!r}), got {value!r}")
    return value


def check_agent_id(agent_id: object) -> str:
    """`check_id` for agent ids."""
    return check_id(agent_id, "agent id")


# ---------------------------------------------------------------- tenants (namespaces of agent ids)

TENANT_LEN = 64
TENANT_SEP = "\x1f"  # ASCII unit separator: a control character, so `check_id` refuses it in every caller's id
KEY_LEN = TENANT_LEN + 1 + ID_LEN  # the store's agent-key columns (agents.id, snapshots.agent_id; migration 0005)
DEFAULT_TENANT = ""  # the namespace of a store opened without a tenant (every agent saved before tenants existed)
_TENANT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def check_tenant(value: object) -> str:
    """Return ``value`` if it names a tenant: 1–64 characters of ``[A-Za-z0-9._-]`` (safe in logs, file names and
    SQL patterns), or `DEFAULT_TENANT` (``""``); else raise `InvalidInput`."""
    if not isinstance(value, str):
        raise InvalidInput(f"tenant must be a str, got {type(value).__name__}")
    if value == DEFAULT_TENANT:
        return value
    if len(value) > TENANT_LEN or not set(value) <= _TENANT_CHARS:
        raise InvalidInput(f"tenant must be 1-{TENANT_LEN} characters of A-Z a-z 0-9 . _ -, got {value!r}")
    return value


def agent_key(tenant: str, agent_id: str) -> str:
    """The store's key of ``agent_id`` in ``tenant``: the id itself in the default tenant, else ``tenant + SEP + id``.

    Keys of two tenants never collide (a tenant name has no SEP, an agent id has no control character), so a lookup
    in one tenant can never find another tenant's agent: it runs the same query as for an id that exists nowhere."""
    check_tenant(tenant)
    check_agent_id(agent_id)
    return f"{tenant}{TENANT_SEP}{agent_id}" if tenant else agent_id


def split_agent_key(key: str) -> tuple[str, str]:
    """``(tenant, agent id)`` of a store key (`agent_key`'s inverse)."""
    tenant, sep, agent_id = key.partition(TENANT_SEP)
    return (tenant, agent_id) if sep else (DEFAULT_TENANT, key)


__all__ = [
    "DEFAULT_TENANT",
    "ID_LEN",
    "KEY_LEN",
    "TENANT_LEN",
    "TENANT_SEP",
    "agent_key",
    "check_agent_id",
    "check_id",
    "check_tenant",
    "split_agent_key",
]
