"""
Resume after a link break, end to end: both daemons in this process,
joined through a TCP relay that cuts the link in the middle of a large
image, several times.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Callable, Iterator

from twisted.internet import reactor as _reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from twisted_criu.daemons.cache import ImageCacheService
from twisted_criu.daemons.proxy import ImageProxyService
from twisted_criu.link.key import loadKey
from twisted_criu.link.tls.endpoints import TLSClientEndpoint, TLSServerEndpoint
from twisted_criu.storage.spill import SpillStore
from twisted_criu.twistd.options import unixEndpoint

from .helpers import Migration, inThread

reactor: Any = _reactor
MiB = 1 << 20
#: The image, and how much each connection carries before the relay cuts it.
SIZE = 32 * MiB
EVERY = 8 * MiB
CUTS = 3
#: What one cut may cost: the bytes in flight (the relay's buffer and the
#: socket buffers between it and the cache) and a partly sent chunk.
PER_CUT = 4 * MiB
#: The relay's send buffer towards the cache (the kernel doubles it).
RELAY_SNDBUF = 256 * 1024


class _CacheSide(Protocol):
    transport: Any

    def __init__(self, proxySide: _ProxySide) -> None:
        self.proxySide = proxySide

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RELAY_SNDBUF)
        self.proxySide.linked(self)

    def dataReceived(self, data: bytes) -> None:
        self.proxySide.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.proxySide.transport.abortConnection()


class _ProxySide(Protocol):
    """One connection from the proxy: relayed to the cache until its C{EVERY}th byte."""

    cache: _CacheSide | None = None
    transport: Any

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.carried = 0
        #: Bytes this connection carries before it is cut.
        self.every = relay.every[min(relay.cuts, len(relay.every) - 1)]

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port)
        def failed(reason: Failure) -> None:
            self.transport.abortConnection()

        endpoint.connect(Factory.forProtocol(lambda: _CacheSide(self))).addErrback(failed)

    def linked(self, cache: _CacheSide) -> None:
        self.cache = cache
        cache.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(cache.transport, True)
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        assert self.cache is not None
        self.relay.carried += len(data)
        if self.relay.cuts < self.relay.maxCuts and self.carried + len(data) >= self.every:
            self.cache.transport.write(data[: self.every - self.carried])
            self.relay.cut()
            self.cache.transport.abortConnection()
            self.transport.abortConnection()
            return
        self.carried += len(data)
        self.cache.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.cache is not None:
            self.cache.transport.abortConnection()


class Relay:
    """
    Relays the proxy's connections to the cache on C{port}, cutting each
    of the first C{maxCuts} after C{every} bytes from the proxy (or the
    I{n}th after C{every[n]}, the last repeated).

    @ivar carried: bytes the proxy sent, over every connection.
    """

    def __init__(
        self, port: int, every: int | list[int], maxCuts: int, onCut: Callable[[int], Any] = lambda n: None
    ) -> None:
        self.port = port
        self.every = every if isinstance(every, list) else [every]
        self.maxCuts = maxCuts
        self.onCut = onCut
        self.cuts = 0
        self.carried = 0

    def cut(self) -> None:
        self.cuts += 1
        self.onCut(self.cuts)

    def factory(self) -> Factory:
        return Factory.forProtocol(lambda: _ProxySide(self))


def _pages(data: bytes, gate: threading.Event, gateAt: int) -> Iterator[bytes]:
    """criu writing C{data}, stopping at C{gateAt} until the link has been cut (so they cut it live)."""
    for start in range(0, len(data), MiB):
        if start == gateAt:
            assert gate.wait(30), "the link was never cut"
        yield data[start : start + MiB]


class _Harness(TestCase):
    """Both daemons in this process, the proxy's link through a L{Relay}."""

    timeout = 120

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.m = Migration(self)

    @inlineCallbacks
    def startCache(self, key: Any, resumeGrace: float = 60.0) -> Any:
        """A cache (on the migration's socket directory); its link port number."""
        listen: Any = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        if key is not None:
            listen = TLSServerEndpoint(reactor, listen, key.serverCreator(), 10)
        store = SpillStore(1 << 30, self.mktemp(), reactor.callFromThread)
        self.addCleanup(store.close)
        cache = self.m.cache = ImageCacheService(
            reactor,
            serverFromString(reactor, unixEndpoint(os.path.join(self.m.dst, "img-cache.sock"))),
            listen,
            store=store,
            resumeGrace=resumeGrace,
        )
        cache.startService()
        self.addCleanup(cache.stopService)
        port = yield cache.remoteEndpoint.whenListening()
        return port.getHost().port

    @inlineCallbacks
    def startProxy(self, key: Any, relay: Relay) -> Any:
        """A proxy linked to the cache through C{relay}."""
        relayPort = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(relay.factory())
        self.addCleanup(relayPort.stopListening)
        cache: Any = clientFromString(reactor, f"tcp:host=127.0.0.1:port={relayPort.getHost().port}")
        if key is not None:
            cache = TLSClientEndpoint(reactor, cache, key.clientCreator(), 10, "relay")
        store = SpillStore(1 << 30, self.mktemp(), reactor.callFromThread, holdPipes=True)  # as criu-proxy keeps it
        self.addCleanup(store.close)
        self.m.proxy = ImageProxyService(
            reactor,
            serverFromString(reactor, unixEndpoint(os.path.join(self.m.src, "img-proxy.sock"))),
            cache,
            store=store,
            retryPolicy=lambda attempt: 0.05,
        )
        self.m.proxy.startService()
        self.addCleanup(self.m.proxy.stopService)


    def dump(self, gate: threading.Event) -> Deferred[None]:
        """criu's dump, held half-way in its gated image until C{gate} is set."""
        raise NotImplementedError

    @inlineCallbacks
    def dumpThroughRelay(self, tls: bool, schedule: int | list[int]) -> Any:
        """
        Both daemons, linked through a L{Relay} that cuts the link C{CUTS}
        times by C{schedule}, and the dump, let past half-way at the second
        cut; the relay.
        """
        key = loadKey(os.environ["TWISTED_CRIU_LINK_KEY"], create=True) if tls else None
        port = yield self.startCache(key)
        gate = threading.Event()
        relay = Relay(port, schedule, CUTS, lambda n: reactor.callInThread(gate.set) if n == 2 else None)
        yield self.startProxy(key, relay)
        yield self.dump(gate)
        return relay


