"""
Mutual TLS on the proxy -> cache link (C{--tls} and friends).

The CA and certificates are made at test time with C{cryptography}.  The
daemons are built from their twistd C{Options} and C{makeService}, so the
option parsing is part of every test; criu is played by the blocking client
in threads; everything binds loopback.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import tempfile
from typing import Any, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.application.service import IService
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.helpers import inThread, waitFor
from twisted_criu.daemons.cache import ImageCacheService
from twisted_criu.daemons.proxy import ImageProxyService
from twisted_criu.link import tls
from twisted_criu.testing.criu import LocalImageClient
from twisted_criu.twistd import cache_tap, proxy_tap
from twisted_criu.twistd.options import unixEndpoint

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _name(commonName: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])


class CertificateAuthority:
    """A CA that writes PEM files into C{directory}."""

    def __init__(self, directory: str, commonName: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(commonName)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = self._write(f"{commonName}-ca.pem", self._pem(self.certificate))

    @staticmethod
    def _pem(certificate: x509.Certificate) -> bytes:
        return certificate.public_bytes(serialization.Encoding.PEM)

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name.replace(" ", "_"))
        with open(path, "wb") as f:
            f.write(data)
        return path

    def issue(
        self,
        commonName: str,
        names: Sequence[str] = (),
        expired: bool = False,
        passphrase: bytes | None = None,
    ) -> tuple[str, str]:
        """A certificate (with C{names} as subjectAltName) and its key: their paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(commonName))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - 3 * DAY)
            .not_valid_after(NOW - DAY if expired else NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n)
                        for n in names
                    ]
                ),
                critical=False,
            )
        certificate = builder.sign(self.key, hashes.SHA256())
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        keyPem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        return (
            self._write(f"{commonName}-cert.pem", self._pem(certificate)),
            self._write(f"{commonName}-key.pem", keyPem),
        )


