"""
Descriptors run out, end to end: both daemons in-process on loopback,
criu played by L{LocalImageClient}, the post-dump hook by L{runHook}.  An
image that gets no descriptor (no memfd on the proxy or on the cache, or
its connection closed at accept) fails criu's dump: the session is aborted
on both daemons (never restorable, no partial images kept), criu's next
write is refused, the hook exits 1; then the next dump goes through.
"""

from __future__ import annotations

import errno
import os
import re
import socket
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import LogLevel

from twisted_criu.storage.spill import SpillStore
from twisted_criu.testing.criu import StreamClient

from .helpers import descriptorsExhausted, inThread, waitFor
from .test_transactions import _Hooked

#: What the one error line says, with the image it names.
EXHAUSTED = r"too many open files \(RLIMIT_NOFILE \d+\)"

BIG = os.urandom(2 << 20)  # more than criu's pipe holds: its writer waits for the daemon


def starve(test: _Hooked, store: SpillStore) -> Callable[[bool], None]:
    """Make C{store}'s memfds fail with EMFILE while switched on."""
    starving = [False]
    real = store._newMemfd

    def newMemfd() -> int:
        if starving[0]:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real()

    test.patch(store, "_newMemfd", newMemfd)
    return lambda on: starving.__setitem__(0, on)


class _OutOfDescriptors(_Hooked):
    proxyArgs = {"linkTimeout": 5.0}

    def errorLines(self) -> list[str]:
        return [e["log_format"].format(**e) for e in self.events if e["log_level"] >= LogLevel.error]

    def limitLines(self) -> list[str]:
        return [line for line in self.errorLines() if re.search(EXHAUSTED, line)]

    @inlineCallbacks
    def startDump(self, snapshotId: str) -> Any:
        """criu appends to parent; the link says HELLO; a small image is written."""
        yield inThread(self.m.dump.pushSnapshotId, snapshotId)
        yield waitFor(lambda: self.logged("the cache speaks twisted-criu's link extension"))
        yield inThread(self.m.dump.write, snapshotId, "core-1.img", b"core")
        yield waitFor(lambda: self.logged(f"received {snapshotId}/core-1.img"))

    def write(self, name: str, data: bytes = BIG, snapshotId: str = "snap1") -> Any:
        """criu writes an image: fires with C{"ok"} or the error criu's write got."""

        def write() -> str:
            try:
                self.m.dump.write(snapshotId, name, data)
            except OSError as e:
                return type(e).__name__
            return "ok"

        return inThread(write)

    @inlineCallbacks
    def assertDumpFailed(self) -> Any:
        """
        Session 1 is aborted on both daemons and holds nothing; criu's next
        write and its post-dump hook fail; nothing is left in flight.
        """
        assert self.m.proxy and self.m.cache
        yield waitFor(lambda: self.logged("session 1 aborted") and self.m.proxy.session is None)  # type: ignore[union-attr]
        yield waitFor(lambda: self.m.cache.sessions == {})  # type: ignore[union-attr]
        self.assertEqual((yield self.write("pages-2.img")), "BrokenPipeError")
        status, out = yield self.hook("post-dump")
        self.assertEqual(status, 1, out)
        self.assertIn("session 1 was aborted", out)
        yield inThread(self.m.dump.finishDump)
        yield waitFor(lambda: self.logged("criu finished its dump into session 1, which was aborted"))
        self.assertFalse(self.logged("dump finished"))  # no line says otherwise
        self.assertIsNone((yield inThread(self.m.restore.read, "snap1", "core-1.img")))
        self.assertEqual((self.m.proxy.activity.active, self.m.cache.activity.active), (set(), set()))
        self.assertEqual([s.state for s in self.m.proxy.listSessions()], [])

    @inlineCallbacks
    def assertNextDumpGoesThrough(self) -> Any:
        images = {"core-1.img": b"core 2", "pages-1.img": os.urandom(3 << 20), "pages-2.img": BIG}
        yield inThread(self.m.dump.pushSnapshotId, "snap2")
        for name, data in images.items():
            self.assertEqual((yield self.write(name, data, "snap2")), "ok")
        status, out = yield self.hook("post-dump")
        self.assertEqual(status, 0, out)
        yield inThread(self.m.dump.finishDump)
        for name, data in images.items():
            self.assertEqual((yield inThread(self.m.restore.read, "snap2", name)), data, name)
        self.assertEqual((yield inThread(self.m.restore.snapshotIds)), ["snap2"])


class ProxyRunsOutTests(_OutOfDescriptors):
    """The proxy gets no memfd for criu's image."""

    def setUp(self) -> Any:
        self.store = SpillStore(64 << 20, self.mktemp())
        self.addCleanup(self.store.close)
        self.starving = starve(self, self.store)
        self.proxyArgs = {**self.proxyArgs, "store": self.store}
        return super().setUp()

    @inlineCallbacks
    def test_theDumpFails(self) -> Any:
        yield self.startDump("snap1")
        self.starving(True)
        self.assertEqual((yield self.write("pages-1.img")), "BrokenPipeError")
        self.starving(False)
        [line] = self.limitLines()
        self.assertRegex(line, rf"^cannot store snap1/pages-1\.img: {EXHAUSTED}: .*ulimit -Hn.*; the dump fails$")
        yield self.assertDumpFailed()
        self.assertEqual(self.store.inMemory, 0)  # the aborted session's images are gone
        yield self.assertNextDumpGoesThrough()


