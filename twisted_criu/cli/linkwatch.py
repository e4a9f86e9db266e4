# -*- test-case-name: tests.test_cli_errors,tests.test_cli_probe -*-
"""
How C{twisted-criu push} watches its link to the cache: every attempt and
every connection goes through L{WatchedEndpoint}, which remembers what went
wrong and fails the push at once when trying again cannot help (a refused
first connection, a host that does not resolve, a TLS/plain mismatch, a
cache that turns this host away, a failed TLS handshake).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu.cli.reach import Answer, probe, whyUnreachable
from twisted_criu.link.sender import RemoteSender
from twisted_criu.link.tls import TLSHandshakeFailed


@implementer(IStreamClientEndpoint)
class WatchedEndpoint:
    """
    The cache's endpoint as push dials it (C{endpoint}, perhaps TLS around
    C{raw}, the plain stream to the same place).

    @ivar connections: connections made (for TLS: handshakes completed).
    @ivar drops: connections the cache ended before the push was done.
    @ivar problem: the last thing that went wrong, in words.
    @ivar stopping: push is ending the link itself: nothing is wrong.
    @ivar ending: says whether the session is ending the link itself.
    """

    def __init__(
        self,
        clock: IReactorTime,
        endpoint: IStreamClientEndpoint,
        raw: IStreamClientEndpoint,
        where: str,
        security: str,
        fail: Callable[[str], None],
    ) -> None:
        """
        @param security: how the link is secured: C{"plain"}, C{"key"}
            (the link key) or C{"tls"} (C{--tls} certificates).
        @param fail: called, once, with why the push cannot succeed.
        """
        self._clock = clock
        self._endpoint = endpoint
        self._raw = raw
        self.where = where
        self.security = security
        self._fail = fail
        self.connections = 0
        self.drops = 0
        self.problem: str | None = None
        self.stopping = False
        self.ending: Callable[[], bool] = lambda: False
        self._failed = False
        self._probing: Deferred[None] | None = None

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        d: Deferred[Any] = self._endpoint.connect(factory)
        return d.addCallbacks(self._connected, self._attemptFailed)

    def settled(self) -> Deferred[None]:
        """Fires once no diagnosis is under way."""
        probing = self._probing
        if probing is None:
            return succeed(None)
        d: Deferred[None] = Deferred()

        def done(result: object) -> object:
            d.callback(None)
            return result

        probing.addBoth(done)
        return d

    def failWith(self, why: str) -> None:
        if not self._failed and not self.stopping:
            self._failed = True
            self._fail(why)

    # -- attempts and connections --------------------------------------------

    def _attemptFailed(self, reason: Failure) -> Failure:
        self.problem = whyUnreachable(reason)
        if reason.check(DNSLookupError):
            self.failWith(f"cannot reach the cache at {self.where}: {self.problem}; check the host name")
        elif reason.check(ConnectionRefusedError) and not self.connections:
            self.failWith(
                f"the cache at {self.where} refused the connection: is criu-cache running"
                " there, listening on that port (its --port, or --listen)?"
            )
        elif reason.check(TLSHandshakeFailed):
            self.problem = str(reason.value)
            self._diagnose(str(reason.value))
        return reason

    def _connected(self, protocol: Any) -> Any:
        self.connections += 1
        # (ClientService hands out a proxy of the RemoteSender: duck typing.)
        whenLost = getattr(protocol, "whenLost", None)
        if whenLost is not None:
            whenLost().addCallback(lambda _: self._lost(protocol))
        return protocol

    def _lost(self, sender: RemoteSender) -> None:
        if self.stopping or self.ending():
            return
        self.drops += 1
        if sender.extended:
            self.problem = "the cache dropped the link (its log says why)"
        else:
            self.problem = "the cache closed the link without a word"
            if self.security == "plain":
                self._diagnose(None)

    # -- what is at the other end -------------------------------------------

    def _diagnose(self, handshake: str | None) -> None:
        """Probe the cache (once at a time) and fail if retrying cannot help."""
        if self._probing is not None or self._failed:
            return
        d = probe(self._clock, self._raw)
        d.addCallback(self._judge, handshake)
        d.addErrback(lambda reason: None)
        d.addBoth(self._probed)
        self._probing = d

    def _probed(self, result: object) -> None:
        self._probing = None

    def _judge(self, answer: Answer, handshake: str | None) -> None:
        plain = self.security == "plain"
        if answer is Answer.TURNED_AWAY:
            self.failWith(
                f"the cache at {self.where} closes connections from this host at once:"
                " is this host in its --allow-from? (its log says why)"
            )
        elif answer is Answer.TLS and plain:
            self.failWith(
                f"the cache at {self.where} speaks TLS: drop --plain-link"
                " (give --tls too if the cache was started with --tls)"
            )
        elif answer is Answer.PLAIN and not plain:
            dropped = "--tls" if self.security == "tls" else "the link key"
            self.failWith(
                f"the cache at {self.where} speaks plain TCP: give --plain-link"
                f" (it was started with --plain-link, or is one of CRIU's C daemons; {dropped} is not used then)"
            )
        elif answer is Answer.TLS and handshake is not None:
            self.failWith(f"cannot open the link to the cache at {self.where}: {handshake}")
        elif answer is Answer.SILENT and not plain:
            self.failWith(
                f"the cache at {self.where} accepted the connection but does not answer"
                " a TLS handshake: is it a criu-cache?"
            )
