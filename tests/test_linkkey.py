"""
The link key: the default security of the proxy -> cache link.

The daemons are built from their twistd C{Options} and C{makeService} (so
option parsing is part of every test), criu is played by the blocking
client in threads, and everything binds loopback.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.helpers import inThread, waitFor
from tests.test_tls import IMAGES, TLSMigration, hungUp
from twisted_criu.link import key as linkkey
from twisted_criu.link.tls import TLSClientEndpoint, TLSServerEndpoint
from twisted_criu.twistd import cache_tap, proxy_tap


class KeyFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "etc", "twisted-criu", "link.key")

    def test_generatedOnFirstUse(self) -> None:
        """A missing key is generated: 64 hex digits, mode 0600, in a 0700 directory."""
        key = linkkey.loadKey(self.path, create=True)
        self.assertTrue(key.created)
        info = os.stat(self.path)
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.path)).st_mode), 0o700)
        text = open(self.path).read()
        self.assertRegex(text, r"^[0-9a-f]{64}\n$")
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["link.key"])

    def test_sameFileSameIdentity(self) -> None:
        """Both ends reading one file derive the same public key; another file, another key."""
        first = linkkey.loadKey(self.path, create=True)
        again = linkkey.loadKey(self.path, create=True)
        self.assertFalse(again.created)
        self.assertEqual(first.publicKey, again.publicKey)
        self.assertEqual(first.fingerprint, again.fingerprint)
        other = linkkey.loadKey(os.path.join(self.directory, "other.key"), create=True)
        self.assertNotEqual(other.publicKey, first.publicKey)

    def test_neverOverwritten(self) -> None:
        """Generation never replaces a key another process wrote first."""
        os.makedirs(os.path.dirname(self.path))
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"ab" * 32 + b"\n")
        os.close(fd)
        self.assertFalse(linkkey._generate(self.path, "--link-key"))
        self.assertEqual(open(self.path).read(), "ab" * 32 + "\n")
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["link.key"])

    def error(self, create: bool = False) -> str:
        with self.assertRaises(linkkey.LinkKeyError) as e:
            linkkey.loadKey(self.path, create=create)
        return str(e.exception)

    def test_missingNotCreated(self) -> None:
        """push does not invent a key: it says where to copy the cache's."""
        message = self.error()
        self.assertIn(f"--link-key {self.path}: no link key there; copy the cache host's key", message)

    def test_readableByOthers(self) -> None:
        linkkey.loadKey(self.path, create=True)
        os.chmod(self.path, 0o644)
        self.assertIn(f"group or others may read or write it (mode 644): chmod 600 {self.path}", self.error())

    def test_notAKey(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"hunter2\n")
        os.close(fd)
        self.assertIn("not a twisted-criu link key (one line of 64 hex digits)", self.error(create=True))

    def test_symlinkRefused(self) -> None:
        """A symlink planted at the key's path is not followed."""
        target = os.path.join(self.directory, "target.key")
        linkkey.loadKey(target, create=True)
        os.makedirs(os.path.dirname(self.path))
        os.symlink(target, self.path)
        self.assertIn("cannot read it", self.error(create=True))

    def test_defaultPath(self) -> None:
        self.assertEqual(linkkey.defaultKeyPath({}, euid=0), "/etc/twisted-criu/link.key")
        self.assertEqual(
            linkkey.defaultKeyPath({"HOME": "/home/u"}, euid=1000), "/home/u/.config/twisted-criu/link.key"
        )
        self.assertEqual(
            linkkey.defaultKeyPath({"XDG_CONFIG_HOME": "/x"}, euid=1000), "/x/twisted-criu/link.key"
        )
        self.assertEqual(linkkey.defaultKeyPath({"TWISTED_CRIU_LINK_KEY": "/k"}, euid=0), "/k")


_O = TypeVar("_O", bound=usage.Options)


class LinkOptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        self.key = os.path.join(self.directory, "link.key")

    def parse(self, options: _O, *args: str) -> _O:
        options.parseOptions(["-D", self.directory, *args])
        return options

    def test_keyByDefault(self) -> None:
        """Without any flag both daemons secure the link with the (default) key."""
        proxy = self.parse(proxy_tap.Options())
        cache = self.parse(cache_tap.Options())
        proxyKey, cacheKey = proxy.linkKey(), cache.linkKey()
        assert proxyKey is not None and cacheKey is not None
        self.assertEqual(proxyKey.path, os.environ["TWISTED_CRIU_LINK_KEY"])
        self.assertEqual(proxyKey.publicKey, cacheKey.publicKey)
        proxyService = proxy_tap.makeService(proxy)
        self.assertIsInstance(proxyService._cache._endpoint, TLSClientEndpoint)  # type: ignore[attr-defined]
        cacheService = cache_tap.makeService(cache)
        self.assertIsInstance(cacheService.remoteEndpoint._endpoint, TLSServerEndpoint)  # type: ignore[attr-defined]
        # a peer gets a few seconds for its handshake, however long --timeout is
        self.assertEqual(cacheService.remoteEndpoint._endpoint.handshakeTimeout, 10.0)  # type: ignore[attr-defined]
        self.assertEqual(proxyService._cache._endpoint.handshakeTimeout, 10.0)  # type: ignore[attr-defined]

    def test_plainLink(self) -> None:
        self.assertIsNone(self.parse(proxy_tap.Options(), "--plain-link").linkKey())
        self.assertIsNone(self.parse(cache_tap.Options(), "--plain-link").linkKey())
        proxyService = proxy_tap.makeService(self.parse(proxy_tap.Options(), "--plain-link"))
        self.assertNotIsInstance(proxyService._cache._endpoint, TLSClientEndpoint)  # type: ignore[attr-defined]
        cacheService = cache_tap.makeService(self.parse(cache_tap.Options(), "--plain-link"))
        self.assertNotIsInstance(cacheService.remoteEndpoint._endpoint, TLSServerEndpoint)  # type: ignore[attr-defined]

    def usageError(self, options: usage.Options, *args: str) -> str:
        with self.assertRaises(usage.UsageError) as e:
            self.parse(options, *args)
        return str(e.exception)

    def test_conflicts(self) -> None:
        self.assertIn("--plain-link and --tls", self.usageError(cache_tap.Options(), "--plain-link", "--tls"))
        self.assertIn(
            "--link-key secures the default link: it does not go with --plain-link",
            self.usageError(proxy_tap.Options(), "--plain-link", "--link-key", self.key),
        )

    def test_badKeyIsAUsageError(self) -> None:
        with open(self.key, "w") as f:
            f.write("x" * 64)
        os.chmod(self.key, 0o600)
        message = self.usageError(proxy_tap.Options(), "--link-key", self.key)
        self.assertIn(f"--link-key {self.key}: not a twisted-criu link key", message)
        self.assertIn("or --plain-link for CRIU's C daemons", message)


