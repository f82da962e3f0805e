"""Content-addressed payload files: ``<blob_dir>/<sha[:2]>/<sha>.snap``, written durably before the row commits.

Used only when a `SnapshotStore` is given ``blob_dir`` and a payload exceeds its ``inline_limit`` (see
docs/store.md for why inline blobs are the default). Because a file is named by its content's sha256:

- a crash between writing the file and committing the row leaves at most an unreferenced file (`gc` removes it),
  never a row pointing at a half-written file (the file is fsynced and renamed into place first);
- identical payloads (a fork, an import of an export) share one file;
- a file is deleted only when no row references it any more.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from agentsleep.errors import SnapshotCorrupt, StoreError

_SUFFIX = ".snap"


class BlobDir:
    """A directory of content-addressed payload files."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

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

        An existing file is touched instead of rewritten, which also tells a concurrent `gc` that it is in use.
        """
        rel = self.relpath(sha256)
        final = self.path(rel)
        if final.exists() and final.stat().st_size == len(data):
            try:
                os.utime(final)
                return rel
            except FileNotFoundError:  # removed by gc between exists() and utime(): write it again
                pass
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-", suffix=_SUFFIX)
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
        return rel

    def get(self, relpath: str) -> bytes:
        try:
            return self.path(relpath).read_bytes()
        except FileNotFoundError as e:
            raise SnapshotCorrupt(f"payload file {relpath!r} is missing from {self.root}") from e

    def remove(self, relpath: str) -> None:
        self.path(relpath).unlink(missing_ok=True)

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


__all__ = ["BlobDir"]
