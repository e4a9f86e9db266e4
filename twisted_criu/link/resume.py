# -*- test-case-name: tests.test_resume -*-
"""
Resuming an image after a link break (link extension version 4), the
proxy's side.

The proxy remembers the images that were on their way (started, not
finished) when a link broke.  On the next connection, if the last cache
spoke version 4, it first asks where to resume: a SYNC marker with
sequence L{ASK_RESUME}, which a version-4 cache answers with one RESUME_AT
per image it kept in part, then a SYNCED of that sequence (and which
confirms nothing: commits use sequences from 1).  Until then nothing is
sent.  An image the cache kept N bytes of then goes from byte N, as
chunks (a header with C{offset=N}), if it is still the same version: the
stored image that was on its way, or the write criu is still making (or
has completed since).  Anything else goes from byte 0, as before.
"""

from __future__ import annotations

from typing import Any, Callable, Union

from attrs import define
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from zope.interface import alsoProvides, implementer

from twisted_criu import wire
from twisted_criu.errors import ImageSizeMismatch
from twisted_criu.interfaces import (
    IGrowableWriter,
    IGrowingImage,
    IImageReader,
    IKernelSource,
    ISendingLink,
    ISkippingReader,
    IStoredImage,
)
from twisted_criu.keys import ImageKey, describe

#: The sequence of the SYNC that asks where to resume (commits count from 1).
ASK_RESUME = 0


def skipBytes(reader: IImageReader, count: int) -> None:
    """Move C{reader} (not read from yet) on C{count} bytes, or raise L{ImageSizeMismatch}."""
    if ISkippingReader.providedBy(reader):
        skipped = reader.skip(count)
    else:
        skipped = 0
        while skipped < count and (chunk := reader.read(min(count - skipped, 1 << 20))):
            skipped += len(chunk)
    if skipped != count:
        raise ImageSizeMismatch(f"the image ended {count - skipped} bytes before byte {count}")


@implementer(IGrowingImage)
class ResumedImage:
    """
    The rest of an image from byte C{offset} on, as a growing image (for
    L{OutgoingGrowingImage<twisted_criu.flow.chunks.OutgoingGrowingImage>}):
    a stored image (complete), or the write criu is still making.
    """

    def __init__(
        self,
        reader: IImageReader,
        offset: int,
        growing: IGrowingImage | None = None,
        image: IStoredImage | None = None,
    ) -> None:
        self._reader = reader
        self.offset = offset
        self._growing = growing
        self._image = image
        self.onChange: Callable[[], None] = lambda: None
        if growing is not None:
            growing.onChange = lambda: self.onChange()
        if IKernelSource.providedBy(reader):
            alsoProvides(self, IKernelSource)
        skipBytes(reader, offset)

    @classmethod
    def ofStored(cls, image: IStoredImage, offset: int) -> ResumedImage:
        reader = image.open()
        try:
            return cls(reader, offset, image=image)
        except BaseException:
            reader.close()
            raise

    @classmethod
    def ofGrowing(cls, growing: IGrowingImage, offset: int) -> ResumedImage:
        return cls(growing, offset, growing=growing)

    @property
    def available(self) -> int:
        total = self._image.size if self._growing is None else self._growing.available  # type: ignore[union-attr]
        return max(0, total - self.offset)

    @property
    def complete(self) -> bool:
        return self._growing is None or bool(self._growing.complete)

    @property
    def aborted(self) -> bool:
        return self._growing is not None and bool(self._growing.aborted)

    @property
    def image(self) -> IStoredImage | None:
        return self._image if self._growing is None else self._growing.image

    def read(self, size: int) -> bytes:
        return self._reader.read(size)

    def whenReadable(self) -> Deferred[None] | None:
        return self._reader.whenReadable()  # type: ignore[attr-defined]

    def sendfile(self, out: int, count: int) -> int:
        return self._reader.sendfile(out, count)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._reader.close()


@define
class _Live:
    """A write criu was making when its image went out cut through."""

    writer: IGrowableWriter


Version = Union[IStoredImage, _Live]


