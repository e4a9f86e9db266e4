# -*- test-case-name: tests.test_fakes,tests.test_fastpath,tests.test_sessions,tests.test_storage -*-
"""
The seams of twisted-criu: every zope interface, from storage up to the
daemons' sessions and their operators.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from twisted_criu import wire
    from twisted_criu.views import LinkView, SessionView, StoreView
    from twisted_criu.keys import ImageKey


class IImageReader(Interface):
    """A file-like view of a stored image, read front to back in chunks."""

    def read(size: int) -> bytes:
        """Up to C{size} next bytes; C{b""} at the end."""

    def close() -> None:
        """Release whatever the reader holds."""


class IStoredImage(Interface):
    """A complete image, readable any number of times."""

    size = Attribute("Length of the image in bytes.")

    def open() -> IImageReader:
        """A new reader positioned at the start."""

    def release() -> None:
        """Give the storage back; the image must not be opened again."""


class IImageWriter(Interface):
    """An image being received, chunk by chunk."""

    size = Attribute("Bytes written so far.")

    def write(data: bytes | memoryview) -> None:
        """Append C{data} (a copy: a buffer passed in may be reused at once)."""

    def commit() -> IStoredImage:
        """Seal the image: nothing more will be written."""

    def abort() -> None:
        """Throw away what was written."""


class IPacedWriter(IImageWriter):
    """A writer whose storage (a disk) may fall behind what it is given."""

    def whenCaughtUp() -> Deferred[None] | None:
        """
        L{None} if the writer keeps up; else a L{Deferred} that fires once
        it has caught up.  Writes are still taken meanwhile, but whatever
        feeds the writer should pause until then.
        """


class ISpliceSink(IImageWriter):
    """A writer that takes bytes straight from a pipe, without copying them through Python."""

    def spliceFrom(fd: int, count: int) -> int:
        """
        Move up to C{count} bytes from the pipe C{fd} into the image; 0 at
        EOF.  Raises L{BlockingIOError} if the pipe is empty.
        """


class IKernelSource(IImageReader):
    """A reader whose bytes the kernel can copy into a descriptor (C{sendfile})."""

    def whenReadable() -> Deferred[None] | None:
        """
        L{None} if L{sendfile} can go on now; else a L{Deferred} that fires
        (in the reactor thread) once the disk has delivered the next bytes.
        A consumer should wait for it: L{sendfile} would wait for the disk.
        """

    def sendfile(out: int, count: int) -> int:
        """
        Copy up to C{count} bytes into the descriptor C{out}; 0 at the end.
        Raises L{BlockingIOError} if C{out} is full.
        """


class IKernelSink(Interface):
    """
    A consumer that copies an L{IKernelSource} into its descriptor itself,
    as its reader makes room (a pipe to criu).
    """

    bytesWritten = Attribute("Bytes written into the descriptor so far.")

    def sendFile(source: IKernelSource, count: int) -> Deferred[None]:
        """
        Copy C{count} bytes of C{source}; fires when all are in, fails with
        L{ConnectionLost<twisted.internet.error.ConnectionLost>} if the
        reader went away or L{EOFError} if the source ended early.
        """


class ISkippingReader(IImageReader):
    """A reader that can pass over bytes without reading them (to resume an image)."""

    def skip(count: int) -> int:
        """
        Move on C{count} bytes (fewer at the end of what there is now);
        returns how many.  Only before the first read.
        """


class IImageStore(Interface):
    """Where images are kept between their arrival and their last read."""

    def newWriter(base: IStoredImage | None = None) -> IImageWriter:
        """
        Start a new image, empty or (for an append) holding a copy of
        C{base}'s bytes.  C{base} itself is left untouched.
        """

    def close() -> None:
        """The daemon stops: free everything (e.g. remove spill files)."""

    def room() -> int | None:
        """
        How many more image bytes the store can take now (memory left in
        the budget plus free space for spilling), or L{None} if unbounded.
        """


class IGrowingImage(IImageReader):
    """
    An image still being written, read as it grows (cut-through
    forwarding).  L{read} returns C{b""} whenever it has caught up with the
    writer: C{complete} or C{aborted} then tell whether more will come, and
    C{onChange} is called after every write, commit or abort.
    """

    available = Attribute("Bytes written so far that can be read now (all, once complete).")
    complete = Attribute("The write was committed: C{available} is the image's size.")
    aborted = Attribute("The write broke off: the bytes must be thrown away.")
    onChange = Attribute("A callable without arguments, set by the consumer.")
    image = Attribute("The L{IStoredImage} the write became, once complete.")


class IGrowableWriter(IImageWriter):
    """A writer whose image can be read while it is being written."""

    writing = Attribute("Neither committed nor aborted yet.")
    size = Attribute("Bytes written so far.")

    def follow() -> IGrowingImage:
        """A reader of this image from its first byte, following the writer."""

    def whenGrown(size: int) -> Deferred[None]:
        """Fires once the write holds C{size} bytes, or has ended (committed or aborted)."""


# -- the snapshot registry ------------------------------------------------------


class ISnapshotRegistry(Interface):
    """
    The images of one session by L{ImageKey}, and who waits for one: what
    the criu-facing and link protocols write into and read from.
    """

    released = Attribute("Its session is over: an image published now is dropped at once.")

    def beginWrite(key: ImageKey, writer: IImageWriter | None = None) -> None:
        """A write of C{key} started: its readers wait for it."""

    def publish(key: ImageKey, image: IStoredImage) -> None:
        """A write of C{key} completed: C{image} replaces any older version."""

    def publishAppend(key: ImageKey, tail: IStoredImage, store: IImageStore) -> None:
        """An append to C{key} completed: publish the current version plus C{tail}."""

    def abortWrite(key: ImageKey) -> None:
        """A write of C{key} broke off; the previous version, if any, stays."""

    def whenAvailable(key: ImageKey) -> Deferred[IStoredImage]:
        """The image, once no write of it is under way; fails with L{ImageNotFound}."""

    def get(key: ImageKey) -> IStoredImage | None:
        """The complete image under C{key} now, if any."""

    def keys() -> list[ImageKey]:
        """The keys of every complete image."""

    def snapshotIds() -> list[str]:
        """The snapshot ids C{parent} lists, in order."""


# -- criu's side ------------------------------------------------------------


class ILocalImageService(Interface):
    """What a daemon offers the criu-facing protocol."""

    reactor = Attribute("The reactor pipes are registered with.")
    store = Attribute("The L{IImageStore} new images go to.")
    activity = Attribute("The daemon's L{Activity}: transfers and counters.")
    clientTimeout = Attribute("Seconds criu may take to send its request.")

    def registryFor(request: wire.LocalRequest) -> ISnapshotRegistry:
        """The registry a write or read of C{request} belongs to."""

    def finishRequested(request: wire.LocalRequest) -> None:
        """criu says its dump (or restore) is over."""

    def readsInline(request: wire.LocalRequest) -> bool:
        """Does the reader expect the bytes on the socket (not in a pipe)?"""


class ICaptureService(ILocalImageService):
    """What the proxy offers C{criu dump --stream}."""

    def captureFailed(why: str) -> None:
        """
        criu's dump failed (its C{--stream} connection broke, or an image
        could not be stored): its session must never be restored.
        """


class IRestoreService(ILocalImageService):
    """What the cache offers C{criu restore --stream}."""

    def streamRestoreEnded(complete: bool) -> None:
        """criu closed its connection and every pipe is done: with every file served whole?"""


# -- the link -----------------------------------------------------------------


class ITransientDataReceiver(Interface):
    """
    A protocol whose C{dataReceived} may be given a C{memoryview} of a
    reused buffer, valid only until the call returns: it copies whatever it
    keeps.  The link's fast paths then hand it bytes without a copy.
    """


class IReceivingLink(Interface):
    """The receiving end of one link, as the cache's sessions see it."""

    peerExtended = Attribute("The proxy speaks twisted-criu's link extension.")
    authenticated = Attribute(
        "The peer proved who it is (the link key or --tls): a new link naming a"
        " session is then its proxy's, not an impostor's."
    )
    peer = Attribute("The peer's address, for the log.")

    def sendStatus(status: wire.LinkStatus) -> None:
        """Tell a twisted-criu proxy (a C proxy is never written to)."""

    def close() -> None:
        """End the link once what was written is flushed."""

    def abort() -> None:
        """Drop the link now; the image it was sending is discarded (or kept to resume)."""


