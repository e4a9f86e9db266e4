"""
End-to-end tests of L{ImageProxyService} and L{ImageCacheService} in one
process: real sockets on loopback, criu played by the blocking client in
threads.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from twisted_criu import wire
from twisted_criu.testing.processes import freePort

from .helpers import Migration, MigrationCase, inThread, waitFor


class ServiceTests(MigrationCase):
    @inlineCallbacks
    def test_fullSession(self) -> Any:
        """Images round-trip byte-exact and both sessions complete."""
        m = self.m
        assert m.cache and m.proxy
        cacheDone = m.cache.whenSessionDone()
        proxyDone = m.proxy.whenSessionDone()
        images = {"pages-1.img": os.urandom(3 << 20), "core-1.img": b"core", "empty.img": b""}

        def dump() -> list[str]:
            m.dump.pushSnapshotId("snap1")
            ids = m.dump.snapshotIds()
            for name, data in images.items():
                m.dump.write("snap1", name, data)
            m.dump.finishDump()
            return ids

        ids = yield inThread(dump)
        self.assertEqual(ids, ["snap1"])
        proxySummary = yield proxyDone
        self.assertEqual(proxySummary.images, 4)  # + parent
        self.assertEqual(proxySummary.snapshotIds, ["snap1"])

        def restore() -> dict[str, Any]:
            got: dict[str, Any] = {"ids": m.restore.snapshotIds()}
            for name in list(images) + ["memfd.img"]:
                got[name] = m.restore.read("snap1", name)
            m.restore.finishRestore()
            return got

        got = yield inThread(restore)
        self.assertEqual(got.pop("ids"), ["snap1"])
        self.assertIsNone(got.pop("memfd.img"))
        self.assertEqual(got, images)
        cacheSummary = yield cacheDone
        self.assertEqual((cacheSummary.images, cacheSummary.bytes), (4, sum(map(len, images.values())) + 11))

    def test_socketsOwnerOnly(self) -> None:
        """criu's sockets are created 0600: images are nobody else's business."""
        for path in (self.m.dump.path, self.m.restore.path, self.m.captureSocket, self.m.serveSocket):
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o600, path)

    @inlineCallbacks
    def test_readBeforeImageArrives(self) -> Any:
        """A restore that starts before the dump is delivered waits for it."""
        m = self.m
        assert m.cache
        read = inThread(m.restore.read, "snap1", "late.img")
        yield waitFor(lambda: m.cache.readsWaiting == 1)  # type: ignore[union-attr]
        yield inThread(m.dump.write, "snap1", "late.img", b"finally")
        self.assertNoResult(read)  # the dump is not finished: nothing is served yet
        yield inThread(m.dump.finishDump)
        self.assertEqual((yield read), b"finally")

    @inlineCallbacks
    def test_imageThatNeverComes(self) -> Any:
        """ENOENT once the dump is delivered without it, then at once for later reads."""
        m = self.m
        assert m.cache
        read = inThread(m.restore.read, "snap1", "never.img")
        yield waitFor(lambda: m.cache.readsWaiting == 1)  # type: ignore[union-attr]
        yield inThread(m.dump.write, "snap1", "a.img", b"a")
        self.assertNoResult(read)
        yield inThread(m.dump.finishDump)
        self.assertIsNone((yield read))
        self.assertEqual(m.cache.session.state, "restoring")  # type: ignore[union-attr]
        self.assertIsNone((yield inThread(m.restore.read, "snap1", "other.img")))
        self.assertEqual((yield inThread(m.restore.read, "snap1", "a.img")), b"a")

    @inlineCallbacks
    def test_finishWhileDataInPipe(self) -> Any:
        """The C proxy lost an image whose pipe was still draining at FINISH."""
        m = self.m
        data = os.urandom(5 << 20)

        def dump() -> None:
            writer = m.dump.openWrite("snap1", "pages-1.img")
            writer.write(data[: 1 << 20])
            m.dump.finishDump()
            writer.write(data[1 << 20 :])
            writer.close()

        yield inThread(dump)
        self.assertEqual((yield inThread(m.restore.read, "snap1", "pages-1.img")), data)

    @inlineCallbacks
    def test_zeroLengthTwiceWrittenAndParentAppendedTwice(self) -> Any:
        """The C bugs of remote-images.md section 5, items 1 to 4."""
        m = self.m

        def dump() -> list[str]:
            m.dump.pushSnapshotId("pre")
            m.dump.pushSnapshotId("dump")
            m.dump.write("dump", "zero.img", b"")
            m.dump.write("dump", "twice.img", b"first version")
            m.dump.write("dump", "twice.img", b"second")
            ids = m.dump.snapshotIds()
            m.dump.finishDump()
            return ids

        assert m.proxy
        delivered = m.proxy.whenSessionDone()
        self.assertEqual((yield inThread(dump)), ["pre", "dump"])
        # Both versions of twice.img travel; a restore started before the
        # second arrived could read the first (as with the C daemons).
        yield delivered

        def restore() -> tuple[Any, ...]:
            return (
                m.restore.snapshotIds(),
                m.restore.read("dump", "zero.img"),
                m.restore.read("dump", "twice.img"),
                m.restore.read("dump", "after.img"),
            )

        self.assertEqual((yield inThread(restore)), (["pre", "dump"], b"", b"second", None))

    @inlineCallbacks
    def test_proxyAnswersItsOwnReads(self) -> Any:
        """criu dump re-reads parent (and parent pagemaps) from the proxy."""
        m = self.m

        def dump() -> tuple[Any, ...]:
            m.dump.write("snap1", "pagemap-1.img", b"pm")
            return (m.dump.read("snap1", "pagemap-1.img"), m.dump.read("snap1", "nope.img"))

        self.assertEqual((yield inThread(dump)), (b"pm", None))

    @inlineCallbacks
    def test_rereadsAndConcurrentReaders(self) -> Any:
        m = self.m
        data = os.urandom(1 << 20)
        yield inThread(m.dump.write, "snap1", "pages-1.img", data)
        yield inThread(m.dump.finishDump)
        reads = [inThread(m.restore.read, "snap1", "pages-1.img") for _ in range(4)]
        for read in reads:
            self.assertEqual((yield read), data)

    @inlineCallbacks
    def test_badClientDoesNotDisturbOthers(self) -> Any:
        m = self.m

        def garbage() -> bytes:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(m.dump.path)
                s.sendall(b"\xff\xff\xff\x7f" + b"x" * 100)
                return s.recv(10)

        def good() -> bytes | None:
            m.dump.write("snap1", "ok.img", b"ok")
            return m.dump.read("snap1", "ok.img")

        self.assertEqual((yield inThread(garbage)), b"")
        self.assertEqual((yield inThread(good)), b"ok")

    @inlineCallbacks
    def test_seedVariant(self) -> Any:
        """The 2015 seed: inline data, null snapshot id, DUMP_FINISH."""
        m = self.m
        m.dump.variant = m.restore.variant = "seed"
        data = os.urandom(200000)

        def migrate() -> tuple[Any, ...]:
            m.dump.pushSnapshotId("snap1")
            m.dump.write("snap1", "pages-1.img", data)
            m.dump.finishDump()
            result = (m.restore.snapshotIds(), m.restore.read("snap1", "pages-1.img"))
            m.restore.finishRestore()
            return result

        self.assertEqual((yield inThread(migrate)), (["snap1"], data))

    @inlineCallbacks
    def test_nextSession(self) -> Any:
        """Without --once both daemons serve one migration after another."""
        m = self.m
        assert m.cache and m.proxy
        for n in range(3):
            done = m.cache.whenSessionDone()

            def migrate() -> bytes | None:
                m.dump.write(f"snap{n}", "a.img", b"a%d" % n)
                m.dump.finishDump()
                data = m.restore.read(f"snap{n}", "a.img")
                m.restore.finishRestore()
                return data

            self.assertEqual((yield inThread(migrate)), b"a%d" % n)
            yield done
        self.assertEqual(m.cache.sessionsCompleted, 3)
        self.assertEqual(m.proxy.sessionsCompleted, 3)
        self.assertEqual(m.cache.sessions, {})


class ChecksumSessionTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_checksummedSession(self) -> Any:
        """With checksum=True every image carries its SHA-256 and is verified."""
        m = Migration(self)
        yield m.start(checksum=True)
        assert m.proxy and m.cache
        done = m.proxy.whenSessionDone()
        images = {f"f{i}.img": os.urandom(i * 70000) for i in range(5)}

        def dump() -> None:
            m.dump.pushSnapshotId("snap1")
            for name, data in images.items():
                m.dump.write("snap1", name, data)
            m.dump.write("snap1", "f1.img", b"replaced")
            m.dump.finishDump()

        yield inThread(dump)
        yield done
        images["f1.img"] = b"replaced"
        got = yield inThread(lambda: {n: m.restore.read("snap1", n) for n in images})
        self.assertEqual(got, images)


class StartupOrderTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_proxyBeforeCache(self) -> Any:
        """The proxy retries until the cache comes up; nothing is lost."""
        m = Migration(self)
        port = freePort()
        m.startProxy(port)
        yield inThread(m.dump.write, "snap1", "early.img", b"early")
        yield deferLater(reactor, 0.3, lambda: None)
        yield m.startCache(port)
        yield inThread(m.dump.finishDump)
        self.assertEqual((yield inThread(m.restore.read, "snap1", "early.img")), b"early")


class StalledClientTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_stalledClientsDoNotBlockOthers(self) -> Any:
        """C bug 6: one stalled client blocked the single-threaded daemon."""
        m = Migration(self)
        yield m.start()
        big = os.urandom(8 << 20)
        yield inThread(m.dump.write, "snap1", "pages-1.img", big)
        yield inThread(m.dump.finishDump)
        silent = socket.socket(socket.AF_UNIX)
        self.addCleanup(silent.close)
        silent.connect(m.restore.path)  # connects, never speaks
        halfHeader = socket.socket(socket.AF_UNIX)
        self.addCleanup(halfHeader.close)
        halfHeader.connect(m.restore.path)
        halfHeader.sendall(wire.LocalRequest("a.img", "snap1", 0).toBytes()[:5])
        reader = yield inThread(m.restore.openRead, "snap1", "pages-1.img")
        self.addCleanup(reader.close)  # never reads its 8 MiB: the pipe fills up
        self.assertEqual((yield inThread(reader.read, 10)), big[:10])
        for _ in range(3):
            self.assertEqual((yield inThread(m.restore.read, "snap1", "pages-1.img")), big)
