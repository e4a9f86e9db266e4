# -*- test-case-name: tests.test_resume,tests.test_resume_proxy -*-
"""
Resuming after a link break (link extension version 4), the proxy's side.

The proxy remembers the images that were on their way (started, not
finished) when a link broke, and the images it handed over whole.  On
the next connection, if the last cache spoke version 4, it first asks
where its images resume: a RESUME marker (with the session's next sync
sequence), which a version-4 cache answers with one RESUME_AT per image
it kept in part and one (C{images=1}) per image it holds whole, then a
SYNCED of that sequence; it confirms nothing.  Until then nothing is
sent.

An image the cache kept N bytes of then goes from byte N, as chunks (a
header with C{offset=N}), if it is still the same version: the stored
image that was on its way, the write criu is still making (or has
completed since), or the one version of it that went out in this session
(the link took all of it, but not all of it reached the cache).  An image the cache holds whole is not sent at all if
the proxy is certain it is exactly its version: only one version of it
ever went out in this session, that version went out completely, it is
still the current one, and the sizes agree.  Anything else goes from
byte 0, as before.
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
from twisted_criu.progress import formatBytes

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


@define
class _Sent:
    """The one version of an image that went out in a session, and whether all of it did."""

    version: Version
    whole: bool = False


def _sameVersion(a: Version, b: Version) -> bool:
    return a is b or (isinstance(a, _Live) and isinstance(b, _Live) and a.writer is b.writer)


class Resumption:
    """
    A proxy session's images that were on their way when a link broke,
    the one version of each image that went out, and what the cache says
    of them on the current connection: where each resumes, which it holds
    whole.

    @param expectSynced: the session's C{expectSynced}.
    @param nextSequence: the session's next sync sequence, for a RESUME.
    @param imageFor: the session's current version of an image.
    @param clock: times the wait for the cache's answer.
    @param timeout: seconds the cache may take to answer; then the link
        is dropped (and asked again on the next connection).
    """

    log = Logger()

    def __init__(
        self,
        expectSynced: Callable[[ISendingLink, int], Deferred[wire.LinkStatus]],
        nextSequence: Callable[[], int],
        imageFor: Callable[[ImageKey], IStoredImage | None],
        clock: Any,
        timeout: float,
    ) -> None:
        self._expectSynced = expectSynced
        self._nextSequence = nextSequence
        self._imageFor = imageFor
        self._clock = clock
        self._timeout = timeout
        #: Images started and not finished, by key: the version on its way.
        self._unfinished: dict[ImageKey, Version] = {}
        #: The writers behind the growing views handed to the link.
        self._following: dict[int, tuple[IGrowingImage, IGrowableWriter]] = {}
        #: RESUME_AT offsets the cache gave on the current connection.
        self._points: dict[ImageKey, int] = {}
        #: Per image, the one version that went out in this session
        #: (L{None}: more than one did, or one not known).
        self._sent: dict[ImageKey, _Sent | None] = {}
        #: Sizes of the images the cache said it holds whole, on this connection.
        self._whole: dict[ImageKey, int] = {}
        #: The images not to send on this connection: the cache holds exactly them.
        self._skip: dict[ImageKey, IStoredImage] = {}
        #: What the link is sending, as it was handed to it.
        self._going: dict[ImageKey, IStoredImage | IGrowingImage] = {}

    # -- what the session and its link tell ------------------------------------

    def followed(self, growing: IGrowingImage, writer: IGrowableWriter) -> None:
        """C{growing} follows C{writer}: it may be cut through."""
        self._following[id(growing)] = (growing, writer)

    def forwarding(self, key: ImageKey, version: IStoredImage | IGrowingImage | None) -> None:
        """The link starts sending C{version} of C{key}, or (L{None}) is done with it."""
        if version is None:
            self._unfinished.pop(key, None)
            self._points.pop(key, None)
            self._handedOver(key, self._going.pop(key, None))
            return
        self._going[key] = version
        following = self._following.pop(id(version), None)
        going: Version | None = None
        if following is not None and following[0] is version:
            going = _Live(following[1])
        elif IStoredImage.providedBy(version):
            going = version
        if going is not None:
            self._unfinished[key] = going
        if key not in self._sent:
            self._sent[key] = None if going is None else _Sent(going)
        elif (sent := self._sent[key]) is not None and (going is None or not _sameVersion(sent.version, going)):
            self._sent[key] = None  # which one the cache holds is not known

    def _handedOver(self, key: ImageKey, version: IStoredImage | IGrowingImage | None) -> None:
        """The link is done with C{version} of C{key}: all of it went out, unless criu's write broke off."""
        sent = self._sent.get(key)
        if sent is None or version is None:
            return
        if IStoredImage.providedBy(version):
            sent.whole = True
        elif version.complete and version.image is not None:
            sent.version = version.image
            sent.whole = True

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
        sent = self._sent.get(key)
        if sent is not None and isinstance(sent.version, _Live) and not sent.version.writer.writing:
            sent.version = image

    def liveToResume(self) -> tuple[ImageKey, IGrowableWriter] | None:
        """A write criu still makes whose cut-through broke off, to send again (live)."""
        for key, version in self._unfinished.items():
            if isinstance(version, _Live) and version.writer.writing:
                return key, version.writer
        return None

    # -- the connection --------------------------------------------------------

    def linkUp(self, sender: ISendingLink, previous: ISendingLink | None) -> None:
        """
        A new connection: if the last one was to a version-4 cache and
        broke with images on their way, or after images went out whole, ask
        where they resume (a RESUME marker), and hold the link until the
        cache answers.
        """
        self._points, self._whole, self._skip, self._going = {}, {}, {}, {}
        if previous is None or previous.peerVersion < 4:
            return
        if self._unfinished:
            self.log.info(
                "the link broke with {images} on its way: asking the cache where to resume",
                images=", ".join(describe(key) for key in self._unfinished),
            )
        elif any(sent is not None and sent.whole for sent in self._sent.values()):
            self.log.info("the link broke: asking the cache which images of this session it holds")
        else:
            return
        sequence = self._nextSequence()
        synced = self._expectSynced(sender, sequence)
        sender.sendMarker(wire.Marker.RESUME, sequence)
        sender.held = True
        giveUp = self._clock.callLater(self._timeout, self._noAnswer, sender)

        def settled(result: Any) -> Any:
            if giveUp.active():
                giveUp.cancel()
            return result

        def answered(status: wire.LinkStatus) -> None:
            if not sender.lost:
                self._decideSkips()
                sender.held = False
                sender.offerLive()

        synced.addBoth(settled).addCallbacks(answered, lambda f: f.trap(CancelledError))
        sender.whenLost().addCallback(lambda _: synced.cancel())

    def _decideSkips(self) -> None:
        """The cache answered: which images it holds whole are exactly the versions to send."""
        for key, size in self._whole.items():
            sent, image = self._sent.get(key), self._imageFor(key)
            if image is None or sent is None or not sent.whole:
                continue
            if sent.version is image and image.size == size:
                self._skip[key] = image
        if self._skip:
            self.log.info(
                "the cache holds {images} images ({size}) of this session whole: not sent again",
                images=len(self._skip),
                size=formatBytes(sum(image.size for image in self._skip.values())),
            )

    def skips(self, key: ImageKey, image: IStoredImage) -> bool:
        """Is C{image}, the current version of C{key}, held whole by the cache of this connection?"""
        return self._skip.get(key) is image

    def _noAnswer(self, sender: ISendingLink) -> None:
        self.log.error(
            "the cache did not say where to resume within {seconds} s; dropping the link",
            seconds=self._timeout,
        )
        sender.abort()

    def resumeAt(self, status: wire.LinkStatus) -> None:
        """The cache kept C{status.size} bytes of an image, or (C{images=1}) holds it whole."""
        key = (status.snapshotId, status.name)
        if status.images:
            self._whole[key] = status.size
        else:
            self._points[key] = status.size

    def offsetFor(self, key: ImageKey, version: IStoredImage | IGrowingImage) -> int:
        """Where to send C{version} of C{key} from on this connection: the kept bytes, or 0."""
        offset = self._points.pop(key, 0)
        if not offset:
            return 0
        unfinished = self._unfinished.get(key)
        if unfinished is None and (sent := self._sent.get(key)) is not None and sent.whole:
            # All of it went into the socket, not all of it reached the cache.
            unfinished = sent.version
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
