# -*- test-case-name: tests.test_transactions -*-
"""
Has everything criu wrote reached the daemon?

criu's post-dump hook runs once criu has written and closed every image,
but the daemon may not have read it all yet: bytes in a socket, a
connection not yet accepted, a pipe not yet at EOF.  The proxy confirms a
dump only once its criu connections are I{settled}: nothing unread in the
kernel, nothing unprocessed in the protocols (writes in progress are the
registry's to count).
"""

from __future__ import annotations

import fcntl
import select
import struct
import termios
from typing import Any, Iterable, Protocol as TypingProtocol

from twisted.internet.protocol import Factory, Protocol


def unreadBytes(transport: Any) -> int:
    """Bytes waiting in C{transport}'s socket that the reactor has not read yet."""
    try:
        fd = transport.fileno()
    except Exception:
        return 0
    if fd < 0:
        return 0
    try:
        raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    count: int = struct.unpack("i", raw)[0]
    return count


def connectionsWaiting(port: Any) -> bool:
    """Does listening C{port} have a connection the reactor has not accepted yet?"""
    try:
        fd = port.fileno()
    except Exception:
        return False
    if fd < 0:
        return False
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable)


class Settling(TypingProtocol):
    """A criu connection that can tell whether it holds unprocessed input."""

    @property
    def settled(self) -> bool:
        """Nothing criu sent on this connection waits to be processed."""


class LiveConnections(Factory):
    """A factory that knows its live protocols (each removes itself when it is lost)."""

    def __init__(self) -> None:
        self.live: set[Protocol] = set()

    def track(self, protocol: Protocol) -> Protocol:
        protocol.factory = self
        self.live.add(protocol)
        return protocol


def forget(protocol: Protocol) -> None:
    """C{protocol}'s connection is lost: its factory stops tracking it."""
    factory = getattr(protocol, "factory", None)
    if isinstance(factory, LiveConnections):
        factory.live.discard(protocol)


def settled(ports: Iterable[Any], connections: Iterable[Settling]) -> bool:
    """No connection waits on C{ports}, and every one of C{connections} is settled."""
    return not any(connectionsWaiting(port) for port in ports) and all(
        each.settled for each in connections
    )
