# -*- test-case-name: tests.test_images -*-
"""
The local leg: criu <-> daemon over a UNIX socket, one connection per image.

criu sends one C{local_image_entry} frame.  For a write or append the image
bytes follow either through a pipe passed with SCM_RIGHTS (criu-dev 2020)
or inline on the socket until criu closes it (the 2015 seed, and C{parent}).
For a read the daemon answers with a C{local_image_reply_entry}, then sends
the bytes inline or into a pipe criu passes.
"""

from __future__ import annotations

import os
from enum import Enum, auto
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IFileDescriptorReceiver, IReactorFDSet
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu import filelimit, wire
from twisted_criu.errors import DumpAborted, ImageNotFound, ImageSizeMismatch, ProtocolError, StoreFailed
from twisted_criu.flow.pacing import pauseWhileBehind, readPipeInto
from twisted_criu.criu.settle import LiveConnections, forget, unreadBytes
from twisted_criu.criu.variants import ReadVariant, readsInline  # noqa: F401 (were defined here)
from twisted_criu.flow.passed import DroppedDescriptors
from twisted_criu.flow.pipes import PipeReader, PipeWriter, checkPipe
from twisted_criu.flow.send import OutgoingImage
from twisted_criu.interfaces import (
    ICaptureService,
    IImageStore,
    IImageWriter,
    ILocalImageService,
    ISnapshotRegistry,
    IStoredImage,
)
from twisted_criu.keys import ImageKey, describe
from twisted_criu.progress import Direction, ImageInFlight


class _State(Enum):
    HEADER = auto()
    WRITE_START = auto()  # header parsed; an fd or inline bytes come next
    WRITE_INLINE = auto()
    WRITE_PIPE = auto()
    READ_WAIT = auto()  # waiting for the image
    READ_FD = auto()  # replied 0, waiting for criu's pipe
    READ_SEND = auto()
    DONE = auto()