class ResumeTests(_Harness):
    """A session of one large image, cut in its middle."""

    def setUp(self) -> None:
        super().setUp()
        self.data = os.urandom(SIZE)

    def dump(self, gate: threading.Event) -> Deferred[None]:
        """criu's dump: a small image, then C{SIZE} bytes, stopping half-way until C{gate} is set."""

        def dump() -> None:
            self.m.dump.write("snap1", "inventory.img", b"inventory")
            self.m.dump.write("snap1", "pages-1.img", _pages(self.data, gate, SIZE // 2))
            self.m.dump.finishDump()

        return inThread(dump)

    @inlineCallbacks
    def migrate(self, tls: bool) -> Any:
        """Migrate a C{SIZE} image through a relay cutting it C{CUTS} times; the relay."""
        relay = yield self.dumpThroughRelay(tls, EVERY)
        restored = yield inThread(self.m.restore.read, "snap1", "pages-1.img")
        self.assertTrue(restored == self.data, "the restored image differs")
        self.assertEqual(relay.cuts, CUTS)
        resumed = [e for e in self.events if e.get("log_format", "").startswith("resuming {image} (session")]
        self.assertEqual(len(resumed), CUTS)
        return relay

    @inlineCallbacks
    def test_plain(self) -> Any:
        """
        Cut three times in the middle of a 32 MiB image (twice while criu
        writes it): each cut costs at most what was in flight (without
        resuming, each costs what the connection carried, 8 MiB).
        """
        relay = yield self.migrate(tls=False)
        self.assertLess(relay.carried, SIZE + CUTS * PER_CUT)

    @inlineCallbacks
    def test_tls(self) -> Any:
        """The same under TLS (the link key): the rest is read from the store, not sent with sendfile."""
        relay = yield self.migrate(tls=True)
        self.assertLess(relay.carried, SIZE + CUTS * PER_CUT)

    @inlineCallbacks
    def test_cacheRestarted(self) -> Any:
        """
        The cache itself restarts after the cut: it kept nothing, so the
        proxy, told no RESUME_AT, sends everything from the start.
        """
        key = loadKey(os.environ["TWISTED_CRIU_LINK_KEY"], create=True)
        port = yield self.startCache(key)
        gate = threading.Event()
        restarted: Deferred[None] = Deferred()

        @inlineCallbacks
        def restart(cuts: int) -> Any:
            assert self.m.cache is not None
            yield self.m.cache.stopService()
            relay.port = yield self.startCache(key)
            reactor.callInThread(gate.set)
            restarted.callback(None)

        relay = Relay(port, EVERY, 1, restart)
        yield self.startProxy(key, relay)
        dumped = self.dump(gate)
        yield restarted
        restored = yield inThread(self.m.restore.read, "snap1", "pages-1.img")
        yield dumped
        self.assertTrue(restored == self.data, "the restored image differs")
        self.assertGreater(relay.carried, SIZE + EVERY - PER_CUT)
        self.assertFalse([e for e in self.events if e.get("log_format", "").startswith("resuming {image} (session")])
        asked = [e for e in self.events if e.get("log_format", "").startswith("the link broke with")]
        self.assertEqual(len(asked), 1)


#: A session of several images: two large ones and small ones.
LARGE = 24 * MiB
#: The first connection carries the first large image and part of the
#: second; the next ones, parts of the second.
SCHEDULE = [LARGE + 8 * MiB, 3 * MiB, 6 * MiB]


class SeveralImagesTests(_Harness):
    """
    A cut in the second large image of a session costs the bytes in
    flight: what the cache holds whole is not sent again.
    """

    def setUp(self) -> None:
        super().setUp()
        self.images = {
            "inventory.img": b"inventory",
            "pages-1.img": os.urandom(LARGE),
            "core-1.img": os.urandom(3000),
            "pages-2.img": os.urandom(LARGE),
            "mm-1.img": os.urandom(5000),
            "fs-1.img": b"fs",
        }

    def dump(self, gate: threading.Event) -> Deferred[None]:
        """criu's dump: the images in order, the second large one stopping half-way until C{gate} is set."""

        def dump() -> None:
            for name, data in self.images.items():
                gated = name == "pages-2.img"
                self.m.dump.write("snap1", name, _pages(data, gate, LARGE // 2) if gated else data)
            self.m.dump.finishDump()

        return inThread(dump)

    @inlineCallbacks
    def migrate(self, tls: bool) -> Any:
        """Migrate the images through a relay cutting the link C{CUTS} times in the second large one."""
        relay = yield self.dumpThroughRelay(tls, SCHEDULE)
        for name, data in self.images.items():
            restored = yield inThread(self.m.restore.read, "snap1", name)
            self.assertTrue(restored == data, f"the restored {name} differs")
        self.assertEqual(relay.cuts, CUTS)
        session = sum(len(data) for data in self.images.values())
        self.assertLess(relay.carried, session + CUTS * PER_CUT)
        said = [e["log_format"].format(**e) for e in self.events if "log_format" in e]
        resumed = [line for line in said if line.startswith("resuming snap1/pages-2.img (session")]
        self.assertEqual(len(resumed), CUTS)
        held = [line for line in said if line.startswith("the cache holds ")]
        self.assertEqual(len(held), CUTS, held)
        self.assertTrue(held[0].startswith("the cache holds 3 images (24.0 MiB) of this session whole"), held[0])
        self.assertFalse([line for line in said if line.startswith("the cache confirms")])  # receipts match
        return relay

    def test_plain(self) -> Any:
        """
        Cut three times in the second of two 24 MiB images (twice while
        criu writes it): the first is not sent again (it was, 24 MiB a cut).
        """
        return self.migrate(tls=False)

    def test_tls(self) -> Any:
        """The same under TLS (the link key)."""
        return self.migrate(tls=True)
