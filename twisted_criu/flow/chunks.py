# -*- test-case-name: tests.test_cutthrough -*-
"""
Cut-through forwarding: send an image to the cache while criu still writes
it, as chunks (link extension version 2), instead of after it is complete.

The proxy still stores every byte (it must be able to send the dump again
if the link breaks before the cache confirms it: criu's finish gets no
reply), but the link no longer waits for whole images.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import abstract
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.errors import ImageAborted, SourceBusy
from twisted_criu.interfaces import IGrowingImage

#: Largest chunk sent with sendfile on a plain socket.
SOCKET_CHUNK = 1 << 22

#: Smallest chunk sent while criu is still writing (it writes through a
#: 64 KiB pipe: a chunk per pipeful would cost more calls than bytes).
MIN_CHUNK = 1 << 18

#: Chunk read and written through other transports (TLS).
WRITTEN_CHUNK = 1 << 18

assert SOCKET_CHUNK <= wire.MAX_CHUNK


class _Chunks:
    """What both producers share: the image, the count, the ending."""

    def __init__(self, growing: IGrowingImage, transport: Any) -> None:
        self.growing = growing
        self.transport = transport
        self.sent = 0
        #: Caught up with criu: the next chunk waits for its next write.
        self.waiting = False
        self.done: Deferred[int] = Deferred()
        self.finished = False
        growing.onChange = self.changed

    def start(self) -> Deferred[int]:
        raise NotImplementedError

    def changed(self) -> None:
        raise NotImplementedError

    def endIfOver(self) -> None:
        """Nothing left to send now: end the image if criu is done with it, else wait."""
        growing = self.growing
        if growing.complete:
            self.finish(wire.CHUNK_END, None)
        elif growing.aborted:
            self.finish(wire.CHUNK_ABORT, Failure(ImageAborted()))
        else:
            self.waiting = True

    def finish(self, marker: int | None, failure: Failure | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.growing.onChange = lambda: None
        self.growing.close()
        self.transport.unregisterProducer()
        if marker is not None:
            self.transport.write(wire.CHUNK_LENGTH.pack(marker))
        if failure is None:
            self.done.callback(self.sent)
        else:
            self.done.errback(failure)

    def stopProducing(self) -> None:
        self.finish(None, Failure(ConnectionLost("the link went away during the image")))


@implementer(IPullProducer)
class _SocketChunks(_Chunks):
    """
    A plain TCP socket: each chunk's length goes straight to the socket,
    then the kernel copies its bytes from the store (sendfile).  Asked for
    more by the transport whenever its buffer is empty.
    """

    def __init__(self, growing: IGrowingImage, transport: Any) -> None:
        super().__init__(growing, transport)
        self._chunkLeft = 0
        self._primed = False

    def start(self) -> Deferred[int]:
        self.transport.registerProducer(self, False)
        return self.done

    def changed(self) -> None:
        if self.waiting and not self.finished and self._worthSending():
            self.waiting = False
            self.transport.startWriting()  # then asks us again

    def _worthSending(self) -> bool:
        growing = self.growing
        return growing.complete or growing.aborted or growing.available - self.sent >= MIN_CHUNK

    def resumeProducing(self) -> None:
        transport = self.transport
        if self.finished:
            return
        if not self._primed:
            # Called from registerProducer: the header may still be buffered.
            self._primed = True
            transport.startWriting()
            return
        if not self._chunkLeft:
            length = min(self.growing.available - self.sent, SOCKET_CHUNK)
            if not length:
                self.endIfOver()
                return
            if length < MIN_CHUNK and not self._worthSending():
                self.waiting = True  # for a bigger chunk, or the end
                return
            self._chunkLeft = length
            prefix = wire.CHUNK_LENGTH.pack(length)
            try:
                written = transport.socket.send(prefix, socket.MSG_MORE)  # goes with the bytes
            except BlockingIOError:
                written = 0
            except OSError as e:
                self._broken(e.strerror)
                return
            if written < len(prefix):
                transport.write(prefix[written:])  # flushed before we are asked again
                return
        try:
            sent = self.growing.sendfile(transport.fileno(), self._chunkLeft)  # type: ignore[attr-defined]
        except BlockingIOError:
            sent = None
        except SourceBusy as busy:  # asked again once the disk has the bytes
            busy.whenReady.addCallback(self._sourceReady)
            return
        except OSError as e:
            self._broken(e.strerror)
            return
        if sent == 0:
            self._broken("the stored image ended inside an announced chunk")
            return
        if sent:
            self.sent += sent
            self._chunkLeft -= sent
        transport.startWriting()

    def _sourceReady(self, _: None) -> None:
        if not self.finished and self.transport.connected:
            self.transport.startWriting()

    def _broken(self, why: str | None) -> None:
        self.finish(None, Failure(ConnectionLost(why)))
        self.transport.abortConnection()


@implementer(IPushProducer)
class _WrittenChunks(_Chunks):
    """Any other transport (TLS): chunks read from the store and written."""

    def __init__(self, growing: IGrowingImage, transport: Any) -> None:
        super().__init__(growing, transport)
        self._paused = False

    def start(self) -> Deferred[int]:
        self.transport.registerProducer(self, True)
        self._pump()
        return self.done

    def changed(self) -> None:
        self._pump()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def _pump(self) -> None:
        while not self._paused and not self.finished:
            data = self.growing.read(WRITTEN_CHUNK)
            if not data:
                self.endIfOver()
                return
            self.waiting = False
            self.sent += len(data)
            self.transport.write(wire.CHUNK_LENGTH.pack(len(data)) + data)


class LiveTransfer:
    """
    An image being written, sent as chunks while it grows.  L{sendTo}
    fires with the image's size once its end is written, or fails with
    L{ImageAborted} (the end says "discard") or L{ConnectionLost}.
    """

    def __init__(self, growing: IGrowingImage) -> None:
        self._growing = growing
        self._chunks: _Chunks | None = None

    @property
    def sent(self) -> int:
        return 0 if self._chunks is None else self._chunks.sent

    @property
    def waiting(self) -> bool:
        """Waiting for criu, not for the link (no stall)."""
        return self._chunks is not None and self._chunks.waiting

    def sendTo(self, transport: Any) -> Deferred[int]:
        """Send the chunks after whatever C{transport} was given before."""
        assert self._chunks is None, "a LiveTransfer is sent once"
        if isinstance(transport, abstract.FileDescriptor) and hasattr(self._growing, "sendfile"):
            chunks: _Chunks = _SocketChunks(self._growing, transport)
            self._chunks = chunks
            return chunks.start()
        written = _WrittenChunks(self._growing, transport)
        self._chunks = written
        return written.start()