@implementer(IFileDescriptorReceiver)
class LocalImageProtocol(Protocol, TimeoutMixin):
    """One criu request: a write, an append, a read or the finish."""

    log = Logger()
    transport: Any  # a UNIX transport: also IFileDescriptorReceiver-aware

    def __init__(self, service: ILocalImageService) -> None:
        self.service = service
        self._state = _State.HEADER
        self._frames = wire.FrameBuffer()
        self._fds: list[int] = []
        self._key: ImageKey = ("", "")
        self._registry: ISnapshotRegistry | None = None
        self._writer: IImageWriter | None = None
        self._pipe: PipeReader | PipeWriter | None = None
        self._waiting: Deferred[IStoredImage] | None = None
        self._transfer: OutgoingImage | None = None
        self._inlineRead = False
        self._append = False
        self._moving: ImageInFlight | None = None
        #: A protocol error closed the connection: what the same read still
        #: delivers is discarded (one error line per connection).
        self._failed = False
        self._passed: DroppedDescriptors | None = None
        #: The kernel dropped the pipe criu passed (no descriptor left).
        self._pipeDropped = False

    # -- events from the socket -------------------------------------------

    def callLater(self, period: float, func: Callable[[], None]) -> Any:  # for TimeoutMixin
        return self.service.reactor.callLater(period, func)

    def connectionMade(self) -> None:
        self.setTimeout(self.service.clientTimeout)
        self._passed = DroppedDescriptors.install(self.transport, self._descriptorDropped)

    def timeoutConnection(self) -> None:
        self._protocolError(
            ProtocolError(f"no request within {self.service.clientTimeout} s")
        )

    def fileDescriptorReceived(self, descriptor: int) -> None:
        if self._failed:
            os.close(descriptor)
        elif self._fds:  # criu passes one pipe per connection
            os.close(descriptor)
            self._protocolError(ProtocolError("more than one file descriptor passed"))
        elif self._state in (_State.HEADER, _State.WRITE_START, _State.READ_WAIT):
            self._fds.append(descriptor)
            if self._state is _State.WRITE_START:
                self._startPipeWrite()
        elif self._state is _State.READ_FD and not self._fds:
            self._fds.append(descriptor)
            self._startPipeRead()
        else:
            os.close(descriptor)
            self._protocolError(ProtocolError("unexpected file descriptor"))

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        state = self._state
        if state is _State.WRITE_INLINE:
            writer = self._writer
            assert writer is not None
            try:
                writer.write(data)
            except OSError as e:
                self._storeFailed(e)
                self.transport.abortConnection()
                return
            pauseWhileBehind(writer, self.transport)
        elif state is _State.HEADER:
            try:
                payload = self._frames.feed(data)
                if payload is None:
                    return
                request = wire.LocalRequest.fromBytes(payload)
            except ProtocolError as e:
                self._protocolError(e)
                return
            self._handle(request, self._frames.takeRest())
        elif self._pipeDropped and state in (_State.WRITE_START, _State.READ_WAIT, _State.READ_FD):
            self._pipeLost()  # not inline bytes: the byte that carried the lost pipe
        elif state is _State.WRITE_START:
            if self._fds:  # pragma: no cover - fds start the pipe at once
                self._startPipeWrite()
            else:
                self._state = _State.WRITE_INLINE
                self.dataReceived(data)
        elif state in (_State.WRITE_PIPE, _State.READ_FD, _State.READ_SEND):
            pass  # the dummy byte that carried the descriptor
        elif state is _State.READ_WAIT:
            pass  # seed clients send nothing; tolerate a stray dummy byte
        else:
            self._protocolError(ProtocolError("data after the request was served"))

    @property
    def settled(self) -> bool:
        """Nothing criu sent here waits to be processed (a write under way is the registry's)."""
        return (
            self._state in (_State.HEADER, _State.READ_WAIT, _State.READ_FD, _State.READ_SEND, _State.DONE)
            and not self._frames.pending
            and not self._fds
            and unreadBytes(self.transport) == 0
        )

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        forget(self)
        self.setTimeout(None)
        passed, self._passed = self._passed, None
        if passed is not None:
            passed.restore()
        self._closeFds()
        self._dropTransfer()
        state = self._state
        if state in (_State.WRITE_START, _State.WRITE_INLINE):
            if reason.check(ConnectionDone):
                self._commit()
            else:
                self._abort(f"socket closed uncleanly: {reason.getErrorMessage()}")
        elif state is _State.READ_WAIT and self._waiting is not None:
            self._waiting.cancel()
        elif state is _State.READ_FD:
            self.log.warn(
                "criu closed the connection for {image} before passing its pipe",
                image=describe(self._key),
            )
        elif state is _State.HEADER and self._frames.pending:
            self.log.warn(
                "connection closed inside a request frame ({n} bytes)",
                n=self._frames.pending,
            )

    # -- dispatch ------------------------------------------------------------

    def _handle(self, request: wire.LocalRequest, rest: bytes) -> None:
        self.setTimeout(None)
        if request.isFinish:
            self._state = _State.DONE
            self.service.finishRequested(request)
            self.transport.loseConnection()
            return
        self._key = (request.snapshotId, request.name)
        try:
            self._registry = self.service.registryFor(request)
        except DumpAborted as e:
            self.log.warn("refusing {image}: {why}", image=describe(self._key), why=str(e))
            self._closeFds()
            self._state = _State.DONE
            self.transport.abortConnection()  # criu's write fails (EPIPE)
            return
        kind = request.kind
        if kind is wire.OpenKind.READ:
            self._inlineRead = self.service.readsInline(request)
            self._state = _State.READ_WAIT
            waiting = self._registry.whenAvailable(self._key)
            if not waiting.called:
                self.service.activity.waitedReads += 1
            self._waiting = waiting
            waiting.addCallbacks(self._imageReady, self._imageMissing)
            return
        self._append = kind is wire.OpenKind.APPEND
        store: IImageStore = self.service.store
        writer = self._writer = store.newWriter()
        self._registry.beginWrite(self._key, None if self._append else writer)
        self._moving = self.service.activity.begin(
            Direction.FROM_CRIU, describe(self._key), None, lambda: writer.size
        )
        self._state = _State.WRITE_START
        if self._fds:
            self._startPipeWrite()
        if rest:
            self.dataReceived(rest)

    # -- writes --------------------------------------------------------------

    def _takePipe(self) -> int | None:
        """The one pipe criu passed, or L{None} after refusing what it passed."""
        if len(self._fds) != 1:
            self._protocolError(ProtocolError(f"{len(self._fds)} descriptors passed"))
            return None
        fd = self._fds.pop()
        try:
            checkPipe(fd)
        except ProtocolError as e:
            os.close(fd)
            self._protocolError(e)
            return None
        return fd

    def _startPipeWrite(self) -> None:
        fd = self._takePipe()
        if fd is None:
            return
        self._state = _State.WRITE_PIPE
        writer = self._writer
        assert writer is not None
        self._pipe = readPipeInto(self._reactor(), fd, writer, self._pipeWriteEnded)

    def _pipeWriteEnded(self, reason: Failure) -> None:
        self._pipe = None
        if reason.check(ConnectionDone):
            self._commit()
        elif isinstance(reason.value, StoreFailed):
            self._storeFailed(reason.value.error)
        else:
            self._abort(f"pipe read failed: {reason.getErrorMessage()}")

    def _storeFailed(self, error: OSError) -> None:
        """The store could not take criu's bytes: the image is lost."""
        if filelimit.exhausted(error):
            self._outOfDescriptors("cannot store", error)
        elif self._writer is None:  # failed after the write ended
            self.log.error("discarded {image}: cannot store the data: {why}", image=describe(self._key), why=str(error))
        else:
            self._abort(f"cannot store the data: {error}")

    def _outOfDescriptors(self, what: str, error: OSError | None) -> None:
        """
        No descriptor for criu's image: the write fails (its pipe is
        closed), and so does the dump it belongs to (the proxy aborts its
        session: criu's next write is refused, the post-dump hook fails).
        """
        image = describe(self._key) if self._key != ("", "") else "an image"
        self.log.error(
            "{what} {image}: {advice}; the dump fails", what=what, image=image, advice=filelimit.advice(error)
        )
        self._abort(None)
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.abandon()
        self._closeFds()
        self._state = _State.DONE
        self.transport.abortConnection()
        if ICaptureService.providedBy(self.service):
            self.service.captureFailed(f"{image} could not be stored: too many open files")

    def _descriptorDropped(self) -> None:
        """
        The kernel dropped a pipe criu passed (this process has no
        descriptor left): the byte that carried it comes next, and ends
        the request (L{_pipeLost}).
        """
        self._pipeDropped = True

    def _pipeLost(self) -> None:
        """criu passed a pipe for this request, and the kernel dropped it."""
        if self._state in (_State.READ_WAIT, _State.READ_FD):
            self.log.error(
                "could not take the pipe criu passed to read {image}: {advice}; the restore fails",
                image=describe(self._key),
                advice=filelimit.advice(None),
            )
            self._dropTransfer()
            self._state = _State.DONE
            self.transport.abortConnection()
        else:
            self._outOfDescriptors("could not take the pipe criu passed for", None)

    def _commit(self) -> None:
        writer, self._writer = self._writer, None
        self._state = _State.DONE
        if writer is None or self._registry is None:
            return
        try:
            image = writer.commit()
        except OSError as e:
            self._writer = writer  # (the writer aborted itself)
            self._storeFailed(e)
            return
        assert self._moving is not None
        timing = self.service.activity.end(self._moving, image.size)
        self.log.info(
            "stored {image} ({size} bytes{appended}) {timing}",
            image=describe(self._key),
            size=image.size,
            appended=" appended" if self._append else "",
            **timing,
        )
        if not self._append:
            self._registry.publish(self._key, image)
            return
        try:
            self._registry.publishAppend(self._key, image, self.service.store)
        except OSError as e:  # (the registry ended the write)
            self._storeFailed(e)

    def _abort(self, why: str | None) -> None:
        """Discard the image being written (saying why, unless C{why} is L{None}: said already)."""
        writer, self._writer = self._writer, None
        self._state = _State.DONE
        if writer is None or self._registry is None:
            return
        if self._moving is not None:
            self.service.activity.abandon(self._moving)
        if why is not None:
            self.log.error(
                "discarded {image} after {size} bytes: {why}",
                image=describe(self._key),
                size=writer.size,
                why=why,
            )
        writer.abort()
        self._registry.abortWrite(self._key)

    # -- reads ---------------------------------------------------------------

    def _imageMissing(self, failure: Failure) -> None:
        self._waiting = None
        if failure.check(CancelledError):
            return
        failure.trap(ImageNotFound)
        self.service.activity.notFound += 1
        self.log.debug("no image {image}: ENOENT", image=describe(self._key))
        self._state = _State.DONE
        self.transport.write(wire.REPLY_ENOENT)
        self.transport.loseConnection()

    def _imageReady(self, image: IStoredImage) -> None:
        self._waiting = None
        try:
            self._transfer = OutgoingImage(image)  # these bytes, even if replaced
        except OSError as e:  # no descriptor to read it with: criu gets no reply, and fails
            self.log.error("cannot serve {image}: {why}", image=describe(self._key), why=filelimit.describe(e))
            self._state = _State.DONE
            self.transport.abortConnection()
            return
        self.transport.write(wire.REPLY_OK)
        if self._inlineRead:
            self._state = _State.READ_SEND
            self._send(self.transport)
        else:
            self._state = _State.READ_FD
            if self._fds:
                self._startPipeRead()

    def _startPipeRead(self) -> None:
        fd = self._takePipe()
        if fd is None:
            return
        self._state = _State.READ_SEND
        pipe = PipeWriter(self._reactor(), fd, self._pipeReadEnded)
        self._pipe = pipe
        self._send(pipe)

    def _send(self, consumer: Any) -> None:
        transfer, key = self._transfer, self._key
        assert transfer is not None
        self._transfer = None
        activity = self.service.activity
        moving = activity.begin(
            Direction.TO_CRIU, describe(key), transfer.size, lambda: transfer.sent
        )

        def sent(_: None) -> None:
            self.log.info(
                "served {image} ({size} bytes) {timing}",
                image=describe(key),
                size=transfer.size,
                **activity.end(moving, transfer.size),
            )
            consumer.loseConnection()
            if consumer is not self.transport:
                self.transport.loseConnection()

        def failed(reason: Failure) -> None:
            activity.abandon(moving)
            if reason.check(ImageSizeMismatch):
                self.log.error(
                    "store failure while serving {image}, aborting: {why}",
                    image=describe(key),
                    why=reason.getErrorMessage(),
                )
                consumer.abortConnection()
            else:
                self.log.warn(
                    "reader of {image} went away: {why}",
                    image=describe(key),
                    why=reason.getErrorMessage(),
                )
            self.transport.loseConnection()

        transfer.sendTo(consumer).addCallbacks(sent, failed)

    def _pipeReadEnded(self, reason: Failure) -> None:
        self._state = _State.DONE
        self._pipe = None

    # -- errors --------------------------------------------------------------

    def _protocolError(self, error: ProtocolError) -> None:
        self._failed = True
        self.log.error(
            "bad request from criu, closing its connection: {error}", error=str(error)
        )
        if self._writer is not None:
            self._abort(str(error))
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.abandon()  # criu sees a short image, or EPIPE, at once
        self._closeFds()
        self._dropTransfer()
        self._state = _State.DONE
        self.transport.abortConnection()

    def _dropTransfer(self) -> None:
        """Close an image opened for a reader that will never get it."""
        transfer, self._transfer = self._transfer, None
        if transfer is not None:
            transfer.close()

    def _closeFds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def _reactor(self) -> IReactorFDSet:
        reactor: IReactorFDSet = self.service.reactor
        return reactor


class LocalImageFactory(LiveConnections):
    """Builds a L{LocalImageProtocol} per criu connection, and knows the live ones."""

    noisy = False

    def __init__(self, service: ILocalImageService) -> None:
        super().__init__()
        self.service = service

    def buildProtocol(self, addr: Any) -> LocalImageProtocol:
        protocol = LocalImageProtocol(self.service)
        self.track(protocol)
        return protocol
