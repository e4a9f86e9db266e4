# -*- test-case-name: tests.test_systemd -*-
"""
Running under systemd: listening UNIX sockets inherited from a socket unit
(the C{systemd:domain=UNIX:...} endpoints), and readiness for
C{Type=notify} services.

Twisted adopts an inherited UNIX socket as if it had bound it itself: it
makes the socket file world-writable (mode 0666, whatever the unit's
C{SocketMode=} says), and removes it when it stops listening, which
systemd.socket(5) forbids ("it must not unlink the socket from a file
system"): the socket unit still listens, but no client can reach it, so
the service is never activated again.  L{keepSocketFile} swaps Twisted's
endpoint for one that does neither.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any, Mapping

from twisted.internet import error, fdesc, tcp, unix
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()


def _modeOf(path: str | bytes, default: int) -> int:
    """The permission bits of the socket file at C{path} (C{default} for an abstract socket)."""
    if path[:1] in ("\0", b"\0"):
        return default
    return stat.S_IMODE(os.stat(path).st_mode)


class _InheritedUNIXPort(unix.Port):
    """
    A listening UNIX socket someone else bound: its file keeps its mode
    (Twisted chmods the socket file when it starts listening: to its own
    mode, here) and is left in place when the port stops.
    """

    def __init__(
        self,
        fileName: str | bytes,
        factory: IProtocolFactory,
        backlog: int = 50,
        mode: int = 0o666,
        reactor: Any = None,
        wantPID: int = 0,
    ) -> None:
        super().__init__(fileName, factory, backlog, _modeOf(fileName, mode), reactor, wantPID)  # type: ignore[arg-type]

    def connectionLost(self, reason: Failure) -> None:
        # unix.Port's would remove the socket file, then do tcp.Port's.
        tcp.Port.connectionLost(self, reason)


@implementer(IStreamServerEndpoint)
class InheritedUNIXServerEndpoint:
    """
    A server endpoint on a listening UNIX socket inherited as descriptor
    C{fileno} (from systemd), used as it is: its file keeps its mode and
    stays when the daemon stops listening.  It can listen once.
    """

    def __init__(self, reactor: Any, fileno: int) -> None:
        self.reactor = reactor
        self.fileno = fileno
        self._used = False

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        if self._used:
            return fail(error.AlreadyListened())
        self._used = True
        try:
            fdesc.setNonBlocking(self.fileno)
            port = _InheritedUNIXPort._fromListeningDescriptor(self.reactor, self.fileno, factory)
            port.startListening()
            os.close(self.fileno)  # the port holds its own duplicate
        except BaseException:
            return fail()
        return succeed(port)


def keepSocketFile(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
    """
    C{endpoint}, but if it is Twisted's for an inherited UNIX socket (what
    C{systemd:domain=UNIX:...} gives), an L{InheritedUNIXServerEndpoint}
    on the same descriptor instead.
    """
    if isinstance(endpoint, AdoptedStreamServerEndpoint) and endpoint.addressFamily == socket.AF_UNIX:
        return InheritedUNIXServerEndpoint(endpoint.reactor, endpoint.fileno)
    return endpoint


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """
    Tell systemd C{state} (C{"READY=1"}, C{"STOPPING=1"}) on the socket
    C{$NOTIFY_SOCKET} names, as sd_notify(3) does; nothing if it names
    none (not a C{Type=notify} service).  Returns whether it was sent; a
    failure is logged, not raised.
    """
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode("utf-8"))
    except OSError as e:
        log.warn("cannot tell systemd {state!r} on NOTIFY_SOCKET {path}: {why}", state=state, path=path, why=e.strerror)
        return False
    return True
