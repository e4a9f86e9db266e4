# -*- test-case-name: tests.test_stream -*-
"""
The image-streamer protocol of released CRIU (C{criu dump|restore --stream}).

criu makes one connection per run to C{DIR/streamer-capture.sock} (dump) or
C{DIR/streamer-serve.sock} (restore) and sends one
C{img_streamer_request_entry} frame per file.  Dump: criu then passes the
read end of a pipe (SCM_RIGHTS, one C{00} byte) and writes the file into it.
Restore: we answer C{img_streamer_reply_entry{exists}}; if true criu passes
a pipe's write end and we write the file into it.  Many pipes may be open at
once; each is its own reader or writer in the reactor.  A dump is complete
when criu has closed the connection and every pipe has reached EOF.

Stream images are registered under an empty snapshot id.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu import filelimit, wire
from twisted_criu.errors import ImageNotFound, ProtocolError, StoreFailed
from twisted_criu.flow.pacing import readPipeInto
from twisted_criu.criu.settle import LiveConnections, forget, unreadBytes
from twisted_criu.flow.passed import DroppedDescriptors
from twisted_criu.flow.pipes import PipeReader, PipeWriter, checkPipe
from twisted_criu.flow.send import OutgoingImage
from twisted_criu.interfaces import ICaptureService, IImageWriter, ILocalImageService, IRestoreService, ISnapshotRegistry, IStoredImage
from twisted_criu.keys import ImageKey
from twisted_criu.progress import Direction

#: The snapshot id stream images are kept under.
STREAM_SNAPSHOT_ID = ""

_DUMMY = b"\0"

#: criu sends one request, then (dump) its pipe: never more descriptors
#: than that ahead of what was answered.
MAX_PASSED_AHEAD = 1

#: Nor more bytes than a request frame and a descriptor's byte ahead.
MAX_BYTES_AHEAD = 4 + wire.MAX_HEADER_LENGTH + 1


def _key(filename: str) -> ImageKey:
    return (STREAM_SNAPSHOT_ID, filename)


@implementer(IFileDescriptorReceiver)
class _StreamControl(Protocol, TimeoutMixin):
    """
    The control connection: request frames, each possibly followed by a
    descriptor riding on one C{00} byte.  Subclasses say what a request
    means (L{requestReceived}) and what its descriptor is for
    (L{descriptorReceived}).
    """

    log = Logger()
    transport: Any
    mode = wire.O_WRONLY

    def __init__(self, service: ILocalImageService) -> None:
        self.service = service
        self._frames = wire.FrameBuffer()
        self._fds: list[int] = []
        self._expectingFd = False
        self._paused = False
        self._pending = b""
        self._pipes: set[PipeReader | PipeWriter] = set()
        self._failed = False
        self.registry: ISnapshotRegistry | None = None
        self._passed: DroppedDescriptors | None = None
        #: The kernel dropped the pipe criu passed (no descriptor left).
        self._pipeDropped = False

    def callLater(self, period: float, func: Callable[[], None]) -> Any:  # for TimeoutMixin
        return self.service.reactor.callLater(period, func)

    def connectionMade(self) -> None:
        # A stream run belongs to one session: pick it now.
        self.registry = self.service.registryFor(wire.LocalRequest("", "", self.mode))
        self.setTimeout(self.service.clientTimeout)  # until the first request
        self._passed = DroppedDescriptors.install(self.transport, self._descriptorDropped)

    def _descriptorDropped(self) -> None:
        """The kernel dropped a pipe criu passed: its byte comes next (see L{_process})."""
        self._pipeDropped = True

    @property
    def pendingFile(self) -> str:
        """The file whose pipe criu is about to pass."""
        return "a file"

    def timeoutConnection(self) -> None:
        self.fail(f"no request within {self.service.clientTimeout} s")

    def fileDescriptorReceived(self, descriptor: int) -> None:
        if self._failed:
            os.close(descriptor)
            return
        if len(self._fds) >= MAX_PASSED_AHEAD:
            os.close(descriptor)
            self.fail(f"more than {MAX_PASSED_AHEAD} descriptor passed ahead of its request")
            return
        self._fds.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        self._pending += data
        if len(self._pending) > MAX_BYTES_AHEAD:
            self.fail(f"{len(self._pending)} bytes sent ahead of the answers (at most {MAX_BYTES_AHEAD})")
            return
        try:
            self._process()
        except ProtocolError as e:
            self.fail(str(e))

    def _process(self) -> None:
        """
        Consume requests and descriptor bytes.  The kernel may glue a request
        and the next descriptor's byte into one read, but a descriptor always
        arrives with the data of its own byte, so once that data is consumed
        no descriptor may be left over.
        """
        while self._pending and not self._paused and not self._failed:
            if self._expectingFd:
                if self._pipeDropped and not self._fds:
                    self.fail(f"could not take the pipe criu passed for {self.pendingFile}: {filelimit.advice(None)}")
                    return
                if self._pending[:1] != _DUMMY or len(self._fds) != 1:
                    raise ProtocolError(
                        f"expected one descriptor with a 00 byte, got {len(self._fds)}"
                        f" descriptors and a {self._pending[:1].hex()} byte"
                    )
                self._pending = self._pending[1:]
                self._expectingFd = False
                fd = self._fds.pop()
                try:
                    checkPipe(fd)
                except ProtocolError:
                    os.close(fd)
                    raise
                self.setTimeout(None)  # criu is speaking: no more deadline
                self.descriptorReceived(fd)
                continue
            pending, self._pending = self._pending, b""
            payload = self._frames.feed(pending)
            if payload is None:
                break
            self._pending = self._frames.takeRest()
            self.setTimeout(None)
            self.requestReceived(wire.StreamRequest.fromBytes(payload).filename)
        if self._fds and not self._paused and not self._expectingFd:
            raise ProtocolError("descriptor passed without a request")

    def expectDescriptor(self) -> None:
        self._expectingFd = True

    def pause(self) -> None:
        """Stop taking requests (an answer is pending): criu's next bytes wait in the socket."""
        self._paused = True
        self.transport.pauseProducing()

    def resume(self) -> None:
        self._paused = False
        if not self._failed:
            self.transport.resumeProducing()
        self.dataReceived(b"")

    def requestReceived(self, filename: str) -> None:
        raise NotImplementedError()

    def descriptorReceived(self, fd: int) -> None:
        raise NotImplementedError()

    def trackPipe(self, pipe: PipeReader | PipeWriter) -> None:
        self._pipes.add(pipe)

    def pipeEnded(self, pipe: PipeReader | PipeWriter) -> None:
        self._pipes.discard(pipe)
        self.checkDone()

    def checkDone(self) -> None:
        """Called whenever the connection or a pipe ends."""

    @property
    def pipesOpen(self) -> int:
        return len(self._pipes)

    def fail(self, why: str) -> None:
        """A fatal error: log it, close every pipe so criu fails fast."""
        if self._failed:
            return
        self._failed = True
        self.log.error("criu --stream session failed, closing its pipes: {why}", why=why)
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
        for pipe in list(self._pipes):
            pipe.abandon()  # criu sees a short file, or EPIPE, at once
        self.transport.abortConnection()

    @property
    def settled(self) -> bool:
        """Nothing criu sent here waits to be processed (open pipes are writes under way)."""
        return (
            not self._pending
            and not self._frames.pending
            and not self._expectingFd
            and not self._fds
            and unreadBytes(self.transport) == 0
        )

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        forget(self)
        self.setTimeout(None)
        passed, self._passed = self._passed, None
        if passed is not None:
            passed.restore()
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
        if self._frames.pending or self._expectingFd:
            self.fail("criu closed the connection in the middle of a request")
        self.connected = False
        self.checkDone()


