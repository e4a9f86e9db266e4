# -*- test-case-name: tests.test_fakes -*-
"""
Fakes for testing code that embeds twisted-criu, without sockets, threads
or a running reactor.

  - L{FakeLocalService}: an L{ICaptureService} and L{IRestoreService} (what a
    L{twisted_criu.criu.images.LocalImageProtocol} serves criu for) with one
    registry, a memory store and a L{MemoryReactorClock}; L{pump} runs the
    pipes the protocol registers with that reactor.
  - L{FakeSink}: an L{IRemoteImageSink} (what a
    L{twisted_criu.link.receiver.RemoteReceiver} delivers the link's images
    to) on a L{Clock}, counting the dumps and links it saw.
  - L{storedImage}: an L{IStoredImage} of given bytes.
  - L{driveProducer}: runs a pull producer registered on a
    L{StringTransport<twisted.internet.testing.StringTransport>} to its end.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.criu.variants import ReadVariant, readsInline
from twisted_criu.daemons.partials import RESUME_GRACE, KeptParts, heldWhole
from twisted_criu.interfaces import (
    IGrowingImage,
    ICaptureService,
    IImageStore,
    IImageWriter,
    ILinkSource,
    IRestoreService,
    IReceivingLink,
    IRemoteImageSink,
    ISendingLink,
    IStoredImage,
)
from twisted_criu.keys import ImageKey
from twisted_criu.progress import Activity
from twisted_criu.registry import SnapshotRegistry
from twisted_criu.storage.memory import MemoryStore


@implementer(ICaptureService, IRestoreService)
class FakeLocalService:
    """
    One registry, a memory store, and a reactor whose descriptors are
    pumped by hand (L{pump}).

    @ivar finishes: the FINISH requests criu sent, in order; each also
        closes the registry.  The end of a C{--stream} dump or restore
        counts as one (an empty name and snapshot id).
    @ivar captureFailures: why C{--stream} dumps failed.
    @ivar restoresEnded: for each C{--stream} restore that ended, whether
        every file was served whole.
    """

    clientTimeout = 30.0

    def __init__(self, waitForMissing: bool = True) -> None:
        """
        @param waitForMissing: reads of images not there yet wait for them
            (as in a cache) rather than failing at once.
        """
        self.reactor = MemoryReactorClock()
        self.activity = Activity(self.reactor)
        self.store = MemoryStore()
        self.registry = SnapshotRegistry(waitForMissing)
        self.finishes: list[wire.LocalRequest] = []
        self.captureFailures: list[str] = []
        self.restoresEnded: list[bool] = []

    def registryFor(self, request: wire.LocalRequest) -> SnapshotRegistry:
        return self.registry

    def finishRequested(self, request: wire.LocalRequest) -> None:
        self.finishes.append(request)
        self.registry.close()

    def captureFailed(self, why: str) -> None:
        self.captureFailures.append(why)

    def streamRestoreEnded(self, complete: bool) -> None:
        self.restoresEnded.append(complete)
        if complete:
            self.finishRequested(wire.LocalRequest("", "", wire.O_RDONLY))

    def readsInline(self, request: wire.LocalRequest) -> bool:
        return readsInline(ReadVariant.AUTO, request, False)


@implementer(IRemoteImageSink)
class FakeSink:
    """
    The cache's side of a link: one registry for every dump, a memory
    store, and a L{Clock} for the link's timeouts.

    @ivar closed: for each link that closed, whether it closed cleanly.
    @ivar tokens: the session tokens images arrived for, in order (no repeats).
    @ivar dumpsEnded: how many dumps the links ended.
    @ivar aborted: the tokens the links aborted.
    @ivar lost: the tokens whose images could not be stored, and why.
    @ivar refuse: tokens whose images are discarded.
    """

    linkTimeout = 10.0

    def __init__(self) -> None:
        self.reactor = Clock()
        self.activity = Activity(self.reactor)
        self.store = MemoryStore()
        self.registry = SnapshotRegistry(waitForMissing=True)
        self.closed: list[bool] = []
        self.dumpsEnded = 0
        self.tokens: list[str | None] = []
        self.aborted: list[str | None] = []
        self.lost: list[tuple[str | None, str]] = []
        self.refuse: set[str | None] = set()
        #: Images whose link broke, kept by session token (C{"None"}: no token).
        self.partials = KeptParts(self.reactor, RESUME_GRACE)

    def linkOpened(self, receiver: IReceivingLink) -> None:
        pass

    def linkClosed(self, receiver: IReceivingLink, clean: bool) -> None:
        self.closed.append(clean)

    def imageArriving(self, receiver: IReceivingLink, token: str | None) -> SnapshotRegistry | None:
        if not self.tokens or self.tokens[-1] != token:
            self.tokens.append(token)
        return None if token in self.refuse else self.registry

    def dumpEnded(self, receiver: IReceivingLink, token: str | None) -> None:
        self.dumpsEnded += 1

    def syncRequested(self, receiver: IReceivingLink, token: str | None, sequence: int) -> wire.LinkStatus:
        summary = self.registry.summary()
        return wire.LinkStatus(
            wire.LinkStatusKind.SYNCED, images=summary.images, size=summary.bytes, sequence=sequence
        )

    def abortRequested(self, receiver: IReceivingLink, token: str | None) -> None:
        self.aborted.append(token)

    def imageLost(self, receiver: IReceivingLink, token: str | None, why: str) -> None:
        self.lost.append((token, why))

    def keepPartial(self, receiver: IReceivingLink, header: wire.RemoteHeader, writer: IImageWriter) -> bool:
        return self.partials.keep(str(header.session), (header.snapshotId, header.name), writer)

    def resumeWriter(self, receiver: IReceivingLink, header: wire.RemoteHeader) -> IImageWriter | None:
        return self.partials.take(str(header.session), (header.snapshotId, header.name), header.offset)

    def keptStatuses(self, receiver: IReceivingLink, token: str | None) -> list[wire.LinkStatus]:
        return self.partials.statuses(str(token)) + heldWhole(self.registry)


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

    @raise AssertionError: if it has not settled after 100000 rounds.
    """
    for _ in range(100000):
        moved = False
        selectables: list[Any] = [*reactor.readers, *reactor.writers]
        for selectable in selectables:
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
    """
    Pull every chunk from a pull producer registered on a
    L{StringTransport<twisted.internet.testing.StringTransport>}, until it
    unregisters.

    @raise AssertionError: if it has not finished after 100000 chunks.
    """
    for _ in range(100000):
        if transport.producer is None:
            return
        transport.producer.resumeProducing()
    raise AssertionError("producer never finished")


