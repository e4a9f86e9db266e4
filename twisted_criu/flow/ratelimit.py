# -*- test-case-name: tests.test_ratelimit -*-
"""
C{--rate-limit}: the proxy's link never carries more than a given number of
bytes per second, so that a migration does not starve production traffic.

One token bucket (L{TokenBucket}) for the whole daemon, and one
L{LinkThrottle} on each TCP connection of the link, installed by
L{RateLimitedEndpoint} right under TLS (or under the link protocol on a
plain link): every byte the connection's socket takes is paid for, after
TLS and after any compression, whichever path wrote it:

    - bytes written through the transport (TLS records, chunks of a
      growing image, a stored image read and written, headers) leave in
      the transport's C{writeSomeData}, which the throttle replaces;
    - the C{sendfile} path (L{twisted_criu.flow.sockets.SocketSendfile})
      asks L{throttleOf} its transport for an allowance before each piece,
      and the headers it sends ahead are charged (L{charge}).

Out of tokens, the connection stops writing and is woken by the reactor
clock once enough are due.  Over any interval of C{t} seconds the socket
takes at most C{rate * t + burst} bytes (plus, at most, the few header
bytes of the piece under way).  Without C{--rate-limit} nothing of this
module is on the path.

Like C{twisted_criu.flow._fastpath}, it steps outside Twisted's public API:
it replaces, on the connection itself, the C{writeSomeData} and
C{connectionLost} of Twisted's C{tcp.Connection} (and puts them back once
the connection is lost).  Twisted's own
C{twisted.protocols.policies.ThrottlingFactory} wraps the protocol
instead: the link would lose its C{sendfile} and read fast paths (they
need the socket's own transport), and it counts whole seconds, letting a
second's worth through at once.  C{tests.test_ratelimit} pins this module
against real sockets, plain and TLS.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

#: The burst is this many seconds' worth of the rate...
BURST_SECONDS = 1 / 20
#: ... but at least this many bytes.
MIN_BURST = 1 << 16
#: A connection out of tokens is woken at most this long after it stopped.
MAX_WAKE = 0.25
#: Fewer tokens than this (and than a wake's worth) are not worth a system call.
MIN_PIECE = 1 << 14
#: How far back the achieved rate looks (seconds), and the width of its bins.
RATE_WINDOW = 2.0
RATE_BIN = 0.05
#: Idle this long (more than a wake), the link's achieved rate starts afresh.
IDLE = 2 * MAX_WAKE

#: The throttle of each limited connection, until it is lost.
_throttles: dict[Any, LinkThrottle] = {}


class RateMeter:
    """
    Bytes per second lately: over the last L{RATE_WINDOW} seconds, or since
    sending began if that is later (after L{IDLE} seconds without a byte:
    a TLS handshake, then a link idle until criu writes, is not averaged in).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._bins: deque[list[float]] = deque()  # [start, bytes], RATE_BIN wide
        self._since = self._last = clock.seconds()

    def add(self, count: int) -> None:
        now = self.clock.seconds()
        if now - self._last >= IDLE or not self._bins:
            self._since = now
        self._last = now
        start = now - now % RATE_BIN
        bins = self._bins
        if bins and bins[-1][0] == start:
            bins[-1][1] += count
        else:
            bins.append([start, float(count)])
        while bins[0][0] <= now - RATE_WINDOW - RATE_BIN:
            bins.popleft()

    def rate(self) -> float:
        now = self.clock.seconds()
        if now - self._since < RATE_WINDOW:  # began within the window
            since = self._since - self._since % RATE_BIN
            total = sum(count for start, count in self._bins if start >= since)
            span = now - self._since
        else:
            total = sum(count for start, count in self._bins if start > now - RATE_WINDOW)
            span = RATE_WINDOW
        return total / max(span, RATE_BIN) if total else 0.0