class StreamCaptureProtocol(_StreamControl):
    """C{criu dump --stream}: every file arrives through its own pipe."""

    mode = wire.O_WRONLY

    def __init__(self, service: ICaptureService) -> None:
        super().__init__(service)
        self._capture = service
        self._filename: str | None = None
        self._closed = False
        self.files = 0

    @property
    def pendingFile(self) -> str:
        return self._filename or "a file"

    def requestReceived(self, filename: str) -> None:
        if self.registry is not None and self.registry.released:
            self.fail(f"refusing {filename}: the session criu is dumping into was aborted")
            return
        self._filename = filename
        self.expectDescriptor()

    def descriptorReceived(self, fd: int) -> None:
        filename, self._filename = self._filename, None
        assert filename is not None and self.registry is not None
        key = _key(filename)
        registry = self.registry
        writer: IImageWriter = self.service.store.newWriter()
        registry.beginWrite(key, writer)
        self.files += 1
        activity = self.service.activity
        moving = activity.begin(Direction.FROM_CRIU, filename, None, lambda: writer.size)

        def ended(reason: Failure) -> None:
            if reason.check(ConnectionDone) and not self._failed:
                image = writer.commit()
                self.log.info(
                    "stored {image} ({size} bytes) {timing}",
                    image=filename,
                    size=image.size,
                    **activity.end(moving, image.size),
                )
                registry.publish(key, image)
            else:
                activity.abandon(moving)
                size = writer.size
                writer.abort()
                registry.abortWrite(key)
                error = reason.value.error if isinstance(reason.value, StoreFailed) else None
                if error is not None and filelimit.exhausted(error):
                    self.fail(f"cannot store {filename}: {filelimit.advice(error)}")
                else:
                    self.log.error(
                        "discarded {image} after {size} bytes: {why}",
                        image=filename,
                        size=size,
                        why=reason.getErrorMessage(),
                    )
            self.pipeEnded(pipe)

        pipe = readPipeInto(self.service.reactor, fd, writer, ended)
        self.trackPipe(pipe)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._closed = True
        super().connectionLost(reason)

    def checkDone(self) -> None:
        if self._closed and not self.pipesOpen and self.registry is not None:
            self.registry = None
            if self._failed:
                self._capture.captureFailed("its --stream connection broke")
                return
            self.log.info("criu dump --stream finished: {n} files", n=self.files)
            self.service.finishRequested(wire.LocalRequest("", "", wire.O_WRONLY))


