# -*- test-case-name: tests.test_tls -*-
"""TLS stream endpoints for the cache's and the proxy's end of the link, wrapping any endpoint."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu.flow._fasttls import tlsFactory
from twisted_criu.link.tls.diagnostics import _isTLSError, describeFailure
from twisted_criu.link.tls.errors import DEFAULT_HANDSHAKE_TIMEOUT, TLSHandshakeFailed
from twisted_criu.link.tls.gate import _GateFactory, _HandshakeGate

# -- the cache's end ---------------------------------------------------------


class _ServerGate(_HandshakeGate):
    def authenticated(self) -> None:
        self.log.info(
            "TLS: proxy at {peer} authenticated as {subject}",
            peer=self.peer,
            subject=self.peerCertificate(),
        )

    def handshakeFailed(self, reason: Failure) -> None:
        self.log.error(
            "TLS: refused a connection from {peer}: handshake failed: {why}",
            peer=self.peer,
            why=describeFailure(reason, self.verifyProblem),
        )


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    Listens on any stream server endpoint and speaks TLS on each connection,
    with C{creator}'s certificate and peer checks.  A connection
    reaches C{factory}'s protocol only after a successful handshake; a failed
    one is logged and dropped.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: IStreamServerEndpoint,
        creator: IOpenSSLServerConnectionCreator | ssl.CertificateOptions,
        handshakeTimeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self._creator = creator
        self.handshakeTimeout = handshakeTimeout

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        gates = _GateFactory(
            factory, lambda p: _ServerGate(p, self._reactor, self.handshakeTimeout)
        )
        return self._endpoint.listen(tlsFactory(self._creator, False, gates))


# -- the proxy's end ---------------------------------------------------------


class _ClientGate(_HandshakeGate):
    def __init__(
        self, wrapped: IProtocol, clock: IReactorTime, timeout: float, endpoint: TLSClientEndpoint
    ) -> None:
        super().__init__(wrapped, clock, timeout)
        self._endpoint = endpoint
        self.ready: Deferred[IProtocol] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[IProtocol]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def authenticated(self) -> None:
        self.log.info(
            "TLS: the cache at {where} is {subject}",
            where=self._endpoint.description,
            subject=self.peerCertificate(),
        )

    def handshakeSucceeded(self) -> None:
        self.ready.callback(self.wrapped)

    def handshakeFailed(self, reason: Failure) -> None:
        if not self.ready.called:
            # The caller (ClientService, through LoggingClientEndpoint) logs
            # this as a failed attempt and retries with backoff.
            why = describeFailure(reason, self.verifyProblem)
            self.ready.errback(TLSHandshakeFailed(f"TLS handshake failed: {why}"))

    def closed(self, reason: Failure) -> None:
        if _isTLSError(reason):
            # In TLS 1.3 the cache checks our certificate after our side of
            # the handshake is done: its refusal arrives here.
            self._endpoint.rejections += 1
            self.log.error(
                "TLS: the cache at {where} dropped the link: {why}",
                where=self._endpoint.description,
                why=describeFailure(reason),
            )
        else:
            self._endpoint.rejections = 0


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """
    Connects with any stream client endpoint and speaks TLS over it.
    C{connect} fires only once the handshake has succeeded, and fails with
    L{TLSHandshakeFailed} (saying why) if it does not, so that
    L{ClientService<twisted.application.internet.ClientService>} counts a
    refused handshake as a failed attempt.

    @ivar rejections: consecutive links the peer dropped with a TLS error
        after our side of the handshake was done (see L{backoff}).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: IStreamClientEndpoint,
        creator: IOpenSSLClientConnectionCreator | ssl.CertificateOptions,
        handshakeTimeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        description: str = "(unnamed endpoint)",
    ) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self._creator = creator
        self.handshakeTimeout = handshakeTimeout
        self.description = description
        self.rejections = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        gates = _GateFactory(
            factory,
            lambda p: _ClientGate(p, self._reactor, self.handshakeTimeout, self),
        )
        d: Deferred[Any] = self._endpoint.connect(tlsFactory(self._creator, True, gates))

        def connected(tlsProtocol: TLSMemoryBIOProtocol) -> Deferred[IProtocol]:
            gate = tlsProtocol.wrappedProtocol
            assert isinstance(gate, _ClientGate)
            return gate.ready

        return d.addCallback(connected)

    def backoff(self, policy: Callable[[int], float]) -> Callable[[int], float]:
        """
        C{policy} (a L{ClientService<twisted.application.internet.ClientService>}
        retry policy), also backing off over links refused after the
        handshake: to C{ClientService} those look like successful
        connections, which reset its attempt count.
        """
        return lambda attempt: policy(attempt + self.rejections)