class KeyedMigrationTests(TestCase):
    """Migrations over the default link, and peers that do not hold the key."""

    timeout = 60

    def setUp(self) -> None:
        self.m = TLSMigration(self)
        self.keys = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.keys)

    def keyFile(self, name: str) -> str:
        path = os.path.join(self.keys, name)
        linkkey.loadKey(path, create=True)
        return path

    @inlineCallbacks
    def test_migration(self) -> Any:
        """With no flag at all, a migration works, authenticated both ways."""
        m = self.m
        yield m.startCache()
        assert m.cache is not None
        cacheDone = m.cache.whenSessionDone()
        proxy, dump = m.startProxy()
        proxyDone = proxy.whenSessionDone()
        yield m.dump(dump, IMAGES)
        yield proxyDone
        got = yield m.restoreAll(list(IMAGES))
        self.assertEqual(got, IMAGES)
        yield cacheDone
        self.assertEqual(len(m.lines("authenticated as CN=twisted-criu link key ")), 1)
        self.assertEqual(m.lines("refused"), [])

    @inlineCallbacks
    def test_wrongKeyRefused(self) -> Any:
        """A proxy with another key gets nowhere, and both ends say the keys differ."""
        m = self.m
        yield m.startCache("--link-key", self.keyFile("cache.key"))
        proxy, dump = m.startProxy("--link-key", self.keyFile("proxy.key"))
        yield m.dump(dump, IMAGES)
        yield m.waitForLog("cannot reach the cache at", count=2)
        line = m.lines("cannot reach the cache")[0]
        self.assertIn("the cache holds a different link key", line)
        self.assertIn("copy one host's key file to the other", line)
        m.cacheUntouched()
        self.assertEqual(proxy.sessionsCompleted, 0)

    @inlineCallbacks
    def test_plainProxyRefused(self) -> Any:
        """A plain proxy (or CRIU's C proxy) cannot talk to a default cache."""
        m = self.m
        yield m.startCache()
        proxy, dump = m.startProxy("--plain-link")
        yield m.dump(dump, IMAGES)
        yield m.waitForLog("TLS: refused a connection from 127.0.0.1:", count=2)
        self.assertIn("does not speak TLS", m.lines("TLS: refused")[0])
        m.cacheUntouched()
        self.assertEqual(proxy.sessionsCompleted, 0)

    @inlineCallbacks
    def test_plainLinkMigrates(self) -> Any:
        """--plain-link on both ends: the link CRIU's C daemons speak, with a warning."""
        m = self.m
        yield m.startCache("--plain-link")
        assert m.cache is not None
        proxy, dump = m.startProxy("--plain-link")
        proxyDone = proxy.whenSessionDone()
        yield m.dump(dump, IMAGES)
        yield proxyDone
        self.assertEqual((yield m.restoreAll(list(IMAGES))), IMAGES)
        self.assertEqual(len(m.lines("--plain-link: the link is neither authenticated nor encrypted")), 2)

    @inlineCallbacks
    def test_keyedProxyPlainCache(self) -> Any:
        """A proxy with the key and a --plain-link cache: both say what is wrong."""
        m = self.m
        yield m.startCache("--plain-link")
        proxy, dump = m.startProxy()
        yield m.dump(dump, IMAGES)
        yield m.waitForLog("cannot reach the cache at", count=2)
        self.assertEqual(len(m.lines("the peer speaks TLS (a proxy with the link key, or --tls)")), 2)
        self.assertIn("is it plain: --plain-link or a C daemon?", m.lines("cannot reach the cache")[0])
        self.assertEqual(proxy.sessionsCompleted, 0)

    @inlineCallbacks
    def test_handshakeDeadline(self) -> Any:
        """A peer that connects and says nothing is dropped within the handshake deadline."""
        m = self.m
        yield m.startCache("--timeout", "0.5")
        sock = socket.create_connection(("127.0.0.1", m.port))
        self.addCleanup(sock.close)
        yield deferLater(reactor, 0.1, lambda: None)
        m.cacheUntouched()
        yield m.waitForLog("no TLS handshake within 0.5 s")
        self.assertEqual((yield inThread(hungUp, sock)), b"")
        m.cacheUntouched()

    @inlineCallbacks
    def test_pushWithTheKey(self) -> Any:
        """twisted-criu push reads the same key: a keyed cache takes its images."""
        import io

        from twisted_criu import cli

        m = self.m
        yield m.startCache()
        assert m.cache is not None
        delivered = waitForDelivery(m)
        dumpDir = tempfile.mkdtemp(dir=self.keys)
        for name, data in IMAGES.items():
            with open(os.path.join(dumpDir, name), "wb") as f:
                f.write(data)
        options = cli.PushOptions()
        options.parseOptions([dumpDir, "--address", "127.0.0.1", "--port", str(m.port), "--timeout", "10"])
        yield cli.push(reactor, options, io.StringIO())
        yield delivered
        self.assertEqual(len(m.lines("authenticated as CN=twisted-criu link key ")), 1)

    def test_pushNeedsTheKey(self) -> None:
        """push never generates a key: a missing one is a usage error naming the file."""
        from twisted_criu import cli

        missing = os.path.join(self.keys, "missing.key")
        options = cli.PushOptions()
        with self.assertRaises(usage.UsageError) as e:
            options.parseOptions([self.keys, "--address", "127.0.0.1", "--link-key", missing])
        self.assertIn(f"--link-key {missing}: no link key there", str(e.exception))
        self.assertFalse(os.path.exists(missing))


