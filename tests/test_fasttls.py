"""
The TLS record fast path (L{twisted_criu.flow._fasttls}), pinned against
real TLS connections on loopback with the link key's identity: what the
application hears is exactly what was written, in both directions, and
whatever is unusual (writes before the handshake, the peer's close, a
damaged record) goes through Twisted's own handling.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zope.interface import implementer

from twisted_criu.flow import _fasttls
from twisted_criu.interfaces import ITransientDataReceiver
from twisted_criu.link.key import loadKey


class Collector(Protocol):
    """Hashes and counts what it hears; fires C{done} when the connection ends."""

    def __init__(self, reply: bool = False) -> None:
        self.reply = reply
        self.digest = hashlib.sha256()
        self.received = 0
        self.done: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.ready: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.ready.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)
        self.received += len(data)
        if self.reply and self.transport is not None:
            self.transport.write(b"k")  # as the cache answers a proxy mid-stream

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.reason = reason
        self.done.callback(None)


class Keeper(Collector):
    """Keeps every piece it hears as it was given, and the pieces' types."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[Any] = []

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.pieces.append(data)


@implementer(ITransientDataReceiver)
class ViewTaker(Keeper):
    """Takes views of the reused buffer: copies what it keeps."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.pieces[-1] = (type(data), bytes(data))


class AvailableTests(SynchronousTestCase):
    def test_available(self) -> None:
        """The private pieces are there with the pyOpenSSL and Twisted we install."""
        self.assertTrue(_fasttls.available())
        key = loadKey(self.mktemp() + ".key", create=True)
        factory = _fasttls.tlsFactory(key.clientCreator(), True, Factory())
        self.assertIs(type(factory), _fasttls.FastTLSMemoryBIOFactory)


class TransientViewsTests(SynchronousTestCase):
    def test_throughTheHandshakeGate(self) -> None:
        """The link's receiver takes views, and the TLS handshake gate passes that on; others get copies."""
        from twisted.internet.task import Clock

        from twisted_criu.link.receiver import RemoteReceiver
        from twisted_criu.link.tls.gate import _HandshakeGate

        self.assertTrue(ITransientDataReceiver.implementedBy(RemoteReceiver))
        self.assertTrue(ITransientDataReceiver.providedBy(_HandshakeGate(ViewTaker(), Clock(), 1)))
        self.assertFalse(ITransientDataReceiver.providedBy(_HandshakeGate(Collector(), Clock(), 1)))


class FastPathTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def connect(self, reply: bool = False, server: Collector | None = None) -> Any:
        key = loadKey(self.mktemp() + ".key", create=True)
        server = server or Collector(reply)
        serverFactory = Factory.forProtocol(lambda: server)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            _fasttls.tlsFactory(key.serverCreator(), False, serverFactory)
        )
        self.addCleanup(port.stopListening)
        client = Collector()
        tls = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            _fasttls.tlsFactory(key.clientCreator(), True, Factory.forProtocol(lambda: client))
        )
        return client, server, tls

    @inlineCallbacks
    def test_bulkBothWays(self) -> Any:
        """
        Megabytes each way in writes of odd sizes (written before the
        handshake is done, too): every byte arrives, in order.
        """
        client, server, tls = yield self.connect()
        assert isinstance(tls, _fasttls.FastTLSMemoryBIOProtocol)
        yield client.ready
        payload = os.urandom((5 << 20) + 12345)
        sizes = [1, 100, 16384, 16385, (1 << 20) + 7]
        sent, offset, i = hashlib.sha256(), 0, 0
        while offset < len(payload):
            piece = payload[offset : offset + sizes[i % len(sizes)]]
            tls.write(memoryview(piece) if i % 2 else piece)
            sent.update(piece)
            offset += len(piece)
            i += 1
        yield _until(lambda: server.received == len(payload))
        self.assertEqual(server.digest.hexdigest(), sent.hexdigest())
        # the link key's ciphers: AES-128-GCM first (the cheapest with AES-NI)
        self.assertEqual(tls.getHandle().get_cipher_name(), "TLS_AES_128_GCM_SHA256")
        serverTLS = server.transport
        assert isinstance(serverTLS, _fasttls.FastTLSMemoryBIOProtocol)
        serverTLS.write(payload)
        yield _until(lambda: client.received == len(payload))
        self.assertEqual(client.digest.hexdigest(), hashlib.sha256(payload).hexdigest())
        # the bulk went the fast way, on both ends
        self.assertGreater(tls.fastRecords[0], 300)
        self.assertGreater(serverTLS.fastRecords[1], 300)
        self.assertGreater(serverTLS.fastRecords[0], 300)
        self.assertGreater(tls.fastRecords[1], 300)
        tls.loseConnection()
        yield server.done

    @inlineCallbacks
    def test_readsIntoReusedBuffer(self) -> Any:
        """
        Once the handshake is done the socket is read into a reused buffer,
        until the connection ends.  A protocol that keeps what it hears gets
        bytes of its own; one that provides L{ITransientDataReceiver} gets
        views, and copies.
        """
        payload = os.urandom(8 << 20)
        for server, expected in ((Keeper(), bytes), (ViewTaker(), memoryview)):
            client, _, tls = yield self.connect(server=server)
            yield client.ready
            tls.write(payload)
            yield _until(lambda: server.received == len(payload))
            serverTLS = server.transport
            assert isinstance(serverTLS, _fasttls.FastTLSMemoryBIOProtocol)
            socket = serverTLS.transport
            self.assertIsNotNone(serverTLS._reads)
            self.assertIn("doRead", vars(socket))
            if expected is bytes:
                self.assertEqual({type(piece) for piece in server.pieces}, {bytes})
                self.assertEqual(b"".join(server.pieces), payload)
            else:
                self.assertEqual({kind for kind, _ in server.pieces}, {memoryview})
                self.assertEqual(b"".join(piece for _, piece in server.pieces), payload)
            self.assertGreater(len(server.pieces), 8)
            tls.loseConnection()
            yield server.done
            self.assertNotIn("doRead", vars(socket))

    @inlineCallbacks
    def test_repliesWhileReceiving(self) -> Any:
        """
        The application writes while the bytes it hears are still being
        decrypted (a link status): OpenSSL must be asked why a read stopped
        before that write, or a pause for more bytes looks like an error.
        """
        client, server, tls = yield self.connect(reply=True)
        yield client.ready
        payload = os.urandom(16 << 20)
        tls.write(payload)
        yield _until(lambda: server.received == len(payload))
        self.assertEqual(server.digest.hexdigest(), hashlib.sha256(payload).hexdigest())
        yield _until(lambda: client.received > 0)
        self.assertIsNone(server.reason)
        tls.loseConnection()
        yield server.done

    @inlineCallbacks
    def test_cleanClose(self) -> Any:
        """The peer's close_notify after data: the data, then a clean end."""
        client, server, tls = yield self.connect()
        yield client.ready
        tls.write(b"x" * 100000)
        tls.loseConnection()
        yield server.done
        self.assertEqual(server.received, 100000)
        assert server.reason is not None
        self.assertTrue(server.reason.check(ConnectionDone), server.reason)

    @inlineCallbacks
    def test_damagedRecord(self) -> Any:
        """A record altered on the way: the connection fails with a TLS error, nothing of it is heard."""
        from OpenSSL import SSL

        client, server, tls = yield self.connect()
        yield client.ready
        tls.write(b"hello")  # the handshake is over once it is heard
        yield _until(lambda: server.received == 5)
        serverTLS = server.transport
        assert isinstance(serverTLS, TLSMemoryBIOProtocol)
        original = serverTLS.dataReceived
        damaged: list[int] = []

        def flip(data: bytes | memoryview) -> None:
            data = bytes(data)  # (a view of the reused read buffer)
            if not damaged and len(data) > 100:
                data = data[:50] + bytes([data[50] ^ 1]) + data[51:]
                damaged.append(1)
            original(data)

        serverTLS.dataReceived = flip  # type: ignore[method-assign]
        tls.write(os.urandom(1 << 16))
        yield server.done
        assert server.reason is not None
        self.assertTrue(server.reason.check(SSL.Error), server.reason)
        self.assertIn("bad record mac", server.reason.getErrorMessage())
        self.assertEqual(server.received, 5)


def _until(condition: Any, timeout: float = 20) -> Deferred[None]:
    from tests.helpers import waitFor

    result: Deferred[None] = waitFor(condition, timeout)
    return result
