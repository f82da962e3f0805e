"""A save whose payload file is shared with another agent (identical states share one content-addressed file) never
loses its file to that agent's prune or delete, whichever way the two interleave (docs/store.md, "Payload files and
deletion"). The interleavings are forced with hooks, so each case is deterministic; tests/reliability/ runs the same
race with real threads and processes, many times."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentsleep.store import SnapshotStore

from .helpers import toy_state


@pytest.fixture
def blob_url(store_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    yield store_url, str(blobs)


def _files(root: str) -> list[Path]:
    return [p for p in Path(root).rglob("*.snap") if not p.name.startswith(".tmp-")]


def test_delete_between_put_and_commit_loses_nothing(blob_url: tuple[str, str]) -> None:
    """The reviewed race: B's save writes (finds) the shared file, then A is deleted — rows and file — before B's
    transaction starts. B's save must still commit a snapshot that loads."""
    url, root = blob_url
    saver = SnapshotStore(url, blob_dir=root, inline_limit=0)
    deleter = SnapshotStore(url, blob_dir=root, inline_limit=0)
    try:
        saver.save("a", toy_state(1), [1, 2])
        real_put = saver.blobs.put  # type: ignore[union-attr]
        calls = []

        def put_then_delete_the_other_agent(sha: str, data: bytes) -> str:
            rel = real_put(sha, data)
            calls.append(rel)
            assert deleter.delete_agent("a") == 1  # unlinks the file: no committed row references it now
            assert _files(root) == []
            return rel

        saver.blobs.put = put_then_delete_the_other_agent  # type: ignore[union-attr,method-assign]
        rec = saver.save("b", toy_state(1), [1, 2])  # the same payload as a's: the same file
        assert calls and rec.storage == "file"
        got = saver.latest("b")
        assert got.state.digest() == toy_state(1).digest() and got.window == [1, 2]
        assert len(_files(root)) == 1
    finally:
        saver.close()
        deleter.close()


def test_prune_between_put_and_commit_loses_nothing(blob_url: tuple[str, str]) -> None:
    url, root = blob_url
    saver = SnapshotStore(url, blob_dir=root, inline_limit=0)
    pruner = SnapshotStore(url, blob_dir=root, inline_limit=0)
    try:
        saver.save("a", toy_state(1))
        saver.save("a", toy_state(2))  # now a's first snapshot is prunable, and its file shared with b's save
        real_put = saver.blobs.put  # type: ignore[union-attr]

        def put_then_prune(sha: str, data: bytes) -> str:
            rel = real_put(sha, data)
            assert pruner.prune("a", keep=1) == 1
            return rel

        saver.blobs.put = put_then_prune  # type: ignore[union-attr,method-assign]
        saver.save("b", toy_state(1))
        assert saver.latest("b").state.digest() == toy_state(1).digest()
        assert saver.latest("a").state.digest() == toy_state(2).digest()
    finally:
        saver.close()
        pruner.close()


def test_delete_waits_for_a_save_that_holds_the_file(blob_url: tuple[str, str]) -> None:
    """The other interleaving: B's save has re-checked the file inside its transaction and is about to commit when
    A's delete runs. The delete must not unlink the file under B (it waits for B's commit, then counts B's row)."""
    url, root = blob_url
    saver = SnapshotStore(url, blob_dir=root, inline_limit=0)
    deleter = SnapshotStore(url, blob_dir=root, inline_limit=0)
    checked, release = threading.Event(), threading.Event()
    result: dict[str, object] = {}
    try:
        saver.save("a", toy_state(1))
        real_ensure = saver.blobs.ensure  # type: ignore[union-attr]

        def ensure_then_pause(sha: str, data: bytes) -> str:
            rel = real_ensure(sha, data)
            checked.set()
            assert release.wait(30)
            return rel

        saver.blobs.ensure = ensure_then_pause  # type: ignore[union-attr,method-assign]

        def save_b() -> None:
            try:
                result["rec"] = saver.save("b", toy_state(1))
            except BaseException as e:  # surfaced below
                result["error"] = e

        def delete_a() -> None:
            try:
                result["deleted"] = deleter.delete_agent("a")
            except BaseException as e:
                result["error"] = e

        t_save = threading.Thread(target=save_b)
        t_save.start()
        assert checked.wait(30)  # b's save holds the file's lock (and, on SQLite, the write lock)
        t_delete = threading.Thread(target=delete_a)
        t_delete.start()
        t_delete.join(1.0)
        assert len(_files(root)) == 1  # the delete has not taken the file from under the save
        release.set()
        t_save.join(30)
        t_delete.join(30)
        assert "error" not in result and result["deleted"] == 1
        assert saver.latest("b").state.digest() == toy_state(1).digest()
        assert len(_files(root)) == 1  # still referenced by b
        deleter.delete_agent("b")
        assert _files(root) == []  # and gone once nothing references it
    finally:
        release.set()
        saver.close()
        deleter.close()


def test_gc_spares_a_save_in_flight(blob_url: tuple[str, str]) -> None:
    """gc_blobs(grace_s=0) between a save's put() and its commit: the file goes, the save writes it again."""
    url, root = blob_url
    store = SnapshotStore(url, blob_dir=root, inline_limit=0)
    gc = SnapshotStore(url, blob_dir=root, inline_limit=0)
    try:
        real_put = store.blobs.put  # type: ignore[union-attr]

        def put_then_gc(sha: str, data: bytes) -> str:
            rel = real_put(sha, data)
            assert gc.gc_blobs(grace_s=0) == 1  # unreferenced so far: collected
            return rel

        store.blobs.put = put_then_gc  # type: ignore[union-attr,method-assign]
        rec = store.save("a", toy_state(3))
        assert store.load(rec.id).state.digest() == toy_state(3).digest()
        assert gc.gc_blobs(grace_s=0) == 0  # referenced now
    finally:
        store.close()
        gc.close()
