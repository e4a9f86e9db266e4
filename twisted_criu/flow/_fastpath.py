# -*- test-case-name: tests.test_fastpath -*-
"""
Every step twisted-criu takes outside Twisted's public API, to move image
bytes without copying them through Python more than once.

Each needs the transport to be a L{twisted.internet.abstract.FileDescriptor}
(what the epoll, poll and select reactors give on Linux: TCP, UNIX, our
pipes); L{onDescriptor} says whether it is, and where it is not (TLS,
iosim, C{StringTransport}) callers take the plain path through
C{write}/C{dataReceived}.  C{tests.test_fastpath} pins each step against
real sockets and pipes.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, TypeGuard

from twisted.internet import abstract, main, tcp

from twisted_criu.flow.ratelimit import charge, throttleOf

_buffers: dict[int, memoryview] = {}


def onDescriptor(transport: object) -> TypeGuard[abstract.FileDescriptor]:
    """Is C{transport} a reactor descriptor the kernel can write into directly?"""
    return isinstance(transport, abstract.FileDescriptor)


def descriptorOf(transport: abstract.FileDescriptor) -> int:
    """The descriptor to C{sendfile} into."""
    fd: int = transport.fileno()
    return fd


def askWhenWritable(transport: abstract.FileDescriptor) -> None:
    """
    Have the reactor call C{transport.doWrite} once it can write: with its
    buffer empty, it then asks its pull producer for more.
    """
    transport.startWriting()


def bufferEmpty(transport: abstract.FileDescriptor) -> bool:
    """Has C{transport} written out all it was given with C{write}?"""
    return not transport.dataBuffer and not transport._tempDataLen


def sendAhead(transport: Any, data: bytes) -> bool:
    """
    Put C{data} on C{transport}'s socket with C{MSG_MORE}, so that it
    leaves in one segment with the C{sendfile} that follows.  L{True} if
    all of it went; else the rest waits in the transport's buffer, and the
    caller must wait to be asked again (once it is flushed) before sending
    more.  Not a socket (a plain fallback): written, and L{False}.
    """
    if not isinstance(transport, tcp.Connection):
        transport.write(data)
        return False
    try:
        written = transport.socket.send(data, socket.MSG_MORE)
    except BlockingIOError:
        written = 0
    charge(transport, written)  # --rate-limit
    if written < len(data):
        transport.write(data[written:])
        return False
    return True


def writeNow(transport: Any, data: Any) -> None:
    """
    Write C{data} (any buffer; it may be reused once this returns) to
    C{transport}: straight into its socket while nothing waits in the
    transport's buffer, so that only what the socket does not take now is
    copied (C{write} copies every byte, then joins its list: two copies).
    A transport that is not a TCP or UNIX connection, a rate-limited one,
    or one with bytes waiting gets it all through C{write}.
    """
    view = memoryview(data)
    if (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and throttleOf(transport) is None
        and bufferEmpty(transport)
    ):
        try:
            written = transport.socket.send(view)
        except OSError:  # full now, or broken: C{write}'s path finds out
            written = 0
        view = view[written:]
    if len(view):
        transport.write(bytes(view))


def sharedBuffer(size: int) -> memoryview:
    """
    One buffer of C{size} bytes for the whole process: the reactor runs
    one read at a time, and whoever gets the bytes copies them before the
    read returns.
    """
    if size not in _buffers:
        _buffers[size] = memoryview(bytearray(size))
    return _buffers[size]


class BufferedReads:
    """
    A TCP connection's C{doRead} replaced: while C{size()} says how much
    to read, reads go with C{recv_into} into a reused buffer (a fresh
    C{bytes} per read costs more than the copy itself: page faults, and
    mmap churn for reads of 128 KiB and more) and the view is handed to
    C{received}, which must not keep it.  While C{size()} is 0, Twisted's
    own C{doRead}.  The connection's C{doRead} is restored once a read
    ends the connection, or by L{restore} (call it from C{connectionLost}).
    """

    def __init__(
        self,
        transport: tcp.Connection,
        size: Callable[[], int],
        received: Callable[[memoryview], None],
        bufferSize: int,
    ) -> None:
        self._transport: tcp.Connection | None = transport
        self._size = size
        self._received = received
        self._buffer = sharedBuffer(bufferSize)
        self._plainRead: Callable[[], Any] = transport.doRead
        setattr(transport, "doRead", self._doRead)

    @classmethod
    def install(
        cls,
        transport: object,
        size: Callable[[], int],
        received: Callable[[memoryview], None],
        bufferSize: int,
    ) -> BufferedReads | None:
        """Replace C{transport}'s reads if it is a TCP (or UNIX) connection; else L{None}."""
        if not isinstance(transport, tcp.Connection):
            return None
        return cls(transport, size, received, bufferSize)

    def _doRead(self) -> Any:
        transport = self._transport
        assert transport is not None
        size = min(self._size(), len(self._buffer))
        if not size:
            why = self._plainRead()
        else:
            view = self._buffer[:size]
            try:
                count = transport.socket.recv_into(view)
            except BlockingIOError:
                return None
            except OSError:
                why = main.CONNECTION_LOST
            else:
                if count:
                    self._received(view[:count])
                    return None
                why = main.CONNECTION_DONE
        if why is not None:
            self.restore()
        return why

    def restore(self) -> None:
        """Give the connection its own C{doRead} back (no cycle through the protocol)."""
        transport, self._transport = self._transport, None
        if transport is not None and vars(transport).get("doRead") == self._doRead:
            del vars(transport)["doRead"]
