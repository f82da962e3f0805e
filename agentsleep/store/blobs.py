"""Content-addressed payload files: ``<blob_dir>/<sha[:2]>/<sha>.snap``, written durably before the row commits.

Used only when a `SnapshotStore` is given ``blob_dir`` and a payload exceeds its ``inline_limit`` (see
docs/store.md for why inline blobs are the default). Because a file is named by its content's sha256:

- a crash between writing the file and committing the row leaves at most an unreferenced file (`gc` removes it),
  never a row pointing at a half-written file (the file is fsynced and renamed into place first);
- identical payloads (a fork, an import of an export, every fresh agent's zero state) share one file;
- a file is deleted only when no row references it any more.

Sharing makes deletion a race: a save may write (or find) a file, then another agent's prune or delete may see no
row referencing it and unlink it before the save commits its row. `SnapshotStore` closes it with a per-file lock
(`lock_key`): the save re-checks the file (`ensure`, rewriting it if it vanished) inside its transaction while
holding the lock shared, and an unlink happens only under the lock held exclusively, after counting references in
that same transaction. See docs/store.md ("Payload files and deletion").
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from agentsleep.errors import InvalidInput, SnapshotCorrupt, StoreError

log = logging.getLogger(__name__)

_SUFFIX = ".snap"
_TMP_PREFIX = ".tmp-"


def lock_key(sha256: str) -> int:
    """A signed 64-bit key for Postgres advisory locks on the file of payload ``sha256`` (its first 16 hex digits)."""
    return int(sha256[:16], 16) - (1 << 63)


class BlobDir:
    """A directory of content-addressed payload files.

    ``create``: make the directory (not its parents) if it does not exist; otherwise a missing directory is an error,
    so a typo never starts an empty blob directory beside the real one.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root).resolve()
        if self.root.exists() and not self.root.is_dir():
            raise InvalidInput(f"blob_dir {str(root)!r} exists and is not a directory")
        if not self.root.exists():
            if not create:
                raise StoreError(f"blob_dir {str(root)!r} does not exist")
            if not self.root.parent.is_dir():
                raise StoreError(
                    f"cannot create blob_dir {str(root)!r}: its parent directory does not exist (create it first)"
                )
            try:
                self.root.mkdir(exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create blob_dir {str(root)!r}: {e}") from e
            log.info("created blob directory %s", self.root)

    @staticmethod
    def relpath(sha256: str) -> str:
        return f"{sha256[:2]}/{sha256}{_SUFFIX}"

    def path(self, relpath: str) -> Path:
        p = (self.root / relpath).resolve()
        if self.root not in p.parents:  # a row must never make us read outside blob_dir
            raise SnapshotCorrupt(f"payload path {relpath!r} escapes the blob directory")
        return p

    def put(self, sha256: str, data: bytes) -> str:
        """Write ``data`` under its sha256 (fsync file, rename, fsync directory); returns the relative path.

        An existing file of the right size is touched instead of rewritten (which also tells `gc` it is in use).
        Called before the save's transaction (the expensive write stays outside it); `ensure` re-checks inside.
        """
        rel = self.relpath(sha256)
        final = self.path(rel)
        try:
            if final.stat().st_size == len(data):
                os.utime(final)
                return rel
        except FileNotFoundError:  # absent, or removed between stat() and utime(): write it
            pass
        except OSError as e:
            raise StoreError(f"could not reach snapshot payload {final}: {e}") from e
        self._write(final, data)
        return rel

    def ensure(self, sha256: str, data: bytes) -> str:
        """`put` for a caller holding the file's lock: a file that vanished since `put` (another agent's prune
        unlinked it) is written again. Returns the relative path."""
        rel = self.relpath(sha256)
        final = self.path(rel)
        try:
            if final.stat().st_size == len(data):
                return rel
        except FileNotFoundError:
            log.info("payload file %s vanished before its row committed; writing it again", rel)
        except OSError as e:
            raise StoreError(f"could not reach snapshot payload {final}: {e}") from e
        self._write(final, data)
        return rel

    @staticmethod
    def _write(final: Path, data: bytes) -> None:
        try:
            final.parent.mkdir(exist_ok=True)  # <blob_dir>/<sha[:2]>: blob_dir itself exists
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=_TMP_PREFIX, suffix=_SUFFIX)
        except OSError as e:
            raise StoreError(f"could not write snapshot payload to {final}: {e}") from e
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise StoreError(f"could not write snapshot payload to {final}: {e}") from e
        _fsync_dir(final.parent)

    @staticmethod
    def is_temporary(relpath: str) -> bool:
        """A writer's temporary file (never referenced by a row)."""
        return Path(relpath).name.startswith(_TMP_PREFIX)

    def get(self, relpath: str) -> bytes:
        try:
            return self.path(relpath).read_bytes()
        except (FileNotFoundError, IsADirectoryError) as e:
            raise SnapshotCorrupt(f"payload file {relpath!r} is missing from {self.root}") from e
        except OSError as e:
            raise StoreError(f"could not read payload file {relpath!r} from {self.root}: {e}") from e

    def remove(self, relpath: str) -> None:
        try:
            self.path(relpath).unlink(missing_ok=True)
        except OSError as e:
            raise StoreError(f"could not remove payload file {relpath!r} from {self.root}: {e}") from e

    def walk(self) -> Iterator[tuple[str, float]]:
        """Every payload file as (relative path, mtime), including leftover temporaries of killed writers."""
        for p in self.root.glob(f"??/*{_SUFFIX}"):  # .tmp-*.snap too: they also end in .snap
            try:
                yield p.relative_to(self.root).as_posix(), p.stat().st_mtime
            except FileNotFoundError:
                continue


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not available on every platform (e.g. Windows), where we skip it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["BlobDir", "lock_key"]
