"""Test helpers: a fake daemon for the local protocol, a selectable pump."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.criu.images import ReadVariant, readsInline
from twisted_criu.interfaces import (
    IGrowingImage,
    IImageStore,
    ILinkSource,
    ILocalImageService,
    IStoredImage,
)
from twisted_criu.keys import ImageKey
from twisted_criu.progress import Activity
from twisted_criu.registry import SnapshotRegistry
from twisted_criu.storage.memory import MemoryStore


@implementer(ILocalImageService)
class FakeLocalService:
    """One registry, a memory store, and a reactor whose fds we pump by hand."""

    clientTimeout = 30.0

    def __init__(self, waitForMissing: bool = True) -> None:
        self.reactor = MemoryReactorClock()
        self.activity = Activity(self.reactor)
        self.store = MemoryStore()
        self.registry = SnapshotRegistry(waitForMissing)
        self.finishes: list[wire.LocalRequest] = []

    def registryFor(self, request: wire.LocalRequest) -> SnapshotRegistry:
        return self.registry

    def finishRequested(self, request: wire.LocalRequest) -> None:
        self.finishes.append(request)
        self.registry.close()

    def readsInline(self, request: wire.LocalRequest) -> bool:
        return readsInline(ReadVariant.AUTO, request, False)


def storedImage(store: IImageStore, data: bytes) -> IStoredImage:
    """An image of C{data}, written into C{store} in one piece and committed."""
    writer = store.newWriter()
    writer.write(data)
    return writer.commit()


def pump(reactor: MemoryReactor, drain: int | None = None, sink: list[bytes] | None = None) -> None:
    """
    Run the reactor's readers and writers until nothing moves, as a real
    reactor would.  If C{drain} is a pipe's read end, whatever the writers
    put in it is read into C{sink} as we go (so pipes never fill up).
    """
    for _ in range(100000):
        moved = False
        for selectable in list(reactor.readers) + list(reactor.writers):
            isReader = selectable in reactor.readers
            counter = "bytesRead" if isReader else "bytesWritten"
            before = getattr(selectable, counter, 0)
            why = selectable.doRead() if isReader else selectable.doWrite()
            if why is not None:
                reactor.removeReader(selectable)
                reactor.removeWriter(selectable)
                selectable.connectionLost(Failure(why))
                moved = True
            elif getattr(selectable, counter, 0) != before:
                moved = True
        if drain is not None and sink is not None:
            try:
                data = os.read(drain, 1 << 20)
            except BlockingIOError:
                data = b""
            if data:
                sink.append(data)
                moved = True
        if not moved:
            return
    raise AssertionError("pump did not settle")


def driveProducer(transport: Any) -> None:
    """Pull every chunk from a pull producer registered on a StringTransport."""
    for _ in range(100000):
        if transport.producer is None:
            return
        transport.producer.resumeProducing()
    raise AssertionError("producer never finished")


def isClosed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def socketDirectory(test: SynchronousTestCase) -> str:
    """A fresh, short directory for UNIX sockets (sun_path holds 107 bytes).

    Not under trial's C{_trial_temp}: a clone at a deep path (as CI's is)
    would push the daemons' sockets past the limit.
    """
    directory = tempfile.mkdtemp(prefix="tc-")
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


@implementer(ILinkSource)
class FakeLinkSource:
    """
    What a L{RemoteSender} forwards: C{images} by key (C{image}, if given,
    under every key); the connections made and the statuses received.
    """

    def __init__(self, image: IStoredImage | None = None) -> None:
        self.image = image
        self.images: dict[ImageKey, IStoredImage] = {}
        self.connected: list[Any] = []
        self.statuses: list[wire.LinkStatus] = []

    def linkUp(self, sender: Any) -> None:
        self.connected.append(sender)

    def imageFor(self, key: ImageKey) -> IStoredImage | None:
        return self.image if self.image is not None else self.images.get(key)

    def digestFor(self, key: ImageKey, image: IStoredImage) -> tuple[bool, bytes | None]:
        return True, None

    def nextLive(self) -> tuple[ImageKey, IGrowingImage] | None:
        return None

    def statusReceived(self, sender: Any, status: wire.LinkStatus) -> None:
        self.statuses.append(status)