class IRemoteImageSink(Interface):
    """What the cache offers the receiving end of a link."""

    store = Attribute("The L{IImageStore} received images go to.")
    reactor = Attribute("The reactor (for timeouts).")
    activity = Attribute("The daemon's L{Activity}: transfers and counters.")
    linkTimeout = Attribute("Seconds a link may stall inside a frame.")

    def linkOpened(receiver: IReceivingLink) -> None:
        """A peer connected; it belongs to no session until it sends a header."""

    def linkClosed(receiver: IReceivingLink, clean: bool) -> None:
        """The link ended: cleanly or not (a proxy may come back)."""

    def imageArriving(receiver: IReceivingLink, token: str | None) -> ISnapshotRegistry | None:
        """
        An image of the session C{token} names (L{None}: a proxy that names
        none) arrives: the registry it goes to, or L{None} to discard it (the
        session takes no more images).
        """

    def dumpEnded(receiver: IReceivingLink, token: str | None) -> None:
        """The proxy's end-of-dump marker for C{token}'s session: it is delivered."""

    def syncRequested(receiver: IReceivingLink, token: str | None, sequence: int) -> wire.LinkStatus:
        """A SYNC marker: what to answer (SYNCED with the session's counts, or SESSION_ABORTED)."""

    def abortRequested(receiver: IReceivingLink, token: str | None) -> None:
        """An ABORT marker: C{token}'s session must never be restored."""

    def imageLost(receiver: IReceivingLink, token: str | None, why: str) -> None:
        """
        An image of C{token}'s session could not be stored (no descriptor
        left): the session must never be restored; its proxy is told.
        """

    def keepPartial(receiver: IReceivingLink, header: wire.RemoteHeader, writer: IImageWriter) -> bool:
        """
        The link broke in the middle of C{header}'s image (link version 4):
        keep C{writer}, unpublished, for the proxy to resume?  False: the
        caller discards it.
        """

    def resumeWriter(receiver: IReceivingLink, header: wire.RemoteHeader) -> IImageWriter | None:
        """
        An image header of a version-4 link: the kept part that its
        C{offset} continues (any other kept part of it is discarded).
        L{None} with an C{offset}: nothing matches, the link is dropped.
        """

    def keptStatuses(receiver: IReceivingLink, token: str | None) -> list[wire.LinkStatus]:
        """
        A RESUME marker (link version 4): one RESUME_AT per image kept in
        part for C{token}'s session, and one (C{images=1}) per image it
        holds whole.  Nothing is delivered.
        """


