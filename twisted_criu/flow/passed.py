# -*- test-case-name: tests.test_filelimit -*-
"""
Descriptors criu passes with C{SCM_RIGHTS}, and the ones the kernel drops.

When the receiving process has no descriptor left (C{EMFILE}), the kernel
does not fail C{recvmsg}: it delivers the byte that carried the pipe,
closes the pipe, and says so only in the C{MSG_CTRUNC} flag, which
Twisted's UNIX transport does not look at.  A criu connection would then
see a request with no pipe, or worse, take the carrier byte for an inline
image.  L{DroppedDescriptors} replaces such a connection's C{doRead} (as
L{twisted_criu.flow._fastpath.BufferedReads} does for the link) with the
same read that also checks the flag.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Callable

from twisted.internet import main, unix
from twisted.python.sendmsg import SCM_RIGHTS, recvmsg
from twisted.python.util import untilConcludes

_FD = struct.Struct("i")


class DroppedDescriptors:
    """
    A UNIX connection's C{doRead} replaced: as Twisted's, it hands every
    passed descriptor to the protocol's C{fileDescriptorReceived}, then the
    bytes to its C{dataReceived}; in between, if the kernel dropped
    descriptors (C{MSG_CTRUNC}), it calls C{dropped()}: the bytes that
    follow include the byte that carried the lost descriptor.
    Restored by L{restore} (call it from C{connectionLost}).
    """

    def __init__(self, transport: unix.Server, dropped: Callable[[], None]) -> None:
        self._transport: unix.Server | None = transport
        self._dropped = dropped
        setattr(transport, "doRead", self._doRead)

    @classmethod
    def install(cls, transport: object, dropped: Callable[[], None]) -> DroppedDescriptors | None:
        """Watch C{transport} if it is a UNIX connection of the reactor's; else L{None}."""
        if not isinstance(transport, unix.Server):
            return None
        return cls(transport, dropped)

    def _doRead(self) -> Any:
        transport = self._transport
        assert transport is not None
        try:
            data, ancillary, flags = untilConcludes(recvmsg, transport.socket, transport.bufferSize)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        protocol: Any = transport.protocol
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SCM_RIGHTS:
                for (fd,) in _FD.iter_unpack(payload[: len(payload) - len(payload) % _FD.size]):
                    protocol.fileDescriptorReceived(fd)
        if flags & socket.MSG_CTRUNC:
            self._dropped()
        if not data:
            return main.CONNECTION_DONE
        protocol.dataReceived(data)
        return None

    def restore(self) -> None:
        """Give the connection its own C{doRead} back (no cycle through the protocol)."""
        transport, self._transport = self._transport, None
        if transport is not None and vars(transport).get("doRead") == self._doRead:
            del vars(transport)["doRead"]
