"""API keys and tenants of ``agentsleep serve --api-keys-file FILE``; masking secrets in what the server shows.

The keys file holds one ``KEY TENANT`` pair per line; ``#`` starts a comment, blank lines are skipped. A request's key
(``Authorization: Bearer KEY``) selects its tenant, and the tenant is the namespace of every agent id the request
names (`agentsleep.store.SnapshotStore.for_tenant`). Only the keys' SHA-256 digests are kept in memory; a presented
key is hashed and compared with every digest by `hmac.compare_digest`, so neither a match's position nor a near miss
shows in the time an answer takes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from agentsleep.errors import ConfigError, InvalidInput
from agentsleep.ids import check_tenant

logger = logging.getLogger(__name__)

MIN_KEY_LEN = 16  # shorter keys are guessable; `secrets.token_urlsafe(32)` makes a good one
_KEY = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: what fits an HTTP header unchanged
OPEN_PATHS = ("/health", "/ping")  # liveness probes: answered without a key (they reveal nothing)


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


@dataclass(frozen=True)
class ApiKeys:
    """The keys of a keys file, as (SHA-256 of the key, tenant) pairs."""

    entries: tuple[tuple[bytes, str], ...]
    source: str = "<keys>"

    @classmethod
    def parse(cls, text: str, source: str = "<keys>") -> ApiKeys:
        """Parse a keys file's text; `ConfigError` naming the line (never echoing a key) for a malformed one."""
        entries: list[tuple[bytes, str]] = []
        seen: dict[bytes, int] = {}
        for n, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            where = f"{source}, line {n}"
            if len(parts) != 2:
                raise ConfigError(f"{where}: expected `KEY TENANT`, found {len(parts)} fields")
            key, tenant = parts
            if not _KEY.fullmatch(key) or len(key) < MIN_KEY_LEN:
                raise ConfigError(
                    f"{where}: a key must be at least {MIN_KEY_LEN} printable ASCII characters without spaces "
                    "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
            try:
                check_tenant(tenant)
            except InvalidInput as e:
                raise ConfigError(f"{where}: {e}") from None
            d = _digest(key)
            if d in seen:
                raise ConfigError(f"{where}: the same key as line {seen[d]} (one key, one tenant)")
            seen[d] = n
            entries.append((d, tenant))
        if not entries:
            raise ConfigError(f"{source}: no keys (one `KEY TENANT` pair per line)")
        return cls(tuple(entries), source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ApiKeys:
        """Read and parse a keys file; warns when others than its owner may read it."""
        p = Path(path)
        try:
            mode = p.stat().st_mode
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the API keys file {p}: {e}") from e
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("the API keys file %s is readable by others than its owner: chmod 600 it", p)
        return cls.parse(text, str(p))

    @property
    def tenants(self) -> list[str]:
        return sorted({t for _, t in self.entries})

    def tenant(self, key: str | bytes | None) -> str | None:
        """The tenant of ``key``, or None for a missing or unknown key (every digest is compared, always)."""
        if not key:
            return None
        d = _digest(key)
        found = None
        for digest, tenant in self.entries:
            if hmac.compare_digest(d, digest) and found is None:
                found = tenant
        return found


def bearer(headers: list[tuple[bytes, bytes]] | None) -> bytes | None:
    """The key of an ``Authorization: Bearer KEY`` header in ASGI ``headers`` (None if absent)."""
    for name, value in headers or ():
        if name.lower() == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() or None if scheme.lower() == b"bearer" else None
    return None


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (also for a URL SQLAlchemy cannot parse)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL: mask anything that looks like user:password@
        return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", url)


def mask_secrets(text: str, url: str) -> str:
    """``text`` (an error message, a log line) with ``url`` and its password masked wherever they appear."""
    text = text.replace(url, mask_url(url))
    try:
        password = make_url(url).password
    except Exception:
        password = None
    return text.replace(str(password), "***") if password else text


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (vLLM's ``--host``; None: vLLM listens on every interface) is loopback only."""
    if host is None:
        return False
    h = host.strip("[]").lower()
    return h == "localhost" or h == "::1" or h.startswith("127.")


__all__ = ["MIN_KEY_LEN", "OPEN_PATHS", "ApiKeys", "bearer", "is_loopback", "mask_secrets", "mask_url"]
