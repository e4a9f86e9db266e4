# -*- test-case-name: tests.test_registry -*-
"""
The snapshot registry: which images a daemon holds, and who waits for one.

Images are addressed by L{ImageKey} C{(snapshot_id, name)}.  A write in
progress hides the previous version of its image: readers wait until the
write is published (criu appends to C{parent} and reads it back at once).
"""

from __future__ import annotations

from typing import Callable

from attrs import define
from zope.interface import implementer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from twisted_criu import wire
from twisted_criu.errors import ImageNotFound
from twisted_criu.interfaces import IImageStore, IImageWriter, ISnapshotRegistry, IStoredImage
from twisted_criu.keys import ImageKey


def readAll(image: IStoredImage) -> bytes:
    """The bytes of a (small) image; only for C{parent} and tests."""
    reader = image.open()
    try:
        parts = []
        while chunk := reader.read(1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        reader.close()


@define
class SessionSummary:
    """What one migration session moved."""

    images: int
    bytes: int
    snapshotIds: list[str]


@implementer(ISnapshotRegistry)
class SnapshotRegistry:
    """
    Images of one migration session, keyed by (snapshot_id, name).

    @ivar waitForMissing: if true (the cache), a read of an image that has
        not arrived waits until it arrives or the registry is closed; if
        false (the proxy), it fails at once unless a write of it is under way.
    """

    log = Logger()

    def __init__(self, waitForMissing: bool) -> None:
        self.waitForMissing = waitForMissing
        self.closed = False
        #: The session is over (L{release}): what is still published is dropped at once.
        self.released = False
        self._images: dict[ImageKey, IStoredImage] = {}
        self._writing: dict[ImageKey, int] = {}
        self._waiters: dict[ImageKey, list[Deferred[IStoredImage]]] = {}
        self._completion: list[Deferred[None]] = []
        self._publishObservers: list[Callable[[ImageKey, IStoredImage], None]] = []
        self._writeObservers: list[Callable[[ImageKey, IImageWriter], None]] = []
        self.publishOrder: list[ImageKey] = []

    # -- writers -----------------------------------------------------------

    def beginWrite(self, key: ImageKey, writer: IImageWriter | None = None) -> None:
        """
        A write of C{key} has started: readers of C{key} now wait.  A
        C{writer} given is shown to the L{onWriteStarted} observers (the
        proxy cuts images through while they are written).
        """
        self._writing[key] = self._writing.get(key, 0) + 1
        if writer is not None:
            for observer in list(self._writeObservers):
                observer(key, writer)

    def publish(self, key: ImageKey, image: IStoredImage) -> None:
        """A write of C{key} completed: C{image} replaces any older version."""
        self._endWrite(key)
        if self.released:  # a write that outlived its session holds nothing
            image.release()
            self._settle(key)
            return
        old = self._images.pop(key, None)
        if old is not None and old is not image:
            old.release()
        self._images[key] = image
        self.publishOrder.append(key)
        for observer in list(self._publishObservers):
            observer(key, image)
        self._settle(key)
        self._checkComplete()

    def publishAppend(self, key: ImageKey, tail: IStoredImage, store: IImageStore) -> None:
        """
        An append to C{key} completed: publish the version current I{now}
        followed by C{tail}, so that overlapping appends all land.  If the
        store cannot make that version (L{OSError}), the write ends without
        it and the error is raised.
        """
        base = self._images.get(key)
        if base is not None and not self.released:
            try:
                writer = store.newWriter(base)
                reader = tail.open()
                while chunk := reader.read(1 << 20):
                    writer.write(chunk)
                reader.close()
                merged = writer.commit()
            except OSError:  # the store failed (no descriptor left): the append is lost
                tail.release()
                self.abortWrite(key)
                raise
            tail.release()
            tail = merged
        self.publish(key, tail)

    def abortWrite(self, key: ImageKey) -> None:
        """A write of C{key} broke off; the previous version, if any, stays."""
        self._endWrite(key)
        self._settle(key)
        self._checkComplete()

    def _endWrite(self, key: ImageKey) -> None:
        count = self._writing.get(key, 0) - 1
        if count > 0:
            self._writing[key] = count
        else:
            self._writing.pop(key, None)

    @property
    def writesInProgress(self) -> int:
        return sum(self._writing.values())

    def onWriteStarted(self, observer: Callable[[ImageKey, IImageWriter], None]) -> None:
        """Call C{observer(key, writer)} for every plain write started with a writer."""
        self._writeObservers.append(observer)

    def onPublish(self, observer: Callable[[ImageKey, IStoredImage], None]) -> None:
        """Call C{observer(key, image)} for every image published from now on."""
        self._publishObservers.append(observer)

    # -- readers -----------------------------------------------------------

    def get(self, key: ImageKey) -> IStoredImage | None:
        """The complete image under C{key} now, if there is one."""
        return self._images.get(key)

    def keys(self) -> list[ImageKey]:
        return list(self._images)

    def whenAvailable(self, key: ImageKey) -> Deferred[IStoredImage]:
        """
        The image under C{key}, once no write of it is under way.

        Fails with L{ImageNotFound} when it cannot come any more.  The
        Deferred can be cancelled (the reader went away).
        """
        if key not in self._writing:
            image = self._images.get(key)
            if image is not None:
                return succeed(image)
            if self.closed or not self.waitForMissing:
                return fail(ImageNotFound(key))

        def cancel(d: Deferred[IStoredImage]) -> None:
            waiters = self._waiters.get(key, [])
            if d in waiters:
                waiters.remove(d)
            if not waiters:
                self._waiters.pop(key, None)

        d: Deferred[IStoredImage] = Deferred(cancel)
        self._waiters.setdefault(key, []).append(d)
        return d

    def _settle(self, key: ImageKey) -> None:
        """Answer the waiters of C{key} if its fate is now known."""
        if key in self._writing or key not in self._waiters:
            return
        image = self._images.get(key)
        if image is None and self.waitForMissing and not self.closed:
            return
        waiters = self._waiters.pop(key)
        for d in waiters:
            if image is not None:
                d.callback(image)
            else:
                d.errback(ImageNotFound(key))

    @property
    def waiting(self) -> int:
        """How many reads wait for an image."""
        return sum(len(ds) for ds in self._waiters.values())

    # -- the session -------------------------------------------------------

    def close(self) -> None:
        """No new images will come (writes under way may still complete)."""
        if self.closed:
            return
        self.closed = True
        for key in list(self._waiters):
            self._settle(key)
        self._checkComplete()

    def reopen(self) -> None:
        """More images will come after all (another dump joined the session)."""
        self.closed = False

    def whenComplete(self) -> Deferred[None]:
        """Fires once the registry is closed and no write is under way."""
        if self.closed and not self._writing:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._completion.append(d)
        return d

    def _checkComplete(self) -> None:
        if self.closed and not self._writing:
            waiting, self._completion = self._completion, []
            for d in waiting:
                d.callback(None)

    def snapshotIds(self) -> list[str]:
        """The ordered snapshot ids of C{parent} (either variant's key)."""
        for snapshotId in ("", wire.SEED_NULL_SNAPSHOT):
            image = self._images.get((snapshotId, wire.PARENT_IMAGE))
            if image is not None:
                return wire.decodeSnapshotIds(readAll(image))
        return []

    def release(self) -> None:
        """Drop every image (the session is over), and any published later."""
        self.released = True
        self.close()
        images, self._images = self._images, {}
        for image in images.values():
            image.release()

    def summary(self) -> SessionSummary:
        return SessionSummary(len(self._images), self.totalBytes, self.snapshotIds())

    @property
    def totalBytes(self) -> int:
        return sum(image.size for image in self._images.values())
