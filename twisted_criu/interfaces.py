"""
The seams of twisted-criu: every zope interface, from storage up to the
daemons' sessions and their operators.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from twisted_criu import wire
    from twisted_criu.daemons.control import SessionView
    from twisted_criu.keys import ImageKey
    from twisted_criu.link.receiver import RemoteReceiver
    from twisted_criu.registry import SnapshotRegistry


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
        L{ConnectionLost} if the reader went away or L{EOFError} if the
        source ended early.
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

    def follow() -> IGrowingImage:
        """A reader of this image from its first byte, following the writer."""


# -- criu's side ------------------------------------------------------------


class ILocalImageService(Interface):
    """What a daemon offers the criu-facing protocol."""

    reactor = Attribute("The reactor pipes are registered with.")
    store = Attribute("The L{IImageStore} new images go to.")
    activity = Attribute("The daemon's L{Activity}: transfers and counters.")
    clientTimeout = Attribute("Seconds criu may take to send its request.")

    def registryFor(request: wire.LocalRequest) -> SnapshotRegistry:
        """The registry a write or read of C{request} belongs to."""

    def finishRequested(request: wire.LocalRequest) -> None:
        """criu says its dump (or restore) is over."""

    def readsInline(request: wire.LocalRequest) -> bool:
        """Does the reader expect the bytes on the socket (not in a pipe)?"""


# -- the link -----------------------------------------------------------------


class IRemoteImageSink(Interface):
    """What the cache offers the receiving end of a link."""

    store = Attribute("The L{IImageStore} received images go to.")
    reactor = Attribute("The reactor (for timeouts).")
    activity = Attribute("The daemon's L{Activity}: transfers and counters.")
    linkTimeout = Attribute("Seconds a link may stall inside a frame.")

    def linkOpened(receiver: RemoteReceiver) -> SnapshotRegistry:
        """A proxy connected; return the registry its images go to."""

    def linkClosed(receiver: RemoteReceiver, clean: bool) -> None:
        """The link ended: cleanly (session over) or not (it may come back)."""

    def dumpEnded(receiver: RemoteReceiver) -> None:
        """The proxy's end-of-dump marker: the link stays, idle, for the next dump."""

    def dumpStarted(receiver: RemoteReceiver) -> SnapshotRegistry:
        """Images arrive on a link after its end-of-dump marker: a new dump."""


# -- operators ----------------------------------------------------------------


class ISessionControl(Interface):
    """What a daemon lets an operator see and do."""

    role = Attribute('"proxy" or "cache".')

    def listSessions() -> list[SessionView]:
        """The current session (if any) and the kept ones."""

    def sessionImage(sessionId: str, key: ImageKey) -> IStoredImage | None:
        """A complete image of a session, if it has it."""

    def dropSession(sessionId: str) -> SessionView:
        """
        Drop a session's images.

        @raise KeyError: no such session.
        @raise SessionBusy: a dump or a restore is using it.
        """