class StreamServeProtocol(_StreamControl):
    """C{criu restore --stream}: answer C{exists}, then fill criu's pipe."""

    mode = wire.O_RDONLY

    def __init__(self, service: IRestoreService) -> None:
        super().__init__(service)
        self._restores = service
        self._waiting: Deferred[IStoredImage] | None = None
        self._transfer: tuple[str, OutgoingImage] | None = None
        self._closed = False
        #: A pipe broke before criu had all of its file.
        self._broken = False

    def requestReceived(self, filename: str) -> None:
        assert self.registry is not None
        if self._pending:
            # criu asks for its next file only once it has read this answer.
            raise ProtocolError(
                f"{len(self._pending)} bytes sent after the request for {filename}, ahead of its answer"
            )
        self.pause()
        waiting = self.registry.whenAvailable(_key(filename))
        if not waiting.called:
            self.service.activity.waitedReads += 1
        self._waiting = waiting
        waiting.addCallbacks(
            self._found, self._missing, callbackArgs=(filename,), errbackArgs=(filename,)
        )

    @property
    def pendingFile(self) -> str:
        return self._transfer[0] if self._transfer is not None else "a file"

    def _found(self, image: IStoredImage, filename: str) -> None:
        self._waiting = None
        try:
            self._transfer = (filename, OutgoingImage(image))  # these bytes, even if replaced
        except OSError as e:  # no descriptor to read it with
            self.fail(f"cannot serve {filename}: {filelimit.describe(e)}")
            return
        self.transport.write(wire.StreamReply(True).toBytes())
        self.expectDescriptor()
        self.resume()

    def _missing(self, failure: Failure, filename: str) -> None:
        self._waiting = None
        if failure.check(CancelledError):
            return
        failure.trap(ImageNotFound)
        self.service.activity.notFound += 1
        self.log.debug("no file {image}: exists=false", image=filename)
        self.transport.write(wire.StreamReply(False).toBytes())
        self.resume()

    def descriptorReceived(self, fd: int) -> None:
        assert self._transfer is not None
        (filename, transfer), self._transfer = self._transfer, None
        pipe = PipeWriter(self.service.reactor, fd, lambda reason: self.pipeEnded(pipe))
        self.trackPipe(pipe)
        activity = self.service.activity
        moving = activity.begin(Direction.TO_CRIU, filename, transfer.size, lambda: transfer.sent)

        def sent(_: None) -> None:
            self.log.info(
                "served {image} ({size} bytes) {timing}",
                image=filename,
                size=transfer.size,
                **activity.end(moving, transfer.size),
            )
            pipe.loseConnection()

        def failed(reason: Failure) -> None:
            activity.abandon(moving)
            self._broken = True
            self.log.warn(
                "criu stopped reading {image}: {why}",
                image=filename,
                why=reason.getErrorMessage(),
            )
            pipe.abortConnection()

        transfer.sendTo(pipe).addCallbacks(sent, failed)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._closed = True
        if self._waiting is not None:
            self._waiting.cancel()
        if self._transfer is not None:
            self._transfer[1].close()
            self._transfer = None
        super().connectionLost(reason)

    def checkDone(self) -> None:
        if self._closed and not self.pipesOpen and self.registry is not None:
            self.registry = None
            complete = not (self._failed or self._broken)
            self.log.info(
                "criu restore --stream closed its connection{how}",
                how="" if complete else " before it had every file",
            )
            self._restores.streamRestoreEnded(complete)


class StreamCaptureFactory(LiveConnections):
    noisy = False

    def __init__(self, service: ICaptureService) -> None:
        super().__init__()
        self.service = service

    def buildProtocol(self, addr: Any) -> StreamCaptureProtocol:
        protocol = StreamCaptureProtocol(self.service)
        self.track(protocol)
        return protocol


class StreamServeFactory(Factory):
    noisy = False

    def __init__(self, service: IRestoreService) -> None:
        self.service = service

    def buildProtocol(self, addr: Any) -> StreamServeProtocol:
        return StreamServeProtocol(self.service)