class PKI:
    """The CA both daemons trust, their certificates, and some bad ones."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.ca = CertificateAuthority(directory, "Test CA")
        self.otherCA = CertificateAuthority(directory, "Other CA")
        # The proxy dials "localhost" by default (--address).
        self.cache = self.ca.issue("cache", ["localhost", "cache.example"])
        self.cacheByIP = self.ca.issue("cache by IP", ["127.0.0.1"])
        self.wrongName = self.ca.issue("somewhere else", ["wrong.example"])
        self.proxy = self.ca.issue("proxy")
        self.foreignProxy = self.otherCA.issue("foreign proxy")
        self.foreignCache = self.otherCA.issue("foreign cache", ["localhost"])

    def args(self, pair: tuple[str, str], cacert: str | None = None) -> list[str]:
        cert, key = pair
        return ["--tls", "--tls-cacert", cacert or self.ca.path, "--tls-cert", cert, "--tls-key", key]


def hungUp(sock: socket.socket) -> bytes:
    """What the peer sends before it closes C{sock} (within 5 s): a reset counts as a plain EOF."""
    sock.settimeout(5)
    try:
        return sock.recv(100)
    except ConnectionResetError:
        return b""


def logged(events: Sequence[dict[str, Any]], text: str) -> list[str]:
    """The formatted log lines that contain C{text}."""
    return [line for line in map(formatEvent, events) if text in line]


class TLSMigration:
    """Daemons built from their twistd options, and criu clients."""

    def __init__(self, test: TestCase) -> None:
        self.test = test
        self.base = tempfile.mkdtemp(prefix="tls-")  # AF_UNIX paths must stay short
        test.addCleanup(shutil.rmtree, self.base, True)
        self.pki = PKI(self.base)
        self.dst = self._directory("dst")
        self.restore = LocalImageClient(os.path.join(self.dst, "img-cache.sock"), timeout=20)
        self.cache: ImageCacheService | None = None
        self.port = 0
        self.events = EventLoggingObserver.createWithCleanup(test, globalLogPublisher)

    def _directory(self, name: str) -> str:
        path = os.path.join(self.base, name)
        os.makedirs(path)
        return path

    def _start(self, service: IService) -> None:
        service.startService()
        self.test.addCleanup(service.stopService)

    @inlineCallbacks
    def startCache(self, *args: str) -> Any:
        options = cache_tap.Options()
        options.parseOptions(
            ["-D", self.dst, "--listen", "tcp:0:interface=127.0.0.1", "--memory-limit", "64M", *args]
        )
        cache = cache_tap.makeService(options)
        assert isinstance(cache, ImageCacheService)
        self.cache = cache
        self._start(cache)
        port = yield cache.remoteEndpoint.whenListening()
        self.port = port.getHost().port

    def startProxy(self, *args: str, name: str = "src") -> tuple[ImageProxyService, LocalImageClient]:
        """A proxy (its own -D) dialling the cache; C{args} come last."""
        directory = self._directory(name)
        options = proxy_tap.Options()
        options.parseOptions(
            ["-D", directory, "--port", str(self.port), "--max-retry-delay", "0.1",
             "--memory-limit", "64M", *args]
        )
        proxy = proxy_tap.makeService(options)
        assert isinstance(proxy, ImageProxyService)
        self._start(proxy)
        return proxy, LocalImageClient(os.path.join(directory, "img-proxy.sock"), timeout=20)

    def startRawProxy(self, endpoint: Any) -> tuple[ImageProxyService, LocalImageClient]:
        """A proxy built by hand around C{endpoint}."""
        directory = self._directory("raw")
        proxy = ImageProxyService(
            reactor,
            serverFromString(reactor, unixEndpoint(os.path.join(directory, "img-proxy.sock"))),
            endpoint,
            retryPolicy=lambda attempt: 0.1,
            streamLocal=None,
        )
        self._start(proxy)
        return proxy, LocalImageClient(os.path.join(directory, "img-proxy.sock"), timeout=20)

    def dump(self, client: LocalImageClient, images: dict[str, bytes]) -> Deferred[None]:
        def dump() -> None:
            client.pushSnapshotId("snap1")
            for name, data in images.items():
                client.write("snap1", name, data)
            client.finishDump()

        return inThread(dump)

    def restoreAll(self, names: Sequence[str]) -> Deferred[dict[str, bytes | None]]:
        def restore() -> dict[str, bytes | None]:
            got = {name: self.restore.read("snap1", name) for name in names}
            self.restore.finishRestore()
            return got

        return inThread(restore)

    def lines(self, text: str) -> list[str]:
        return logged(self.events, text)

    def waitForLog(self, text: str, count: int = 1, timeout: float = 15) -> Deferred[None]:
        return waitFor(lambda: len(self.lines(text)) >= count, timeout)

    def cacheUntouched(self) -> None:
        """No image, no link, no session change: the refused peer got nowhere."""
        cache = self.cache
        assert cache is not None
        self.test.assertEqual(cache.sessions, {})
        self.test.assertFalse(cache.proxiesLinked)
        self.test.assertEqual(self.lines("proxy connected from"), [])
        self.test.assertEqual(self.lines("received "), [])


IMAGES = {"pages-1.img": os.urandom(2 << 20), "core-1.img": b"core", "empty.img": b""}


class MutualTLSTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.m = TLSMigration(self)

    @inlineCallbacks
    def _migrate(self, proxyArgs: Sequence[str], cacheArgs: Sequence[str]) -> Any:
        m = self.m
        yield m.startCache(*cacheArgs)
        assert m.cache is not None
        cacheDone = m.cache.whenSessionDone()
        proxy, dump = m.startProxy(*proxyArgs)
        proxyDone = proxy.whenSessionDone()
        yield m.dump(dump, IMAGES)
        sent = yield proxyDone
        self.assertEqual(sent.images, 4)  # and parent
        got = yield m.restoreAll(list(IMAGES))
        self.assertEqual(got, IMAGES)
        received = yield cacheDone
        self.assertEqual(received.images, 4)

    @inlineCallbacks
    def test_migration(self) -> Any:
        """
        A whole migration over mutual TLS: the cache authenticates the proxy,
        the proxy checks the cache's certificate and its name ("localhost",
        the default --address); and the proxy's EOF still ends the session
        (a TLS close_notify).
        """
        pki = self.m.pki
        yield self._migrate(pki.args(pki.proxy), pki.args(pki.cache))
        self.assertEqual(len(self.m.lines("authenticated as CN=proxy")), 1)
        self.assertEqual(len(self.m.lines("TLS: the cache at tcp:host=localhost:")), 1)
        self.assertEqual(self.m.lines("refused"), [])

    @inlineCallbacks
    def test_cutThroughOverTLS(self) -> Any:
        """
        An image cut through over TLS (chunks written through the TLS
        transport, not sendfile): the restore gets it whole.
        """
        m = self.m
        pki = m.pki
        yield m.startCache(*pki.args(pki.cache))
        proxy, dump = m.startProxy(*pki.args(pki.proxy), "--compress=none")
        yield inThread(dump.pushSnapshotId, "snap1")
        yield m.waitForLog("the cache speaks twisted-criu's link extension (version 4)")
        data = os.urandom((3 << 20) + 5)

        def write() -> None:
            writer = dump.openWrite("snap1", "pages-1.img")
            for start in range(0, len(data), 1 << 18):
                writer.write(data[start : start + (1 << 18)])
            writer.close()
            dump.finishDump()

        yield inThread(write)
        yield proxy.whenSessionDone()
        self.assertEqual(len(m.lines(f"forwarded snap1/pages-1.img ({len(data)} bytes, cut through)")), 1)
        self.assertEqual((yield m.restoreAll(["pages-1.img"])), {"pages-1.img": data})

    @inlineCallbacks
    def test_compressedCutThroughOverTLS(self) -> Any:
        """With --compress zstd, an image cut through over TLS goes compressed and arrives whole."""
        m = self.m
        pki = m.pki
        yield m.startCache(*pki.args(pki.cache))
        proxy, dump = m.startProxy(*pki.args(pki.proxy), "--compress=zstd")
        yield inThread(dump.pushSnapshotId, "snap1")
        yield m.waitForLog("the cache speaks twisted-criu's link extension (version 4)")
        data = b"".join(b"record %08d: state=active\n" % i for i in range(150000))

        def write() -> None:
            writer = dump.openWrite("snap1", "pages-1.img")
            for start in range(0, len(data), 1 << 18):
                writer.write(data[start : start + (1 << 18)])
            writer.close()
            dump.finishDump()

        yield inThread(write)
        yield proxy.whenSessionDone()
        [line] = m.lines(f"forwarded snap1/pages-1.img ({len(data)} bytes, ")
        self.assertIn(", zstd on 100% of it, cut through)", line)
        self.assertEqual((yield m.restoreAll(["pages-1.img"])), {"pages-1.img": data})

    @inlineCallbacks
    def test_nameFromConnect(self) -> Any:
        """With --connect, the name checked is its host: here an IP address."""
        m = self.m
        pki = m.pki
        yield m.startCache(*pki.args(pki.cacheByIP))
        assert m.cache is not None
        proxyArgs = [*pki.args(pki.proxy), "--connect", f"tcp:host=127.0.0.1:port={m.port}"]
        cacheDone = m.cache.whenSessionDone()
        proxy, dump = m.startProxy(*proxyArgs)
        yield m.dump(dump, {"core-1.img": b"core"})
        yield proxy.whenSessionDone()
        self.assertEqual((yield m.restoreAll(["core-1.img"])), {"core-1.img": b"core"})
        yield cacheDone

    @inlineCallbacks
    def test_proxyFromAnotherCA(self) -> Any:
        """
        A proxy whose certificate another CA signed is refused by the cache,
        every time it retries; nothing it sends arrives, and the cache keeps
        serving a proxy with a good certificate.
        """
        m = self.m
        pki = m.pki
        yield m.startCache(*pki.args(pki.cache))
        # It trusts the cache (right CA), but its own certificate is foreign.
        foreign, dump = m.startProxy(*pki.args(pki.foreignProxy, cacert=pki.ca.path))
        yield m.dump(dump, IMAGES)
        yield m.waitForLog("TLS: refused a connection from 127.0.0.1:", count=2)
        refusal = m.lines("TLS: refused a connection")[0]
        self.assertIn("certificate verify failed", refusal)
        self.assertIn("unable to get local issuer certificate", refusal)
        self.assertIn("CN=foreign proxy", refusal)
        self.assertIn("issued by CN=Other CA", refusal)
        m.cacheUntouched()
        self.assertEqual(foreign.sessionsCompleted, 0)
        # The proxy says why too (TLS 1.3: after its side of the handshake).
        yield m.waitForLog("tlsv1 alert unknown ca")
        yield foreign.stopService()

        proxy, dump = m.startProxy(*pki.args(pki.proxy), name="good")
        yield m.dump(dump, {"core-1.img": b"core"})
        yield proxy.whenSessionDone()
        self.assertEqual((yield m.restoreAll(["core-1.img"])), {"core-1.img": b"core"})

    @inlineCallbacks
    def test_proxyWithoutCertificate(self) -> Any:
        """A proxy that presents no certificate at all is refused."""
        m = self.m
        pki = m.pki
        yield m.startCache(*pki.args(pki.cache))
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(open(pki.ca.path, "rb").read())])
        endpoint = tls.TLSClientEndpoint(
            reactor,
            clientFromString(reactor, f"tcp:host=127.0.0.1:port={m.port}"),
            ssl.optionsForClientTLS("localhost", trust),  # no clientCertificate
            description="test",
        )
        _, dump = m.startRawProxy(endpoint)
        yield m.dump(dump, IMAGES)
        yield m.waitForLog("TLS: refused a connection from 127.0.0.1:", count=2)
        self.assertIn("peer did not return a certificate", m.lines("TLS: refused")[0])
        m.cacheUntouched()
        self.assertGreaterEqual(endpoint.rejections, 1)

    @inlineCallbacks
    def test_plainProxyRefused(self) -> Any:
        """A proxy with --plain-link (or one of CRIU's C daemons) gets nowhere."""
        m = self.m
        pki = m.pki
        yield m.startCache(*pki.args(pki.cache))
        proxy, dump = m.startProxy("--plain-link")
        yield m.dump(dump, IMAGES)
        yield m.waitForLog("TLS: refused a connection from 127.0.0.1:", count=2)
        self.assertIn("does not speak TLS", m.lines("TLS: refused")[0])
        m.cacheUntouched()
        self.assertEqual(proxy.sessionsCompleted, 0)

    @inlineCallbacks
    def test_wrongNameRefused(self) -> Any:
        """The proxy refuses a cache whose certificate is for another name."""
        m = self.m
        pki = m.pki
        yield m.startCache(*pki.args(pki.wrongName))
        proxy, dump = m.startProxy(*pki.args(pki.proxy))
        yield m.dump(dump, IMAGES)
        yield m.waitForLog("cannot reach the cache at tcp:host=localhost:", count=2)
        line = m.lines("cannot reach the cache")[0]
        self.assertIn("TLS handshake failed: its certificate is not for localhost", line)
        self.assertIn("DNS:wrong.example", line)
        m.cacheUntouched()
        self.assertEqual(proxy.sessionsCompleted, 0)

    @inlineCallbacks
    def test_wrongNameWithNoCNVerify(self) -> Any:
        """--tls-no-cn-verify accepts the same cache."""
        pki = self.m.pki
        yield self._migrate([*pki.args(pki.proxy), "--tls-no-cn-verify"], pki.args(pki.wrongName))

    @inlineCallbacks
    def test_noCNVerifyStillChecksTheCA(self) -> Any:
        """--tls-no-cn-verify skips the name only: a foreign cache is refused."""
        m = self.m
        pki = m.pki
        yield m.startCache(*pki.args(pki.foreignCache, cacert=pki.ca.path))
        proxy, dump = m.startProxy(*pki.args(pki.proxy), "--tls-no-cn-verify")
        yield m.dump(dump, IMAGES)
        yield m.waitForLog("cannot reach the cache at", count=2)
        line = m.lines("cannot reach the cache")[0]
        self.assertIn("certificate verify failed", line)
        self.assertIn("CN=foreign cache", line)
        m.cacheUntouched()
        self.assertEqual(proxy.sessionsCompleted, 0)

    @inlineCallbacks
    def test_silentPeer(self) -> Any:
        """
        A connection that never completes a handshake never reaches the link
        protocol (so it cannot disturb a session), and is dropped after
        --timeout.
        """
        m = self.m
        pki = m.pki
        yield m.startCache(*pki.args(pki.cache), "--timeout", "0.5")
        sock = socket.create_connection(("127.0.0.1", m.port))
        self.addCleanup(sock.close)
        yield deferLater(reactor, 0.2, lambda: None)
        m.cacheUntouched()
        yield m.waitForLog("no TLS handshake within 0.5 s")
        # (in a thread: the reactor must run to close the connection)
        self.assertEqual((yield inThread(hungUp, sock)), b"")
        self.assertEqual(len(m.lines("TLS: refused")), 1)
        m.cacheUntouched()


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        self.pki = PKI(self.directory)

    def proxy(self, *args: str) -> proxy_tap.Options:
        options = proxy_tap.Options()
        options.parseOptions(["-D", self.directory, *args])
        return options

    def cache(self, *args: str) -> cache_tap.Options:
        options = cache_tap.Options()
        options.parseOptions(["-D", self.directory, *args])
        return options

    def usageError(self, *args: str, side: str = "proxy") -> str:
        with self.assertRaises(usage.UsageError) as e:
            (self.proxy if side == "proxy" else self.cache)(*args)
        return str(e.exception)

    def test_noCertificatesByDefault(self) -> None:
        """Without --tls no certificate file is read (the link key secures the link)."""
        for options in (self.proxy(), self.cache()):
            self.assertFalse(options["tls"])
            self.assertIsNone(options["tls-credentials"])

    def test_tlsFlags(self) -> None:
        """The page server's flag names; the credentials are loaded."""
        options = self.proxy(*self.pki.args(self.pki.proxy))
        self.assertTrue(options["tls"])
        credentials = options["tls-credentials"]
        self.assertIsInstance(credentials, tls.TLSCredentials)
        self.assertEqual(credentials.certificate.getSubject().commonName, b"proxy")
        self.assertEqual(options["tls-hostname"], "localhost")

    def test_endpointsAreWrapped(self) -> None:
        proxy = proxy_tap.makeService(self.proxy(*self.pki.args(self.pki.proxy)))
        self.assertIsInstance(proxy._cache._endpoint, tls.TLSClientEndpoint)  # type: ignore[attr-defined]
        cache = cache_tap.makeService(self.cache(*self.pki.args(self.pki.cache)))
        self.assertIsInstance(cache.remoteEndpoint._endpoint, tls.TLSServerEndpoint)  # type: ignore[attr-defined]

    def test_hostname(self) -> None:
        """The name checked: --address, or the host of --connect."""
        args = self.pki.args(self.pki.proxy)
        self.assertEqual(self.proxy(*args, "--address", "dst.example")["tls-hostname"], "dst.example")
        cases = {
            "tcp:host=cache.example:port=9996": "cache.example",
            "tcp:cache.example:9996": "cache.example",
            "tcp:host=10.0.0.2:port=9996:timeout=5": "10.0.0.2",
            "unix:/run/criu-tunnel.sock": "fallback.example",
        }
        for connect, name in cases.items():
            options = self.proxy(*args, "--address", "fallback.example", "--connect", connect)
            self.assertEqual(options["tls-hostname"], name, connect)
        self.assertIsNone(self.proxy(*args, "--tls-no-cn-verify")["tls-hostname"])

    def test_tlsOptionWithoutTLS(self) -> None:
        """Certificates without --tls would silently mean a plain link."""
        for args in (["--tls-cert", "x.pem"], ["--tls-cacert", "x"], ["--tls-no-cn-verify"]):
            for side in ("proxy", "cache"):
                self.assertIn("needs --tls", self.usageError(*args, side=side))

    def test_missingFile(self) -> None:
        args = self.pki.args(self.pki.proxy)
        args[args.index("--tls-key") + 1] = "/nonexistent/key.pem"
        self.assertEqual(
            self.usageError(*args),
            "--tls-key /nonexistent/key.pem: cannot read it: No such file or directory",
        )

    def test_unreadableFile(self) -> None:
        args = self.pki.args(self.pki.proxy)
        args[args.index("--tls-cacert") + 1] = self.directory
        self.assertIn("cannot read it: Is a directory", self.usageError(*args))

    def test_criuDefaults(self) -> None:
        """--tls alone uses CRIU's paths, and says so when they are missing."""
        if os.path.exists(tls.DEFAULT_CACERT):
            self.skipTest(f"{tls.DEFAULT_CACERT} exists here")
        self.assertEqual(
            self.usageError("--tls", side="cache"),
            f"--tls-cacert {tls.DEFAULT_CACERT}: cannot read it: No such file or directory"
            " (CRIU's default path; give --tls-cacert FILE)",
        )

    def test_notACertificate(self) -> None:
        garbage = os.path.join(self.directory, "garbage.pem")
        with open(garbage, "w") as f:
            f.write("hello\n")
        args = self.pki.args(self.pki.proxy, cacert=garbage)
        self.assertIn("no PEM certificate in it", self.usageError(*args))
        with open(garbage, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n")
        self.assertIn("not a valid certificate", self.usageError(*args))

    def test_keyNotACertificate(self) -> None:
        cert, _ = self.pki.proxy
        self.assertIn("not a PEM private key", self.usageError(*self.pki.args((cert, cert))))

    def test_keyMismatch(self) -> None:
        cert, _ = self.pki.proxy
        _, otherKey = self.pki.cache
        self.assertIn("is not the key of --tls-cert", self.usageError(*self.pki.args((cert, otherKey))))

    def test_encryptedKey(self) -> None:
        """A passphrase would need a prompt: refused, rather than hanging on one."""
        pair = self.pki.ca.issue("locked", passphrase=b"secret")
        self.assertIn("the key is encrypted", self.usageError(*self.pki.args(pair)))

    def test_expiredCertificate(self) -> None:
        pair = self.pki.ca.issue("old", expired=True)
        self.assertIn("expired on", self.usageError(*self.pki.args(pair)))

    def test_caBundle(self) -> None:
        """--tls-cacert may hold several CAs: all are trusted."""
        bundle = os.path.join(self.directory, "bundle.pem")
        with open(bundle, "wb") as f:
            for path in (self.pki.otherCA.path, self.pki.ca.path):
                with open(path, "rb") as ca:
                    f.write(ca.read())
        options = self.proxy(*self.pki.args(self.pki.proxy, cacert=bundle))
        names = [a.getSubject().commonName for a in options["tls-credentials"].authorities]
        self.assertEqual(names, [b"Other CA", b"Test CA"])

    def test_noTLSInsideTLS(self) -> None:
        """--tls wraps the endpoint itself; an ssl:/tls: one would be TLS twice."""
        args = self.pki.args(self.pki.proxy)
        for connect in ("tls:cache.example:9996", "ssl:host=cache.example:port=9996"):
            self.assertIn("plain stream endpoint", self.usageError(*args, "--connect", connect))
        cacheArgs = self.pki.args(self.pki.cache)
        self.assertIn(
            "plain stream endpoint",
            self.usageError(*cacheArgs, "--listen", "ssl:9996:privateKey=k.pem", side="cache"),
        )
        # Without --tls, they are the user's business, as before.
        self.assertEqual(self.proxy("--connect", "tls:h:1")["connect"], "tls:h:1")


class BackoffTests(SynchronousTestCase):
    def test_rejectionsBackOff(self) -> None:
        """
        A link the cache drops after our side of the handshake (TLS 1.3
        client-certificate refusal) looks like a success to ClientService,
        which resets its attempt count: the policy backs off over those too.
        """
        endpoint = tls.TLSClientEndpoint(reactor, None, None)  # type: ignore[arg-type]
        policy = endpoint.backoff(lambda attempt: float(attempt))
        self.assertEqual(policy(1), 1.0)
        endpoint.rejections = 3
        self.assertEqual(policy(1), 4.0)


class PushTLSTests(TestCase):
    """twisted-criu push speaks the same mutual TLS as the proxy."""

    timeout = 60

    @inlineCallbacks
    def test_pushOverTLS(self) -> Any:
        import io

        from twisted_criu import cli

        m = TLSMigration(self)
        pki = m.pki
        yield m.startCache(*pki.args(pki.cache))
        dump = m._directory("dump")
        for name, data in IMAGES.items():
            with open(os.path.join(dump, name), "wb") as f:
                f.write(data)
        options = cli.PushOptions()
        options.parseOptions(
            [dump, "--address", "localhost", "--port", str(m.port), "--snapshot-id", "snap1",
             *pki.args(pki.proxy)]
        )
        out = io.StringIO()
        yield cli.push(reactor, options, out)
        self.assertIn("confirmed by the cache", out.getvalue())
        self.assertEqual((yield m.restoreAll(list(IMAGES))), IMAGES)
        self.assertTrue(m.lines("TLS: proxy at 127.0.0.1:"))

        # A certificate from another CA gets nowhere, and says why.
        options = cli.PushOptions()
        options.parseOptions(
            [dump, "--address", "localhost", "--port", str(m.port), "--timeout", "1",
             *pki.args(pki.foreignProxy)]
        )
        with self.assertRaises(cli.CommandError):
            yield cli.push(reactor, options, io.StringIO())

    def test_badCertificateIsAUsageError(self) -> None:
        from twisted_criu import cli

        directory = self.mktemp()
        os.makedirs(directory)
        options = cli.PushOptions()
        with self.assertRaises(usage.UsageError) as e:
            options.parseOptions([directory, "--address", "h", "--tls", "--tls-cacert", "/nonexistent"])
        self.assertIn("--tls-cacert /nonexistent: cannot read it", str(e.exception))