# -- operators ----------------------------------------------------------------


class ISessionControl(Interface):
    """What a daemon lets an operator see and do."""

    role = Attribute('"proxy" or "cache".')

    def listSessions() -> list[SessionView]:
        """The current session (if any) and the kept ones."""

    def storeView() -> StoreView:
        """How many image bytes the daemon holds in memory, and how many spilled."""

    def linkView() -> LinkView | None:
        """The link's rate limit and achieved rate; L{None} without C{--rate-limit}."""

    def sessionImage(sessionId: str, key: ImageKey) -> IStoredImage | None:
        """A complete image of a session, if it has it."""

    def dropSession(sessionId: str) -> SessionView:
        """
        Drop a session's images.

        @raise KeyError: no such session.
        @raise SessionBusy: a dump or a restore is using it.
        """

    def hookAction(action: str, report: Callable[[str], None]) -> Deferred[dict[str, Any]]:
        """
        C{twisted-criu-hook} runs at criu's C{action}: do what it needs, call
        C{report} with progress lines meanwhile, fire with a JSON-able result.

        @raise HookRefused: (in the Deferred) it cannot be done; the message says why.
        """


class ISession(Interface):
    """
    One migration session of a daemon (the proxy's chain of dumps, or the
    cache's restore): what an operator sees of it and its images.
    """

    id = Attribute("The session's id, unique in its daemon (a string).")
    state = Attribute("What the session is doing, for operators (C{twisted-criu ls}).")
    started = Attribute("When the session started (seconds since the epoch).")
    registry = Attribute("The session's L{SnapshotRegistry}: its images.")
    seed = Attribute("criu asked with the seed (null snapshot) variant of the protocol.")


