"""
Compression end to end: a proxy and a cache on loopback (real sockets,
real compressing threads), per C{--compress} mode, restoring byte-exact.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from twisted_criu import wire
from twisted_criu.flow import compressing
from twisted_criu.flow.compress import LinkCompression, Mode
from twisted_criu.flow.rawrun import RawRun
from twisted_criu.link.receiver import RemoteReceiverFactory
from twisted_criu.link.sender import RemoteSenderFactory
from twisted_criu.progress import Direction
from twisted_criu.registry import readAll
from twisted_criu.storage.spill import SpillStore
from twisted_criu.testing.fakes import FakeLinkSource, FakeSink, storedImage

from .helpers import MigrationCase, inThread, waitFor

TEXT = b"".join(b"user:%07d,state=active,cart=[item-%d],token=%s\n" % (i, i % 7, os.urandom(4).hex().encode()) for i in range(120000))


class NoneTests(MigrationCase):
    """C{--compress none}: images as they were; the counters still count them."""

    mode = Mode.NONE

    def proxyArgs(self) -> dict[str, Any]:
        return {"compress": self.mode}

    @inlineCallbacks
    def test_restoresByteExact(self) -> Any:
        m = self.m
        assert m.cache and m.proxy
        proxyDone = m.proxy.whenSessionDone()
        images = {"pages-1.img": TEXT, "noise.img": os.urandom(3 << 20), "core-1.img": b"core", "empty.img": b""}

        def dump() -> None:
            m.dump.pushSnapshotId("snap1")
            m.dump.snapshotIds()
            for name, data in images.items():
                m.dump.write("snap1", name, data)
            m.dump.finishDump()

        yield inThread(dump)
        yield proxyDone

        def restore() -> dict[str, Any]:
            got = {name: m.restore.read("snap1", name) for name in images}
            m.restore.finishRestore()
            return got

        got = yield inThread(restore)
        self.assertEqual(got, images)
        sent = m.proxy.activity
        received = m.cache.activity
        raw = sent.linkRawBytes[Direction.TO_CACHE]
        onWire = sent.wireBytes[Direction.TO_CACHE]
        self.assertEqual(raw, received.linkRawBytes[Direction.FROM_PROXY])
        self.assertEqual(onWire, received.wireBytes[Direction.FROM_PROXY])
        self.assertGreaterEqual(raw, sum(map(len, images.values())))
        self.check(raw, onWire)

    def check(self, raw: int, onWire: int) -> None:
        self.assertEqual(onWire, raw)


class ZstdTests(NoneTests):
    mode = Mode.ZSTD

    def check(self, raw: int, onWire: int) -> None:
        # The text shrinks (to well under half), the noise does not.
        self.assertLess(onWire, raw - len(TEXT) // 2)


class AutoTests(NoneTests):
    mode = Mode.AUTO

    def check(self, raw: int, onWire: int) -> None:
        # Whatever it chose, never more than a few chunk words over the raw bytes.
        self.assertLessEqual(onWire, raw)


class RawRunTests(TestCase):
    """Raw chunks of a compressed image go by sendfile on a plain socket, in runs."""

    timeout = 60

    @inlineCallbacks
    def test_runsBetweenCompressedChunks(self) -> Any:
        runs: list[RawRun] = []

        class RecordedRun(RawRun):
            def __init__(self, *args: Any) -> None:
                super().__init__(*args)
                runs.append(self)

        self.patch(compressing, "RawRun", RecordedRun)
        sink = FakeSink()
        sink.reactor = reactor  # type: ignore[assignment]
        port: Any = reactor.listenTCP(0, RemoteReceiverFactory(sink), interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        compression = LinkCompression(Mode.AUTO, reactor)
        self.addCleanup(compression.stop)
        # An earlier image did not shrink: raw is the choice, even for
        # bytes that wait for the link (the first of which would otherwise
        # go compressed while the link is unmeasured).
        compression.policy.compressed(1 << 20, (1 << 20) + 20, 0.001)
        source = FakeLinkSource()
        data = TEXT[: 3 << 20] + os.urandom(9 << 20) + TEXT[: 2 << 20] + b"tail"
        source.images[("snap1", "pages-1.img")] = storedImage(SpillStore(64 << 20, self.mktemp()), data)
        hello: Deferred[None] = Deferred()

        class Hello(FakeLinkSource):
            def statusReceived(self, sender: Any, status: Any) -> None:
                if not hello.called:
                    hello.callback(None)

        source.__class__ = Hello
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        sender = yield endpoint.connect(RemoteSenderFactory(source, compression=compression))
        self.addCleanup(sender.transport.loseConnection)
        sender.sendMarker(wire.Marker.SYNC)  # the cache answers HELLO
        yield hello
        sender.enqueue(("snap1", "pages-1.img"))
        yield sender.whenIdle()
        yield waitFor(lambda: sink.registry.get(("snap1", "pages-1.img")) is not None)
        image = sink.registry.get(("snap1", "pages-1.img"))
        assert image is not None
        self.assertEqual(readAll(image), data)
        self.assertTrue(runs)
        self.assertTrue(any(run.chunks for run in runs))
