"""
What C{twisted-criu} finds at the other end, in this process on loopback:
L{probe} tells a TLS peer from a plain one and from one that turns this
host away; C{push} fails at once, in one line, on a TLS/plain mismatch, a
different link key or a refusal, and within C{--timeout} when the cache
keeps dropping the link; the control commands give up on a daemon that
does not answer.
"""

from __future__ import annotations

import io
import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.trial.unittest import TestCase

from tests.helpers import Migration
from tests.test_tls import TLSMigration
from twisted_criu import cli
from twisted_criu.cli.client import ControlClient
from twisted_criu.cli.reach import Answer, probe
from twisted_criu.link.key import loadKey


class Dropper(Protocol):
    """Accepts, then closes at the first byte."""

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        transport.loseConnection()


class TurnAway(Protocol):
    """Closes at once, as a daemon does with a host not in its --allow-from."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.loseConnection()


class Silent(Protocol):
    """Accepts, reads, says nothing."""


def refusedPort() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PeersMixin:
    """Caches and odd servers on loopback."""

    @inlineCallbacks
    def startCache(self, *args: str) -> Any:
        m = TLSMigration(self)  # type: ignore[arg-type]
        yield m.startCache(*args)
        return m

    def startServer(self, protocol: type[Protocol]) -> int:
        factory: Any = ServerFactory.forProtocol(protocol)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
        address: Any = port.getHost()
        return int(address.port)


class ProbeTests(PeersMixin, TestCase):
    timeout = 30

    def probe(self, port: int, answer: float = 3.0) -> Any:
        endpoint = clientFromString(reactor, f"tcp:host=127.0.0.1:port={port}")
        return probe(reactor, endpoint, grace=0.2, answer=answer)

    @inlineCallbacks
    def test_keyedCacheSpeaksTLS(self) -> Any:
        m = yield self.startCache()
        self.assertIs((yield self.probe(m.port)), Answer.TLS)

    @inlineCallbacks
    def test_plainCacheDoesNot(self) -> Any:
        m = yield self.startCache("--plain-link")
        self.assertIs((yield self.probe(m.port)), Answer.PLAIN)

    @inlineCallbacks
    def test_turnedAway(self) -> Any:
        self.assertIs((yield self.probe(self.startServer(TurnAway))), Answer.TURNED_AWAY)

    @inlineCallbacks
    def test_silent(self) -> Any:
        self.assertIs((yield self.probe(self.startServer(Silent), answer=0.3)), Answer.SILENT)

    @inlineCallbacks
    def test_unreachable(self) -> Any:
        self.assertIs((yield self.probe(refusedPort())), Answer.UNREACHABLE)


class PushLinkTests(PeersMixin, TestCase):
    """push against the wrong peer: one line, soon."""

    timeout = 60

    def setUp(self) -> None:
        self.dump = self.mktemp()
        os.makedirs(self.dump)
        with open(os.path.join(self.dump, "pages-1.img"), "wb") as f:
            f.write(os.urandom(1 << 16))

    @inlineCallbacks
    def pushFails(self, port: int, *argv: str) -> Any:
        """Push to C{port} on loopback; the error, and how long it took."""
        options = cli.PushOptions()
        options.parseOptions([self.dump, "--address", "127.0.0.1", "--port", str(port), *argv])
        started = reactor.seconds()
        with self.assertRaises(cli.CommandError) as e:
            yield cli.push(reactor, options, io.StringIO())
        return str(e.exception), reactor.seconds() - started

    @inlineCallbacks
    def test_keyAgainstPlainCache(self) -> Any:
        m = yield self.startCache("--plain-link")
        why, seconds = yield self.pushFails(m.port, "--timeout", "60")
        self.assertIn("speaks plain TCP: give --plain-link", why)
        self.assertLess(seconds, 10)

    @inlineCallbacks
    def test_plainAgainstKeyedCache(self) -> Any:
        """It used to reconnect every 2 s forever: the cache drops a plain link at once."""
        m = yield self.startCache()
        why, seconds = yield self.pushFails(m.port, "--plain-link", "--timeout", "60")
        self.assertIn("speaks TLS: drop --plain-link", why)
        self.assertLess(seconds, 10)

    @inlineCallbacks
    def test_anotherKey(self) -> Any:
        m = yield self.startCache()
        other = os.path.join(m.base, "other.key")
        loadKey(other, create=True)
        why, seconds = yield self.pushFails(m.port, "--link-key", other, "--timeout", "60")
        self.assertIn("TLS handshake failed: certificate verify failed (the cache holds a different link key", why)
        self.assertLess(seconds, 10)

    @inlineCallbacks
    def test_turnedAway(self) -> Any:
        why, seconds = yield self.pushFails(self.startServer(TurnAway), "--timeout", "60")
        self.assertIn("closes connections from this host at once: is this host in its --allow-from?", why)
        self.assertLess(seconds, 10)

    @inlineCallbacks
    def test_droppedOverAndOver(self) -> Any:
        """A plain peer that drops every connection: --timeout ends it."""
        why, seconds = yield self.pushFails(self.startServer(Dropper), "--plain-link", "--timeout", "2")
        self.assertIn("dropped the link", why)
        self.assertIn("got no further for 2 s", why)
        self.assertLess(seconds, 6)


class PushAbortTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_imageVanishes(self) -> Any:
        """An image that cannot be read aborts the push at once, saying which."""
        m = Migration(self)
        port = yield m.startCache()
        dump = self.mktemp()
        os.makedirs(dump)
        for name in ("a.img", "b.img"):
            with open(os.path.join(dump, name), "wb") as f:
                f.write(os.urandom(1 << 20))
        options = cli.PushOptions()
        options.parseOptions(
            [dump, "--address", "127.0.0.1", "--port", str(port.getHost().port), "--plain-link", "--timeout", "60"]
        )
        started = reactor.seconds()
        pushed = cli.push(reactor, options, io.StringIO())
        os.unlink(os.path.join(dump, "b.img"))  # listed, gone before it is sent
        with self.assertRaises(cli.CommandError) as e:
            yield pushed
        self.assertIn("the push was aborted: b.img could not be read", str(e.exception))
        self.assertLess(reactor.seconds() - started, 10)


class ControlTimeoutTests(PeersMixin, TestCase):
    timeout = 30

    @inlineCallbacks
    def test_silentDaemon(self) -> Any:
        where = f"tcp:127.0.0.1:{self.startServer(Silent)}"
        client = ControlClient(reactor, where, timeout=0.5)
        with self.assertRaises(cli.CommandError) as e:
            yield client.sessions()
        client.close()
        self.assertEqual(str(e.exception), f"the daemon at {where} did not answer for 0.5 s (--timeout)")

    @inlineCallbacks
    def test_notADaemon(self) -> Any:
        where = f"tcp:127.0.0.1:{self.startServer(Dropper)}"
        client = ControlClient(reactor, where, timeout=5)
        with self.assertRaises(cli.CommandError) as e:
            yield client.sessions()
        client.close()
        self.assertIn("closed the connection without an answer", str(e.exception))