class CacheRunsOutTests(_OutOfDescriptors):
    """The cache gets no memfd for an image the proxy forwards."""

    def setUp(self) -> Any:
        self.store = SpillStore(64 << 20, self.mktemp())
        self.addCleanup(self.store.close)
        self.starving = starve(self, self.store)
        self.cacheArgs = {"store": self.store}
        return super().setUp()

    @inlineCallbacks
    def test_theDumpFails(self) -> Any:
        yield self.startDump("snap1")
        self.starving(True)
        yield self.write("pages-1.img")  # criu's write may end before the cache fails it
        yield waitFor(lambda: self.logged("session 1 aborted: the cache says the session is aborted"))
        self.starving(False)
        [line] = self.limitLines()
        self.assertRegex(line, rf"^cannot store snap1/pages-1\.img: {EXHAUSTED}: .*; its session is aborted$")
        yield self.assertDumpFailed()
        self.assertEqual(self.store.inMemory, 0)
        yield self.assertNextDumpGoesThrough()


class AcceptTests(_OutOfDescriptors):
    """criu connects while the proxy has no descriptor left: Twisted closes it at accept."""

    @inlineCallbacks
    def test_theDumpFails(self) -> Any:
        yield self.startDump("snap1")
        criu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(criu.close)
        with descriptorsExhausted():
            criu.connect(os.path.join(self.m.src, "img-proxy.sock"))
            yield waitFor(lambda: self.limitLines() != [], timeout=5)
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(criu.recv(1), b"")  # closed: criu fails, it does not wait
        [line] = self.limitLines()
        self.assertRegex(line, rf"^closed a connection to .*img-proxy\.sock as soon as accepted: {EXHAUSTED}")
        yield self.assertDumpFailed()
        yield self.assertNextDumpGoesThrough()


class StreamTests(_OutOfDescriptors):
    """C{criu dump --stream}: the run fails, and so does the next run's hook; the run after works."""

    def setUp(self) -> Any:
        self.proxyStore = SpillStore(64 << 20, self.mktemp())
        self.cacheStore = SpillStore(64 << 20, self.mktemp())
        for store in (self.proxyStore, self.cacheStore):
            self.addCleanup(store.close)
        self.starveProxy = starve(self, self.proxyStore)
        self.starveCache = starve(self, self.cacheStore)
        self.proxyArgs = {**self.proxyArgs, "store": self.proxyStore}
        self.cacheArgs = {"store": self.cacheStore}
        return super().setUp()

    def streamWrite(self, name: str, data: bytes = BIG) -> Any:
        """criu --stream writes a file on the run's connection: C{"ok"} or the error it got."""

        def write() -> str:
            try:
                self.capture.write(name, data)
            except OSError as e:
                return type(e).__name__
            return "ok"

        return inThread(write)

    @inlineCallbacks
    def assertRunFailed(self) -> Any:
        self.assertIn((yield self.streamWrite("inventory.img")), ("BrokenPipeError", "ConnectionResetError"))
        status, out = yield self.hook("post-dump")
        self.assertEqual(status, 1, out)
        yield inThread(self.capture.close)
        self.assertFalse(self.logged("dump finished"))
        assert self.m.cache
        yield waitFor(lambda: self.m.cache.sessions == {})  # type: ignore[union-attr]
        self.assertEqual((yield self.restoreFiles(["core-1.img"])), {"core-1.img": None})
        self.capture = StreamClient(self.m.captureSocket, timeout=20)
        self.addCleanup(self.capture.close)
        files = {"core-1.img": b"core 2", "pages-1.img": BIG, "inventory.img": b"inventory"}
        yield self.dumpFiles(files)
        status, out = yield self.hook("post-dump")
        self.assertEqual(status, 0, out)
        yield inThread(self.capture.close)
        self.assertEqual((yield self.restoreFiles(files)), files)

    @inlineCallbacks
    def test_proxyRunsOut(self) -> Any:
        self.assertEqual((yield self.streamWrite("core-1.img", b"core")), "ok")
        yield waitFor(lambda: self.logged("stored core-1.img"))
        self.starveProxy(True)
        self.assertEqual((yield self.streamWrite("pages-1.img")), "BrokenPipeError")
        self.starveProxy(False)
        [line] = self.limitLines()
        self.assertRegex(line, rf"^criu --stream session failed, closing its pipes: cannot store pages-1\.img: {EXHAUSTED}")
        yield self.assertRunFailed()

    @inlineCallbacks
    def test_cacheRunsOut(self) -> Any:
        """The session is aborted under a run that goes on: its next file is refused."""
        self.assertEqual((yield self.streamWrite("core-1.img", b"core")), "ok")
        yield waitFor(lambda: self.logged("received core-1.img"))
        self.starveCache(True)
        yield self.streamWrite("pages-1.img")
        yield waitFor(lambda: self.logged("session 1 aborted: the cache says the session is aborted"))
        self.starveCache(False)
        [line] = self.limitLines()
        self.assertRegex(line, rf"^cannot store pages-1\.img: {EXHAUSTED}: .*; its session is aborted$")
        yield self.assertRunFailed()
        self.assertTrue(self.logged("refusing inventory.img: the session criu is dumping into was aborted"))