def waitForDelivery(m: TLSMigration) -> Any:
    from tests.helpers import waitFor

    return waitFor(lambda: bool(m.lines("delivered")), 15)


class OneLinkPerSessionTests(TestCase):
    """
    A second link naming a live session: its proxy reconnecting if the link
    is authenticated (it replaces the old one), refused if it is plain.
    """

    timeout = 30

    @inlineCallbacks
    def startCache(self, key: linkkey.LinkKey | None) -> Any:
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        from tests.helpers import socketDirectory
        from twisted_criu.daemons.cache import ImageCacheService
        from twisted_criu.twistd.options import unixEndpoint

        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        listen: Any = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        if key is not None:
            listen = TLSServerEndpoint(reactor, listen, key.serverCreator(), 5)
        directory = socketDirectory(self)
        self.cache = ImageCacheService(
            reactor, serverFromString(reactor, unixEndpoint(f"{directory}/img-cache.sock")), listen
        )
        self.cache.startService()
        self.addCleanup(self.cache.stopService)
        port = yield self.cache.remoteEndpoint.whenListening()
        self.port = port.getHost().port

    def connect(self, key: linkkey.LinkKey | None) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.addCleanup(sock.close)
        if key is None:
            return sock
        import ssl

        pem = os.path.join(self.mktemp())
        with open(pem, "wb") as f:
            f.write(key.certificate.dumpPEM())
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # a test client: the cache is the one checking
        context.load_cert_chain(pem)
        return context.wrap_socket(sock)

    def send(self, sock: socket.socket, name: str, data: bytes, session: str = "S") -> bytes:
        """Send one image (or the end of the dump if C{name} is empty); the cache's answer."""
        from twisted_criu import wire

        snapshot = "s" if name else ""
        header = wire.RemoteHeader(name, snapshot, 1, len(data), None, wire.LINK_EXTENSION_VERSION, session=session)
        try:
            sock.sendall(header.toBytes() + data)
            sock.settimeout(1)
            return sock.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        except (socket.timeout, TimeoutError):
            return b"(still open)"

    def logged(self, text: str) -> bool:
        from twisted.logger import formatEvent

        return any(text in formatEvent(e) for e in self.events)

    def images(self) -> list[str]:
        [session] = self.cache.sessions.values()
        return sorted(name for _, name in session.registry._images)

    @inlineCallbacks
    def test_plainSecondLinkRefused(self) -> Any:
        """On a plain link, a second link naming a live session gets nowhere."""
        yield self.startCache(None)
        first = self.connect(None)
        self.assertNotEqual((yield inThread(self.send, first, "a.img", b"A")), b"")
        second = self.connect(None)
        self.assertEqual((yield inThread(self.send, second, "inventory.img", b"FAKE")), b"")
        yield waitForLog(self, "refused a second link for session 1 from 127.0.0.1:")
        self.assertEqual(self.images(), ["a.img"])
        yield inThread(self.send, first, "", b"")  # the real proxy ends its dump
        yield waitFor(lambda: [s.state for s in self.cache.sessions.values()] == ["delivered"])
        self.assertEqual(self.images(), ["a.img"])

    @inlineCallbacks
    def test_authenticatedLinkReplacesTheOld(self) -> Any:
        """
        With the link key, a second link naming the session is its proxy
        reconnecting after a break the cache has not seen: it replaces the
        old link, which is closed.
        """
        key = linkkey.loadKey(os.path.join(self.mktemp() + ".key"), create=True)
        yield self.startCache(key)
        first = yield inThread(self.connect, key)
        self.assertNotEqual((yield inThread(self.send, first, "a.img", b"A")), b"")
        second = yield inThread(self.connect, key)
        yield inThread(self.send, second, "b.img", b"B")
        yield waitForLog(self, "session 1: its proxy linked again from 127.0.0.1:")

        def closed() -> bytes:
            first.settimeout(5)
            try:
                return first.recv(100)
            except (ConnectionResetError, OSError):
                return b""

        self.assertEqual((yield inThread(closed)), b"")
        yield inThread(self.send, second, "", b"")
        yield waitFor(lambda: [s.state for s in self.cache.sessions.values()] == ["delivered"])
        self.assertEqual(self.images(), ["a.img", "b.img"])

    @inlineCallbacks
    def test_otherKeyChangesNothing(self) -> Any:
        """A peer with another key cannot even reach the session to replace its link."""
        key = linkkey.loadKey(self.mktemp() + ".key", create=True)
        other = linkkey.loadKey(self.mktemp() + ".key", create=True)
        yield self.startCache(key)
        first = yield inThread(self.connect, key)
        self.assertNotEqual((yield inThread(self.send, first, "a.img", b"A")), b"")

        def impostor() -> bytes:
            import ssl

            try:
                return self.send(self.connect(other), "inventory.img", b"FAKE")
            except (ssl.SSLError, OSError):
                return b""

        self.assertEqual((yield inThread(impostor)), b"")
        yield waitForLog(self, "the proxy holds a different link key")
        self.assertEqual(self.images(), ["a.img"])
        self.assertFalse(self.logged("linked again"))
        yield inThread(self.send, first, "", b"")
        yield waitFor(lambda: [s.state for s in self.cache.sessions.values()] == ["delivered"])
        self.assertEqual(self.images(), ["a.img"])


