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


__all__ = ["ID_LEN", "check_agent_id", "check_id"]