class TokenBucket:
    """
    C{rate} bytes per second, at most C{burst} at once, on C{clock}.  Also
    says what was achieved: L{sent} in all, L{achieved} lately.

    @ivar quantum: the tokens a connection out of them waits for.
    """

    def __init__(self, clock: IReactorTime, rate: float, burst: int | None = None) -> None:
        if not rate > 0:
            raise ValueError("a rate limit must be above 0")
        self.clock = clock
        self.rate = float(rate)
        self.burst = burst if burst is not None else max(int(rate * BURST_SECONDS), MIN_BURST)
        self.quantum = max(1, int(min(self.burst / 2, self.rate * MAX_WAKE)))
        self.sent = 0
        self._tokens = float(self.burst)
        self._when = clock.seconds()
        self._meter = RateMeter(clock)

    def _refill(self) -> None:
        now = self.clock.seconds()
        if now > self._when:
            self._tokens = min(float(self.burst), self._tokens + (now - self._when) * self.rate)
            self._when = now

    def available(self) -> int:
        """Bytes that may go now (0 or less: none)."""
        self._refill()
        return int(self._tokens)

    def spend(self, count: int) -> None:
        """C{count} bytes went (the tokens may go below 0: a debt paid by waiting)."""
        self._refill()
        self._tokens -= count
        self.sent += count
        self._meter.add(count)

    def delayFor(self, count: int) -> float:
        """Seconds until C{count} bytes (at most a burst) may go."""
        self._refill()
        wanted = min(count, self.burst)
        return max(0.0, (wanted - self._tokens) / self.rate)

    def achieved(self) -> float:
        """Bytes per second sent lately (see L{RateMeter})."""
        return self._meter.rate()


class LinkThrottle:
    """
    Makes one TCP connection pay C{bucket}'s tokens for every byte its
    socket takes: see the module's docstring.  Removes itself when the
    connection is lost.
    """

    def __init__(self, bucket: TokenBucket, transport: tcp.Connection) -> None:
        self.bucket = bucket
        self._transport = transport
        self._wake: IDelayedCall | None = None
        self._plainWrite: Callable[[Any], Any] = transport.writeSomeData
        self._plainLost = transport.connectionLost
        setattr(transport, "writeSomeData", self._writeSomeData)
        setattr(transport, "connectionLost", self._connectionLost)
        _throttles[transport] = self

    def allowance(self) -> int:
        """
        Bytes the connection may send now.  0: none, and the transport will
        be asked to write again (C{startWriting}) once a wake's worth is due.
        """
        bucket = self.bucket
        tokens = bucket.available()
        if tokens >= min(MIN_PIECE, bucket.quantum):
            return tokens
        if self._wake is None:
            self._wake = bucket.clock.callLater(bucket.delayFor(bucket.quantum), self._woken)
        return 0

    def charge(self, count: int) -> None:
        """C{count} bytes went into the socket."""
        if count > 0:
            self.bucket.spend(count)

    def _woken(self) -> None:
        self._wake = None
        transport = self._transport
        if transport.connected and not transport.disconnected:
            transport.startWriting()

    def _writeSomeData(self, data: Any) -> Any:
        if not len(data):
            return self._plainWrite(data)
        allowed = self.allowance()
        if not allowed:
            self._transport.stopWriting()  # until woken
            return 0
        written = self._plainWrite(memoryview(data)[:allowed])
        if isinstance(written, int):
            self.charge(written)
        return written

    def _connectionLost(self, reason: Any) -> Any:
        transport = self._transport
        wake, self._wake = self._wake, None
        if wake is not None and wake.active():
            wake.cancel()
        for name in ("writeSomeData", "connectionLost"):
            vars(transport).pop(name, None)
        _throttles.pop(transport, None)
        return self._plainLost(reason)


def throttleOf(transport: object) -> LinkThrottle | None:
    """The throttle of C{transport}, if its rate is limited."""
    if not _throttles:
        return None
    try:
        return _throttles.get(transport)
    except TypeError:  # not hashable: never limited
        return None


def charge(transport: object, count: int) -> None:
    """C{count} bytes went into C{transport}'s socket past its C{write}."""
    throttle = throttleOf(transport)
    if throttle is not None:
        throttle.charge(count)


@implementer(IStreamClientEndpoint)
class RateLimitedEndpoint:
    """
    Connects with C{endpoint} (a TCP or UNIX stream endpoint; wrap TLS
    around this one, not this around TLS) and limits what each connection
    sends with C{bucket}, shared by all of them.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamClientEndpoint, bucket: TokenBucket) -> None:
        self._endpoint = endpoint
        self.bucket = bucket

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        def connected(protocol: Any) -> Any:
            transport = getattr(protocol, "transport", None)
            if isinstance(transport, tcp.Connection):
                LinkThrottle(self.bucket, transport)
            else:
                self.log.error(
                    "--rate-limit: cannot limit a {kind} connection; it goes unlimited",
                    kind=type(transport).__name__,
                )
            return protocol

        d: Deferred[Any] = self._endpoint.connect(factory)
        return d.addCallback(connected)


def describeRate(rate: float) -> str:
    """C{300 MB/s}, C{1.5 GB/s}, C{64 kB/s} (powers of 1000, as C{--rate-limit} takes them)."""
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if rate >= size:
            return f"{rate / size:.3g} {unit}"
    return f"{rate:.0f} B/s"
