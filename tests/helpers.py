"""
Test-private helpers: short socket directories, the link's frames, and an
in-process migration (L{Migration}: both daemons on loopback, criu played
in threads).  The fakes (FakeLocalService, FakeSink, FakeLinkSource,
storedImage, pump, driveProducer) are public: L{twisted_criu.testing.fakes}.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_criu import wire
from twisted_criu.daemons.cache import ImageCacheService
from twisted_criu.daemons.proxy import ImageProxyService
from twisted_criu.testing.criu import LocalImageClient
from twisted_criu.testing.fakes import FakeLinkSource
from twisted_criu.twistd.options import unixEndpoint


def isClosed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@contextmanager
def descriptorsExhausted() -> Iterator[Callable[[], None]]:
    """
    While the block runs, this process has no descriptor left (every new
    one fails with EMFILE), as a daemon at its RLIMIT_NOFILE: the soft
    limit is lowered a little above what is open, and the rest is filled.
    Keep the block short and do not open files in it; after closing one,
    call what the block gets to fill its place again.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    spare = os.open(os.devnull, os.O_RDONLY)
    held = [spare]

    def fill() -> None:
        while True:
            try:
                held.append(os.dup(spare))
            except OSError as e:
                if e.errno != errno.EMFILE:
                    raise
                return

    try:
        limit = len(os.listdir("/proc/self/fd")) + 32
        if soft != resource.RLIM_INFINITY:
            limit = min(soft, limit)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        fill()
        yield fill
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def socketDirectory(test: SynchronousTestCase) -> str:
    """A fresh, short directory for UNIX sockets (sun_path holds 107 bytes).

    Not under trial's C{_trial_temp}: a clone at a deep path (as CI's is)
    would push the daemons' sockets past the limit.
    """
    directory = tempfile.mkdtemp(prefix="tc-")
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


def linkFrames(
    *images: tuple[str, bytes],
    snapshotId: str = "snap1",
    linkVersion: int | None = None,
    session: str | None = None,
) -> bytes:
    """The link's frames for C{images}: a header, then the bytes, each."""
    out = b""
    for name, data in images:
        header = wire.RemoteHeader(name, snapshotId, 1, len(data), None, linkVersion, session=session)
        out += header.toBytes() + data
    return out


def proxyFrames(
    *images: tuple[str, bytes], snapshotId: str = "snap1", session: str = FakeLinkSource.sessionToken
) -> bytes:
    """What a twisted-criu proxy sends: headers carry the link version and its session's token."""
    return linkFrames(
        *images, snapshotId=snapshotId, linkVersion=wire.LINK_EXTENSION_VERSION, session=session
    )


def marker(kind: wire.Marker | None = None, session: str = FakeLinkSource.sessionToken, sequence: int = 0) -> bytes:
    """A proxy's marker frame: the end of a dump (C{kind} L{None}), SYNC or ABORT."""
    return wire.RemoteHeader(
        "", "", 0, 0, None, wire.LINK_EXTENSION_VERSION, session=session, marker=kind, sequence=sequence
    ).toBytes()


# -- an in-process migration: both daemons on loopback, criu in threads ------

T = TypeVar("T")


class Migration:
    """A cache and a proxy wired together, plus clients playing criu."""

    def __init__(self, test: TestCase) -> None:
        base = tempfile.mkdtemp(prefix="tc-")  # AF_UNIX paths must stay short
        test.addCleanup(shutil.rmtree, base, True)
        self.src = os.path.join(base, "src")
        self.dst = os.path.join(base, "dst")
        os.makedirs(self.src)
        os.makedirs(self.dst)
        self.test = test
        self.cache: ImageCacheService | None = None
        self.proxy: ImageProxyService | None = None
        self.dump = LocalImageClient(os.path.join(self.src, "img-proxy.sock"), timeout=20)
        self.restore = LocalImageClient(os.path.join(self.dst, "img-cache.sock"), timeout=20)
        self.captureSocket = os.path.join(self.src, "streamer-capture.sock")
        self.serveSocket = os.path.join(self.dst, "streamer-serve.sock")

    def startCache(self, port: int = 0, **kwargs: Any) -> Deferred[Any]:
        self.cache = ImageCacheService(
            reactor,
            serverFromString(reactor, unixEndpoint(os.path.join(self.dst, "img-cache.sock"))),
            serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1"),
            streamLocal=serverFromString(reactor, unixEndpoint(self.serveSocket)),
            **kwargs,
        )
        self.cache.startService()
        self.test.addCleanup(self.cache.stopService)
        return self.cache.remoteEndpoint.whenListening()

    def startCacheWith(self, **kwargs: Any) -> Deferred[Any]:
        return self.startCache(0, **kwargs)

    def startProxy(self, port: int, **kwargs: Any) -> None:
        self.proxy = ImageProxyService(
            reactor,
            serverFromString(reactor, unixEndpoint(os.path.join(self.src, "img-proxy.sock"))),
            clientFromString(reactor, f"tcp:host=127.0.0.1:port={port}"),
            retryPolicy=lambda attempt: 0.05,
            streamLocal=serverFromString(reactor, unixEndpoint(self.captureSocket)),
            **kwargs,
        )
        self.proxy.startService()
        self.test.addCleanup(self.proxy.stopService)

    @inlineCallbacks
    def start(self, **proxyArgs: Any) -> Any:
        port = yield self.startCache()
        self.startProxy(port.getHost().port, **proxyArgs)


def inThread(f: Callable[..., T], *args: Any) -> Deferred[T]:
    return deferToThread(f, *args)


@inlineCallbacks
def waitFor(condition: Callable[[], bool], timeout: float = 10) -> Any:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        yield deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition never became true")


class MigrationCase(TestCase):
    """A test with a proxy and a cache linked on loopback (C{self.m}), started before each test."""

    timeout = 60

    def proxyArgs(self) -> dict[str, Any]:
        """Keyword arguments for the proxy's service."""
        return {}

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.m = Migration(self)
        yield self.m.start(**self.proxyArgs())