def waitForLog(test: OneLinkPerSessionTests, text: str) -> Any:
    from tests.helpers import waitFor

    return waitFor(lambda: test.logged(text), 10)


class TamperingTests(TestCase):
    """A peer on the path that alters the link's bytes (it cannot read them)."""

    timeout = 60

    @inlineCallbacks
    def test_alteredByteBreaksTheLinkNotTheImage(self) -> Any:
        """
        One byte flipped in the middle of an image: the cache's TLS refuses
        the record, the link drops, no partial image is kept, and the proxy
        reconnects and sends again: the restore reads the real bytes.
        """
        from twisted.internet.endpoints import serverFromString
        from twisted.protocols import portforward

        m = TLSMigration(self)
        yield m.startCache()
        assert m.cache is not None
        flipped: list[int] = []

        class Flipping(portforward.ProxyServer):
            seen = 0

            def dataReceived(self, data: bytes) -> None:
                if not flipped and self.seen + len(data) > (1 << 20):
                    at = max(0, (1 << 20) - self.seen)
                    data = data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]
                    flipped.append(self.seen + at)
                self.seen += len(data)
                super().dataReceived(data)

        factory = portforward.ProxyFactory("127.0.0.1", m.port)
        factory.protocol = Flipping
        relay = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(relay.stopListening)
        cachePort, m.port = m.port, relay.getHost().port
        proxy, dump = m.startProxy()
        m.port = cachePort
        proxyDone = proxy.whenSessionDone()
        yield m.dump(dump, IMAGES)
        yield proxyDone
        self.assertEqual(len(flipped), 1)
        self.assertTrue(m.lines("link lost in the middle of snap1/pages-1.img"))
        got = yield m.restoreAll(list(IMAGES))
        self.assertEqual(got, IMAGES)