@implementer(ILinkSource)
class FakeLinkSource:
    """
    What a L{RemoteSender} forwards: C{images} by key (C{image}, if given,
    under every key); the connections made and the statuses received.
    """

    sessionToken = "fake-session"

    def __init__(self, image: IStoredImage | None = None) -> None:
        self.image = image
        self.images: dict[ImageKey, IStoredImage] = {}
        self.connected: list[Any] = []
        self.statuses: list[wire.LinkStatus] = []
        #: Images that could not be opened to forward them, and why.
        self.unforwarded: list[tuple[ImageKey, str]] = []
        #: Where images resume (the cache kept their first bytes), by key; taken once.
        self.offsets: dict[ImageKey, int] = {}
        #: What the link said it forwards (L{None}: done with the key), in order.
        self.forwards: list[tuple[ImageKey, IStoredImage | IGrowingImage | None]] = []

    def linkUp(self, sender: ISendingLink) -> None:
        self.connected.append(sender)

    def imageFor(self, key: ImageKey) -> IStoredImage | None:
        return self.image if self.image is not None else self.images.get(key)

    def digestFor(self, key: ImageKey, image: IStoredImage) -> tuple[bool, bytes | None]:
        return True, None

    def nextLive(self) -> tuple[ImageKey, IGrowingImage] | None:
        return None

    def statusReceived(self, sender: ISendingLink, status: wire.LinkStatus) -> None:
        self.statuses.append(status)

    def forwardFailed(self, key: ImageKey, why: str) -> None:
        self.unforwarded.append((key, why))

    def resumeOffset(self, key: ImageKey, version: IStoredImage | IGrowingImage) -> int:
        return self.offsets.pop(key, 0)

    def forwarding(self, key: ImageKey, version: IStoredImage | IGrowingImage | None) -> None:
        self.forwards.append((key, version))