class Resumption:
    """
    A proxy session's images that were on their way when a link broke,
    and where the cache says each may resume on the current connection.

    @param expectSynced: the session's C{expectSynced}.
    @param clock: times the wait for the cache's answer.
    @param timeout: seconds the cache may take to answer; then the link
        is dropped (and asked again on the next connection).
    """

    log = Logger()

    def __init__(
        self,
        expectSynced: Callable[[ISendingLink, int], Deferred[wire.LinkStatus]],
        clock: Any,
        timeout: float,
    ) -> None:
        self._expectSynced = expectSynced
        self._clock = clock
        self._timeout = timeout
        #: Images started and not finished, by key: the version on its way.
        self._unfinished: dict[ImageKey, Version] = {}
        #: The writers behind the growing views handed to the link.
        self._following: dict[int, tuple[IGrowingImage, IGrowableWriter]] = {}
        #: RESUME_AT offsets the cache gave on the current connection.
        self._points: dict[ImageKey, int] = {}

    # -- what the session and its link tell ------------------------------------

    def followed(self, growing: IGrowingImage, writer: IGrowableWriter) -> None:
        """C{growing} follows C{writer}: it may be cut through."""
        self._following[id(growing)] = (growing, writer)

    def forwarding(self, key: ImageKey, version: IStoredImage | IGrowingImage | None) -> None:
        """The link starts sending C{version} of C{key}, or (L{None}) is done with it."""
        if version is None:
            self._unfinished.pop(key, None)
            self._points.pop(key, None)
            return
        following = self._following.pop(id(version), None)
        if following is not None and following[0] is version:
            self._unfinished[key] = _Live(following[1])
        elif IStoredImage.providedBy(version):
            self._unfinished[key] = version

    def writeStarted(self, key: ImageKey, writer: IGrowableWriter) -> None:
        """A new write of C{key}: whatever of it was on its way is another version."""
        old = self._unfinished.get(key)
        if isinstance(old, _Live) and old.writer is not writer:
            del self._unfinished[key]

    def published(self, key: ImageKey, image: IStoredImage) -> None:
        """C{key}'s write completed as C{image}: if it was on its way, that is its version now."""
        old = self._unfinished.get(key)
        if isinstance(old, _Live) and not old.writer.writing:
            self._unfinished[key] = image

    def liveToResume(self) -> tuple[ImageKey, IGrowableWriter] | None:
        """A write criu still makes whose cut-through broke off, to send again (live)."""
        for key, version in self._unfinished.items():
            if isinstance(version, _Live) and version.writer.writing:
                return key, version.writer
        return None

    # -- the connection --------------------------------------------------------

    def linkUp(self, sender: ISendingLink, previous: ISendingLink | None) -> None:
        """
        A new connection: if the last one broke with images on their way to
        a version-4 cache, ask where they resume, and hold the link until
        the cache answers.
        """
        self._points = {}
        if not self._unfinished or previous is None or previous.peerVersion < 4:
            return
        self.log.info(
            "the link broke with {images} on its way: asking the cache where to resume",
            images=", ".join(describe(key) for key in self._unfinished),
        )
        synced = self._expectSynced(sender, ASK_RESUME)
        sender.sendMarker(wire.Marker.SYNC, ASK_RESUME)
        sender.held = True
        giveUp = self._clock.callLater(self._timeout, self._noAnswer, sender)

        def settled(result: Any) -> Any:
            if giveUp.active():
                giveUp.cancel()
            return result

        def answered(status: wire.LinkStatus) -> None:
            if not sender.lost:
                sender.held = False
                sender.offerLive()

        synced.addBoth(settled).addCallbacks(answered, lambda f: f.trap(CancelledError))
        sender.whenLost().addCallback(lambda _: synced.cancel())

    def _noAnswer(self, sender: ISendingLink) -> None:
        self.log.error(
            "the cache did not say where to resume within {seconds} s; dropping the link",
            seconds=self._timeout,
        )
        sender.abort()

    def resumeAt(self, status: wire.LinkStatus) -> None:
        """The cache kept C{status.size} bytes of an image."""
        self._points[(status.snapshotId, status.name)] = status.size

    def offsetFor(self, key: ImageKey, version: IStoredImage | IGrowingImage) -> int:
        """Where to send C{version} of C{key} from on this connection: the kept bytes, or 0."""
        offset = self._points.pop(key, 0)
        if not offset:
            return 0
        unfinished = self._unfinished.get(key)
        if isinstance(unfinished, _Live):
            following = self._following.get(id(version))
            same = following is not None and following[1] is unfinished.writer
            size = version.available if same else 0  # type: ignore[union-attr]
        else:
            same = unfinished is version
            size = version.size if same else 0  # type: ignore[union-attr]
        if not same or offset > size:
            self.log.info(
                "the cache kept {offset} bytes of {image}, not of the version to send:"
                " sending it from the start",
                offset=offset,
                image=describe(key),
            )
            return 0
        self.log.info(
            "resuming {image} at byte {offset}: the cache kept that much", image=describe(key), offset=offset
        )
        return offset
