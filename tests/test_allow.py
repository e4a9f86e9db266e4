"""
C{--allow-from}: only the listed peers may open a link to the cache; the
others are closed before anything is read (and before any TLS handshake).
"""

from __future__ import annotations

import ipaddress
import socket
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
from twisted_criu.link.allow import AddressFilter, AllowFromEndpoint, parseNetworks
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
    def startCache(self, allowed: str) -> Any:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        directory = socketDirectory(self)
        listen = AllowFromEndpoint(
            serverFromString(reactor, "tcp:0:interface=127.0.0.1"), AddressFilter(parseNetworks(allowed))
        )
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
                "refused a link from 127.0.0.1: not in --allow-from (127.0.0.2/32)"
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
