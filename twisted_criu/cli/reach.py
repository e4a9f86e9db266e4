# -*- test-case-name: tests.test_cli_errors,tests.test_cli_probe -*-
"""
Reaching a peer, for the C{twisted-criu} command: why a connection failed,
in words, and L{probe}, which tells a TLS peer from a plain one (and from
one that turns this host away) after a connection went wrong.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TCPTimedOutError,
    TimeoutError,
)
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from twisted_criu import filelimit


def whyUnreachable(reason: Failure) -> str:
    """Why a connection attempt failed, in a few words."""
    value = reason.value
    if filelimit.exhausted(value):
        return filelimit.advice(value)
    if reason.check(DNSLookupError):
        return "no such host (DNS lookup failed)"
    if reason.check(ConnectionRefusedError):
        return "connection refused"
    if reason.check(NoRouteError):
        return "no route to host"
    if reason.check(TCPTimedOutError, TimeoutError):
        return "no answer (the connection timed out)"
    if reason.check(ConnectError):
        code = getattr(value, "osError", None)
        if isinstance(code, int):
            return os.strerror(code)
        return reason.getErrorMessage().rstrip(".")
    return reason.getErrorMessage()


class Answer(Enum):
    """What L{probe} found at the other end."""

    #: No connection at all.
    UNREACHABLE = "unreachable"
    #: It accepted, then closed before we said anything (an --allow-from refusal).
    TURNED_AWAY = "turned away"
    #: It answered a TLS ClientHello with a TLS handshake record.
    TLS = "tls"
    #: It dropped a TLS ClientHello, or answered something else: plain TCP.
    PLAIN = "plain"
    #: It kept the connection open and said nothing.
    SILENT = "silent"


def clientHello() -> bytes:
    """The first bytes a TLS client sends (a ClientHello record)."""
    connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    connection.set_connect_state()
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(1 << 16)


def looksLikeTLSHandshake(data: bytes) -> bool:
    """A TLS handshake record (a ServerHello is one) starts 0x16 0x03."""
    return data[:1] == b"\x16" and data[1:2] == b"\x03"


class _Listener(Protocol):
    """Collects the first bytes the peer sends, and notices when it closes."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = False
        self._waiters: list[Deferred[None]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data[: 16 - len(self.received)]
        self._wake()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def waitFor(self, clock: IReactorTime, seconds: float) -> Deferred[None]:
        """Fires when the peer sends or closes, or after C{seconds}."""
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        call = clock.callLater(seconds, self._wake)
        d.addBoth(lambda result: call.cancel() if call.active() else None)
        return d


@inlineCallbacks
def probe(
    clock: IReactorTime,
    endpoint: IStreamClientEndpoint,
    grace: float = 0.3,
    answer: float = 3.0,
) -> Any:
    """
    Connect to C{endpoint} (plain, whatever the link speaks), wait C{grace}
    seconds (a peer that turns this host away closes at once), then send a
    TLS ClientHello and see what comes back within C{answer} seconds.

    @return: a L{Deferred} firing with an L{Answer}.
    """
    listener = _Listener()
    try:
        yield endpoint.connect(Factory.forProtocol(lambda: listener))
    except Exception:
        return Answer.UNREACHABLE
    transport: Any = listener.transport
    try:
        yield listener.waitFor(clock, grace)
        if listener.closed or listener.received:
            return Answer.TURNED_AWAY if listener.closed and not listener.received else Answer.PLAIN
        transport.write(clientHello())
        while not listener.closed and len(listener.received) < 2:
            before = len(listener.received)
            yield listener.waitFor(clock, answer)
            if len(listener.received) == before and not listener.closed:
                break  # nothing more within the time given
        if looksLikeTLSHandshake(listener.received):
            return Answer.TLS
        if listener.received or listener.closed:
            return Answer.PLAIN
        return Answer.SILENT
    finally:
        if not listener.closed:
            transport.abortConnection()
