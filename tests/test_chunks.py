"""
Cut-through forwarding, end to end in one process: the proxy sends an
image to the cache while criu is still writing it, the cache publishes it
only once complete, and a write that breaks off is discarded on both ends.
"""

from __future__ import annotations

import errno
import os
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher

from tests.helpers import MigrationCase, inThread, waitFor
from twisted_criu.flow.compress import Mode
from twisted_criu import wire
from twisted_criu.link.receiver import RemoteReceiver
from twisted_criu.storage.spill import SpillStore
from twisted_criu.testing.criu import ImageWriter


class _Pair(MigrationCase):
    """A proxy (spill store) and a cache, the link up and extended."""

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        # Spills past about 1 MiB: both kinds of bytes.  Told of each disk
        # write, as the daemons' store is: without it a follower heard of
        # the spilled bytes only at the next write, and a test that paused
        # criu's writes stalled (1 run in 6 on a loaded machine).
        self.store = SpillStore(2 << 20, self.mktemp(), IReactorFromThreads(reactor).callFromThread)
        self.addCleanup(self.store.close)
        yield super().setUp()
        # parent goes first and brings the cache's HELLO (version 3).
        yield inThread(self.m.dump.pushSnapshotId, "snap1")
        assert self.m.proxy is not None
        yield waitFor(lambda: self.m.proxy.session._sender.peerVersion == wire.LINK_EXTENSION_VERSION)  # type: ignore[union-attr]

    def proxyArgs(self) -> dict[str, Any]:
        return {"store": self.store, "compress": Mode.NONE}  # raw chunks (tests.test_compress_e2e: others)

    def messages(self) -> list[str]:
        return [e["log_format"].format(**e) for e in self.events if "log_format" in e]

    def logged(self, text: str) -> bool:
        return any(text in message for message in self.messages())

    def cacheReceived(self) -> int:
        """Bytes of the image the cache is receiving now."""
        assert self.m.cache is not None and self.m.cache.session is not None
        links = [cast(RemoteReceiver, r) for r in self.m.cache.session.links]
        return sum(r._received for r in links if r._writer is not None)

    @inlineCallbacks
    def migrateConcurrent(self) -> Any:
        """Three images written at once all arrive whole."""
        m = self.m
        images = {f"pages-{i}.img": os.urandom((2 << 20) + i) for i in range(3)}
        writers = {}
        for name in images:
            writers[name] = yield inThread(m.dump.openWrite, "snap1", name)
        for name, data in images.items():
            yield inThread(writers[name].write, data)
        for writer in writers.values():
            yield inThread(writer.close)
        yield inThread(m.dump.finishDump)
        for name, data in images.items():
            got = yield inThread(m.restore.read, "snap1", name)
            self.assertEqual(got, data, name)


class CutThroughTests(_Pair):
    @inlineCallbacks
    def test_forwardedWhileWritten(self) -> Any:
        """The cache has most of the image before criu has finished writing it."""
        m = self.m
        data = os.urandom(6 << 20)
        writer: ImageWriter = yield inThread(m.dump.openWrite, "snap1", "pages-1.img")
        yield inThread(writer.write, data[: 5 << 20])
        yield waitFor(lambda: self.cacheReceived() >= 4 << 20)
        self.assertIsNone(m.cache.session.registry.get(("snap1", "pages-1.img")))  # type: ignore[union-attr]
        yield inThread(writer.write, data[5 << 20 :])
        yield inThread(writer.close)
        yield inThread(m.dump.finishDump)
        got = yield inThread(m.restore.read, "snap1", "pages-1.img")
        self.assertEqual(got, data)
        self.assertTrue(self.logged("forwarded snap1/pages-1.img (6291456 bytes, cut through)"))

    @inlineCallbacks
    def test_brokenWriteIsDiscardedOnBothEnds(self) -> Any:
        """
        The proxy cannot keep an image (its spill disk is full): the cache
        throws its part away, and the link serves the next image.
        """
        m = self.m

        def diskFull() -> Any:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(self.store, "_newSpillFile", diskFull)
        writer: ImageWriter = yield inThread(m.dump.openWrite, "snap1", "pages-1.img")
        try:
            yield inThread(writer.write, os.urandom(3 << 20))
        except BrokenPipeError:
            pass  # the proxy closed the pipe: criu's write fails
        yield inThread(writer.close)
        discarded = "criu's write of snap1/pages-1.img broke off on the dump host after "
        yield waitFor(lambda: self.logged(discarded))
        [line] = [m for m in self.messages() if discarded in m]
        self.assertGreater(int(line[len(discarded) :].split()[0]), 0)  # the cache had part of it
        self.assertTrue(self.logged("criu's write of snap1/pages-1.img broke off: the cache discards it"))
        yield inThread(m.dump.write, "snap1", "core.img", b"next image")
        yield inThread(m.dump.finishDump)
        got = yield inThread(m.restore.read, "snap1", "core.img")
        self.assertEqual(got, b"next image")
        missing = yield inThread(m.restore.read, "snap1", "pages-1.img")
        self.assertIsNone(missing)

    @inlineCallbacks
    def test_smallOpenImageDoesNotHoldTheLink(self) -> Any:
        """
        criu keeps a 12-byte image open while it writes the pages (as it
        does seccomp.img): the pages are cut through meanwhile, and the
        small image goes whole once closed.
        """
        m = self.m
        small: ImageWriter = yield inThread(m.dump.openWrite, "snap1", "seccomp.img")
        yield inThread(small.write, b"twelve bytes")
        data = os.urandom(6 << 20)
        pages: ImageWriter = yield inThread(m.dump.openWrite, "snap1", "pages-1.img")
        yield inThread(pages.write, data[: 5 << 20])
        yield waitFor(lambda: self.cacheReceived() >= 4 << 20)
        yield inThread(pages.write, data[5 << 20 :])
        yield inThread(pages.close)
        yield inThread(small.close)
        yield inThread(m.dump.finishDump)
        got = yield inThread(m.restore.read, "snap1", "pages-1.img")
        self.assertEqual(got, data)
        got = yield inThread(m.restore.read, "snap1", "seccomp.img")
        self.assertEqual(got, b"twelve bytes")
        self.assertTrue(self.logged("forwarded snap1/pages-1.img (6291456 bytes, cut through)"))
        self.assertTrue(self.logged("forwarded snap1/seccomp.img (12 bytes)"))

    @inlineCallbacks
    def test_concurrentWritesAllArrive(self) -> Any:
        """One image is cut through; those written meanwhile follow when the link is free."""
        yield self.migrateConcurrent()
        self.assertTrue(self.logged("forwarded snap1/pages-0.img (2097152 bytes, cut through)"))


class StoreAndForwardTests(_Pair):
    """With cut-through off, images go whole, once complete."""

    def proxyArgs(self) -> dict[str, Any]:
        return {"store": self.store, "cutThrough": False}

    @inlineCallbacks
    def test_forwardedOnlyWhenComplete(self) -> Any:
        m = self.m
        data = os.urandom(6 << 20)
        writer: ImageWriter = yield inThread(m.dump.openWrite, "snap1", "pages-1.img")
        yield inThread(writer.write, data[: 5 << 20])
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.cacheReceived(), 0)
        yield inThread(writer.write, data[5 << 20 :])
        yield inThread(writer.close)
        yield inThread(m.dump.finishDump)
        got = yield inThread(m.restore.read, "snap1", "pages-1.img")
        self.assertEqual(got, data)

    @inlineCallbacks
    def test_concurrentWritesAllArrive(self) -> Any:
        yield self.migrateConcurrent()
        self.assertFalse(self.logged("cut through"))