class ISendingLink(Interface):
    """The proxy's end of one link connection, as the proxy's session drives it."""

    extended = Attribute("The cache said HELLO: it speaks twisted-criu's link extension.")
    idle = Attribute("Nothing is being forwarded or waiting to be.")
    lost = Attribute("The connection is gone.")
    connectedAt = Attribute("When the connection was made (the clock's seconds).")

    def helloWait(now: float) -> float:
        """Seconds the cache has had to answer HELLO (since the first header; 0 before one)."""
    imagesSinceMarker = Attribute("Images handed over since the last end-of-dump marker.")
    bytesSinceMarker = Attribute("Bytes handed over since the last end-of-dump marker.")

    def enqueue(key: ImageKey) -> None:
        """Forward the image under C{key} (the version current when its turn comes)."""

    def offerLive() -> None:
        """criu started writing an image: cut it through if the link is free."""

    def cutThrough(key: ImageKey, image: IStoredImage) -> bool:
        """Was C{image}, just published, cut through (sent or being sent as chunks)?"""

    progress = Attribute("Bytes handed over on this connection, counting the image being forwarded.")
    peerVersion = Attribute("The link extension version the cache said HELLO with (0: none yet).")
    held = Attribute("Nothing is sent while set (the cache is asked where to resume).")
    imagesSent = Attribute("Images handed over on this connection.")

    def whenLost() -> Deferred[None]:
        """Fires when the connection is gone."""

    def sendMarker(marker: wire.Marker, sequence: int = 0) -> None:
        """Send a SYNC or ABORT marker (the link must be idle)."""

    def whenIdle() -> Deferred[None]:
        """Fires once everything enqueued so far has been handed over."""

    def sendEndOfDump() -> None:
        """Tell an extended cache that the dump is complete."""

    def expectClose() -> None:
        """The link is about to be ended on purpose: do not report it as lost."""

    def abort() -> None:
        """Drop the connection at once (the proxy reconnects and sends again)."""


class ILinkSource(Interface):
    """What the proxy's session offers its end of the link (an L{ISendingLink})."""

    sessionToken = Attribute("Names the session on the link (unique to this proxy process and session).")

    def linkUp(sender: ISendingLink) -> None:
        """A connection to the cache is made: C{sender} forwards on it."""

    def imageFor(key: ImageKey) -> IStoredImage | None:
        """The complete image to forward under C{key} now, if any (none: the cache holds exactly it)."""

    def digestFor(key: ImageKey, image: IStoredImage) -> tuple[bool, bytes | None]:
        """
        The checksum to send with C{image}: C{(ready, sha256)}.  Not ready:
        the image is enqueued again once its checksum is known.
        """

    def nextLive() -> tuple[ImageKey, IGrowingImage] | None:
        """An image criu is still writing, to cut through now that the link is free."""

    def statusReceived(sender: ISendingLink, status: wire.LinkStatus) -> None:
        """The cache sent C{status} on C{sender}'s connection."""

    def forwardFailed(key: ImageKey, why: str) -> None:
        """The image under C{key} could not be opened to forward it (no descriptor left)."""

    def resumeOffset(key: ImageKey, version: IStoredImage | IGrowingImage) -> int:
        """Where to send C{version} of C{key} from: the bytes the cache kept of it, or 0."""

    def forwarding(key: ImageKey, version: IStoredImage | IGrowingImage | None) -> None:
        """The link starts sending C{version} of C{key}, or (L{None}) is done with it."""
