"""
C{--allow-from}: only the listed peers may open a link to the cache; the
others are closed before anything is read (and before any TLS handshake).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_criu import wire
from twisted_criu.daemons.cache import ImageCacheService
from twisted_criu.link.allow import AddressFilter, PeerCheck, PeerCheckingEndpoint, parseNetworks
from twisted_criu.link.localpeers import LocalOwnerCheck, socketOwner
from twisted_criu.twistd import cache_tap
from twisted_criu.twistd.options import unixEndpoint

from .helpers import inThread, socketDirectory, waitFor


class AddressFilterTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(
            parseNetworks("10.0.0.2, 192.168.1.7/24,::1"),
            [
                ipaddress.ip_network("10.0.0.2/32"),
                ipaddress.ip_network("192.168.1.0/24"),
                ipaddress.ip_network("::1/128"),
            ],
        )
        for bad in ("", "host.example", "10.0.0.300", ","):
            self.assertRaises(ValueError, parseNetworks, bad)

    def test_allows(self) -> None:
        allowed = AddressFilter(parseNetworks("10.0.0.0/24,::1"))
        self.assertTrue(allowed.allows(IPv4Address("TCP", "10.0.0.9", 1)))
        self.assertFalse(allowed.allows(IPv4Address("TCP", "10.0.1.9", 1)))
        self.assertTrue(allowed.allows(IPv6Address("TCP", "::1", 1)))
        self.assertTrue(allowed.allows(IPv6Address("TCP", "::ffff:10.0.0.3", 1)))  # v4-mapped
        self.assertFalse(allowed.allows(IPv6Address("TCP", "::2", 1)))
        self.assertFalse(allowed.allows(object()))  # a UNIX peer has no IP

    def test_option(self) -> None:
        options = cache_tap.Options()
        options.parseOptions(["--local", "unix:x", "--allow-from", "10.0.0.1,10.0.2.0/24"])
        self.assertEqual(options["allow-from"].describe(), "10.0.0.1/32, 10.0.2.0/24")
        with self.assertRaises(usage.UsageError) as e:
            cache_tap.Options().parseOptions(["--local", "unix:x", "--allow-from", "dst.example"])
        self.assertIn("--allow-from: not an address or network: 'dst.example'", str(e.exception))
        default = cache_tap.Options()
        default.parseOptions(["--local", "unix:x"])
        self.assertIsNone(default["allow-from"])  # anyone, as before


class AllowFromEndpointTests(TestCase):
    """A cache listening through L{AllowFromEndpoint} on loopback."""

    timeout = 30

    @inlineCallbacks
    def startCache(self, allowed: str | None = None, owners: bool = False) -> Any:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        directory = socketDirectory(self)
        checks: list[PeerCheck] = []
        if allowed is not None:
            checks.append(AddressFilter(parseNetworks(allowed)))
        if owners:
            checks.append(LocalOwnerCheck())
        listen = PeerCheckingEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), checks)
        self.cache = ImageCacheService(
            reactor, serverFromString(reactor, unixEndpoint(f"{directory}/img-cache.sock")), listen
        )
        self.cache.startService()
        self.addCleanup(self.cache.stopService)
        port = yield self.cache.remoteEndpoint.whenListening()
        self.port = port.getHost().port

    def send(self) -> bytes:
        """Connect from 127.0.0.1, send an image, and read until the cache closes (or 2 s pass)."""
        header = wire.RemoteHeader("a.img", "s", 1, 1, None, wire.LINK_EXTENSION_VERSION, session="t")
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as c:
            try:
                c.sendall(header.toBytes() + b"a")
                return c.recv(100)
            except (ConnectionResetError, BrokenPipeError):
                return b""
            except socket.timeout:
                return b"(still open)"

    @inlineCallbacks
    def test_refused(self) -> Any:
        yield self.startCache("127.0.0.2")
        self.assertEqual((yield inThread(self.send)), b"")
        yield waitFor(
            lambda: any(
                "refused a link from 127.0.0.1:" in e["log_format"].format(**e)
                and "not in --allow-from (127.0.0.2/32)"
                in e["log_format"].format(**e)
                for e in self.events
                if e.get("log_format")
            )
        )
        self.assertEqual(self.cache.sessions, {})
        self.assertFalse(self.cache.proxiesLinked)

    @inlineCallbacks
    def test_allowed(self) -> Any:
        yield self.startCache("127.0.0.0/8")
        answer = yield inThread(self.send)
        hello = wire.LinkStatus(wire.LinkStatusKind.HELLO, wire.LINK_EXTENSION_VERSION).toBytes()
        self.assertEqual(answer, hello)
        self.assertEqual([s.state for s in self.cache.sessions.values()], ["dumping"])

    def logged(self, text: str) -> bool:
        return any(text in e["log_format"].format(**e) for e in self.events if e.get("log_format"))

    @inlineCallbacks
    def test_localUserRefused(self) -> Any:
        """
        The attack of issue 15: an unprivileged local user connects to the
        cache's port and sends an image.  Its connection is closed before
        anything is read; root's proxy still gets in.
        """
        yield self.startCache(owners=True)
        attacker = (
            "import socket, sys\n"
            "c = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)\n"
            "c.sendall(bytes.fromhex(sys.argv[2]))\n"
            "try:\n"
            "    print(repr(c.recv(100)))\n"
            "except ConnectionResetError:\n"
            "    print(repr(b''))\n"
        )
        header = wire.RemoteHeader("core-1.img", "", 1, 8, None, wire.LINK_EXTENSION_VERSION, session="evil")

        def attack() -> str:
            result = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                 sys.executable, "-c", attacker, str(self.port), (header.toBytes() + b"EVILBYTE").hex()],
                capture_output=True, timeout=20,
            )
            return result.stdout.decode().strip() + result.stderr.decode()

        self.assertEqual((yield inThread(attack)), "b''")
        yield waitFor(lambda: self.logged("a loopback peer of uid 65534, not of uid 0"))
        self.assertEqual(self.cache.sessions, {})
        answer = yield inThread(self.send)  # root: the proxy's user
        hello = wire.LinkStatus(wire.LinkStatusKind.HELLO, wire.LINK_EXTENSION_VERSION).toBytes()
        self.assertEqual(answer, hello)


class SocketOwnerTests(SynchronousTestCase):
    def test_table(self) -> None:
        table = self.mktemp()
        with open(table, "w") as f:
            f.write("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n")
            f.write("   0: 0100007F:EE18 0100007F:8F71 01 00000000:00000000 00:00000000 00000000 65534        0 4711 1\n")
            f.write("   1: 0100007F:8F71 0100007F:EE18 01 00000000:00000000 00:00000000 00000000     0        0 4712 1\n")
        self.assertEqual(socketOwner("127.0.0.1", 0xEE18, [table]), 65534)
        self.assertEqual(socketOwner("127.0.0.1", 0x8F71, [table]), 0)
        self.assertEqual(socketOwner("::ffff:127.0.0.1", 0xEE18, [table]), 65534)
        self.assertIsNone(socketOwner("127.0.0.1", 1, [table]))
        check = LocalOwnerCheck({0}, [table])
        self.assertIsNone(check.refusal(IPv4Address("TCP", "127.0.0.1", 0x8F71)))
        self.assertIn("uid 65534", check.refusal(IPv4Address("TCP", "127.0.0.1", 0xEE18)) or "")
        self.assertIsNone(check.refusal(IPv4Address("TCP", "10.0.0.1", 0xEE18)))  # not loopback: other checks

    def test_closedSocketsHaveNoOwner(self) -> None:
        """
        The kernel lists a closed socket (TIME_WAIT, or orphaned by close())
        as uid 0, inode 0, whoever opened it: a local user who sends and
        closes before the check, or whose port also has a TIME_WAIT socket
        listed first, must not pass as root.  A peer at one of this host's
        other addresses is local too.
        """
        table = self.mktemp()
        with open(table, "w") as f:
            f.write("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n")
            # 127.0.0.1:60952 in TIME_WAIT (to another port), then live and nobody's
            f.write("   0: 0100007F:EE18 0100007F:3039 06 00000000:00000000 03:00001766 00000000     0        0 0 3\n")
            f.write("   1: 0100007F:EE18 0100007F:8F71 01 00000000:00000000 00:00000000 00000000 65534        0 4711 1\n")
            # 127.0.0.1:43690 closed after sending (FIN_WAIT2, orphaned)
            f.write("   2: 0100007F:AAAA 0100007F:8F71 05 00000000:00000000 03:00001766 00000000     0        0 0 3\n")
            # 10.0.0.2:48059, one of this host's addresses, nobody's
            f.write("   3: 0200000A:BBBB 0200000A:8F71 01 00000000:00000000 00:00000000 00000000 65534        0 4713 1\n")
        check = LocalOwnerCheck({0}, [table])
        self.assertEqual(socketOwner("127.0.0.1", 0xEE18, [table]), 65534)
        self.assertIn("a loopback peer of uid 65534", check.refusal(IPv4Address("TCP", "127.0.0.1", 0xEE18)) or "")
        self.assertIsNone(socketOwner("127.0.0.1", 0xAAAA, [table]))
        self.assertIn("already closed", check.refusal(IPv4Address("TCP", "127.0.0.1", 0xAAAA)) or "")
        self.assertIn("a local peer of uid 65534", check.refusal(IPv4Address("TCP", "10.0.0.2", 0xBBBB)) or "")
        self.assertIsNone(check.refusal(IPv4Address("TCP", "10.0.0.3", 0xBBBB)))  # remote: other checks

    def test_realSocket(self) -> None:
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = socket.create_connection(server.getsockname())
        self.addCleanup(client.close)
        host, port = client.getsockname()
        self.assertEqual(socketOwner(host, port), os.geteuid())
