"""Tests for L{twisted_criu.registry.SnapshotRegistry}."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import wire
from twisted_criu.errors import ImageNotFound
from twisted_criu.registry import SnapshotRegistry, readAll
from twisted_criu.storage.memory import MemoryStore

KEY = ("snap1", "pages-1.img")


def _image(data: bytes):  # type: ignore[no-untyped-def]
    writer = MemoryStore().newWriter()
    writer.write(data)
    return writer.commit()


def _publish(registry: SnapshotRegistry, key: tuple[str, str], data: bytes) -> None:
    registry.beginWrite(key)
    registry.publish(key, _image(data))


class CacheRegistryTests(SynchronousTestCase):
    """A registry that waits for missing images (the cache's)."""

    def setUp(self) -> None:
        self.registry = SnapshotRegistry(waitForMissing=True)

    def test_readBeforeArrivalWaits(self) -> None:
        d = self.registry.whenAvailable(KEY)
        self.assertNoResult(d)
        self.assertEqual(self.registry.waiting, 1)
        _publish(self.registry, KEY, b"pages")
        self.assertEqual(readAll(self.successResultOf(d)), b"pages")
        self.assertEqual(self.registry.waiting, 0)

    def test_neverComesFailsOnClose(self) -> None:
        d = self.registry.whenAvailable(KEY)
        self.assertNoResult(d)
        self.registry.close()
        self.failureResultOf(d, ImageNotFound)

    def test_missingAfterCloseFailsAtOnce(self) -> None:
        self.registry.close()
        f = self.failureResultOf(self.registry.whenAvailable(KEY), ImageNotFound)
        self.assertEqual(str(f.value), "no image snap1/pages-1.img")

    def test_rereads(self) -> None:
        _publish(self.registry, KEY, b"x")
        for _ in range(3):
            self.assertEqual(readAll(self.successResultOf(self.registry.whenAvailable(KEY))), b"x")

    def test_cancel(self) -> None:
        d = self.registry.whenAvailable(KEY)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.registry.waiting, 0)
        _publish(self.registry, KEY, b"x")  # nobody left to call

    def test_writeInProgressHidesOldVersion(self) -> None:
        """A read during a rewrite gets the new bytes, not the old ones."""
        _publish(self.registry, KEY, b"old")
        self.registry.beginWrite(KEY)
        d = self.registry.whenAvailable(KEY)
        self.assertNoResult(d)
        self.registry.publish(KEY, _image(b"new"))
        self.assertEqual(readAll(self.successResultOf(d)), b"new")

    def test_writeInProgressAfterCloseStillWaits(self) -> None:
        self.registry.beginWrite(KEY)
        self.registry.close()
        d = self.registry.whenAvailable(KEY)
        self.assertNoResult(d)
        self.registry.publish(KEY, _image(b"late"))
        self.assertEqual(readAll(self.successResultOf(d)), b"late")

    def test_abortedWriteKeepsOldVersion(self) -> None:
        _publish(self.registry, KEY, b"old")
        self.registry.beginWrite(KEY)
        d = self.registry.whenAvailable(KEY)
        self.registry.abortWrite(KEY)
        self.assertEqual(readAll(self.successResultOf(d)), b"old")

    def test_abortedWriteOfNewImageKeepsWaiting(self) -> None:
        """The cache waits on: the image may still come (e.g. resent)."""
        self.registry.beginWrite(KEY)
        d = self.registry.whenAvailable(KEY)
        self.registry.abortWrite(KEY)
        self.assertNoResult(d)
        self.registry.close()
        self.failureResultOf(d, ImageNotFound)

    def test_replaceReleasesOld(self) -> None:
        old = _image(b"old")
        self.registry.beginWrite(KEY)
        self.registry.publish(KEY, old)
        _publish(self.registry, KEY, b"new")
        self.assertEqual(readAll(self.registry.get(KEY)), b"new")  # type: ignore[arg-type]
        self.assertEqual(old.chunks(), [])
        self.assertEqual(self.registry.keys(), [KEY])

    def test_zeroLengthImageExists(self) -> None:
        _publish(self.registry, KEY, b"")
        self.registry.close()
        image = self.successResultOf(self.registry.whenAvailable(KEY))
        self.assertEqual(image.size, 0)

    def test_whenComplete(self) -> None:
        self.registry.beginWrite(KEY)
        d = self.registry.whenComplete()
        self.registry.close()
        self.assertNoResult(d)
        self.registry.publish(KEY, _image(b"x"))
        self.successResultOf(d)
        self.successResultOf(self.registry.whenComplete())

    def test_snapshotIdsAppend(self) -> None:
        """pre-dump then dump gives [pre, dump]."""
        store = MemoryStore()
        key = ("", wire.PARENT_IMAGE)
        for snapshotId in ["pre", "dump"]:
            writer = store.newWriter(self.registry.get(key))
            writer.write(wire.encodeSnapshotId(snapshotId))
            self.registry.beginWrite(key)
            self.registry.publish(key, writer.commit())
        self.assertEqual(self.registry.snapshotIds(), ["pre", "dump"])

    def test_snapshotIdsSeedKey(self) -> None:
        _publish(self.registry, ("null", "parent"), wire.encodeSnapshotId("s"))
        self.assertEqual(self.registry.snapshotIds(), ["s"])

    def test_publishOrderAndObservers(self) -> None:
        seen = []
        self.registry.onPublish(lambda key, image: seen.append(key))
        _publish(self.registry, ("s", "a"), b"")
        _publish(self.registry, ("s", "b"), b"")
        self.assertEqual(seen, [("s", "a"), ("s", "b")])
        self.assertEqual(self.registry.publishOrder, seen)

    def test_release(self) -> None:
        image = _image(b"abc")
        self.registry.beginWrite(KEY)
        self.registry.publish(KEY, image)
        self.assertEqual(self.registry.totalBytes, 3)
        self.registry.release()
        self.assertEqual(self.registry.keys(), [])
        self.assertEqual(image.chunks(), [])

    def test_reopen(self) -> None:
        self.registry.close()
        self.registry.reopen()
        self.assertNoResult(self.registry.whenAvailable(KEY))


class ProxyRegistryTests(SynchronousTestCase):
    """A registry that answers missing images at once (the proxy's)."""

    def setUp(self) -> None:
        self.registry = SnapshotRegistry(waitForMissing=False)

    def test_missingFailsAtOnce(self) -> None:
        self.failureResultOf(self.registry.whenAvailable(KEY), ImageNotFound)

    def test_writeInProgressWaits(self) -> None:
        """criu appends to parent and reads it back at once."""
        self.registry.beginWrite(KEY)
        d = self.registry.whenAvailable(KEY)
        self.assertNoResult(d)
        self.registry.publish(KEY, _image(b"x"))
        self.assertEqual(readAll(self.successResultOf(d)), b"x")

    def test_abortedWriteFails(self) -> None:
        self.registry.beginWrite(KEY)
        d = self.registry.whenAvailable(KEY)
        self.registry.abortWrite(KEY)
        self.failureResultOf(d, ImageNotFound)
