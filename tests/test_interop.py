"""
Wire compatibility with CRIU's C image-proxy and image-cache.

The C daemons (criu-dev 664bd7a26) cannot be built here, so their link
behaviour is played by blocking peers that follow remote-images.md to the
letter: the C cache reads a frame with exactly two read() calls and fails on
a short read; the C proxy writes a frame in one write() and the body in
4 KiB writes.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from twisted_criu import wire
from twisted_criu.daemons.proxy import ImageProxyService
from twisted_criu.testing.criu import LocalImageClient
from twisted_criu.twistd.options import unixEndpoint

from .helpers import Migration


class ShortRead(Exception):
    pass


def cStyleCache(server: socket.socket) -> dict[tuple[str, str], bytes]:
    """Accept one proxy and read its images exactly as the C cache does."""
    conn, _ = server.accept()
    conn.settimeout(20)
    images: dict[tuple[str, str], bytes] = {}
    with conn:
        while True:
            prefix = conn.recv(4)  # read(fd, &len, 4)
            if not prefix:
                return images
            if len(prefix) != 4:
                raise ShortRead(f"length prefix: {len(prefix)} bytes")
            (length,) = wire.U32.unpack(prefix)
            payload = conn.recv(length)  # read(fd, buf, len)
            if len(payload) != length:
                raise ShortRead(f"header: {len(payload)} of {length} bytes")
            header = wire.RemoteHeader.fromBytes(payload)
            body = bytearray()
            while len(body) < header.size:
                chunk = conn.recv(min(4096, header.size - len(body)))
                if not chunk:
                    raise ShortRead("EOF inside an image")
                body += chunk
            images[(header.snapshotId, header.name)] = bytes(body)


def cStyleProxy(port: int, images: list[tuple[str, str, int, bytes]]) -> None:
    """Send images to a cache the way the C proxy does."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        for snapshotId, name, mode, data in images:
            conn.sendall(wire.RemoteHeader(name, snapshotId, mode, len(data)).toBytes())
            for offset in range(0, len(data), 4096):
                conn.sendall(data[offset : offset + 4096])


class OurProxyToCCacheTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_imagesArriveWhole(self) -> Any:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(20)
        self.addCleanup(server.close)
        port = server.getsockname()[1]
        src = os.path.join(self.mktemp(), "src")
        os.makedirs(src)
        proxy = ImageProxyService(
            reactor,
            serverFromString(reactor, unixEndpoint(os.path.join(src, "img-proxy.sock"))),
            clientFromString(reactor, f"tcp:host=127.0.0.1:port={port}"),
        )
        proxy.startService()
        self.addCleanup(proxy.stopService)
        received = deferToThread(cStyleCache, server)
        client = LocalImageClient(os.path.join(src, "img-proxy.sock"), timeout=20)
        images = {f"core-{i}.img": os.urandom(i * 1000 + 1) for i in range(30)}
        images["pages-1.img"] = os.urandom(4 << 20)

        def dump() -> None:
            client.pushSnapshotId("snap1")
            for name, data in images.items():
                client.write("snap1", name, data)
            client.finishDump()

        yield deferToThread(dump)
        got = yield received
        self.assertEqual(got.pop(("", "parent")), wire.encodeSnapshotId("snap1"))
        self.assertEqual(got, {("snap1", n): d for n, d in images.items()})


class CProxyToOurCacheTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_cacheServesWhatTheCProxySent(self) -> Any:
        m = Migration(self)
        port = yield m.startCache()
        pages = os.urandom(3 << 20)
        sent = [
            ("", "parent", wire.O_APPEND, wire.encodeSnapshotId("snap1")),
            ("snap1", "pages-1.img", wire.O_WRONLY, pages),
            ("snap1", "inventory.img", wire.O_WRONLY, b"inventory"),
        ]
        yield deferToThread(cStyleProxy, port.getHost().port, sent)

        def restore() -> tuple[Any, ...]:
            result = (
                m.restore.snapshotIds(),
                m.restore.read("snap1", "pages-1.img"),
                m.restore.read("snap1", "inventory.img"),
                m.restore.read("snap1", "memfd.img"),
            )
            m.restore.finishRestore()
            return result

        self.assertEqual(
            (yield deferToThread(restore)), (["snap1"], pages, b"inventory", None)
        )
