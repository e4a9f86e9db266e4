# -*- test-case-name: tests.test_tls -*-
"""The handshake gate: the link protocol hears of a connection only once the peer has proven who it is."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import ssl
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from twisted_criu.interfaces import ITransientDataReceiver
from twisted_criu.link.tls.diagnostics import _describeCertificate, _describeName
from twisted_criu.link.tls.errors import TLSHandshakeFailed

# -- the handshake gate ------------------------------------------------------


@implementer(IHandshakeListener)
class _HandshakeGate(Protocol):
    """
    Sits between
    L{TLSMemoryBIOProtocol<twisted.protocols.tls.TLSMemoryBIOProtocol>} and
    the real protocol, and connects the real protocol only once the
    handshake has succeeded.  Its transport
    is then the TLS protocol itself, exactly as without the gate.
    """

    log = Logger()
    transport: Any

    def __init__(self, wrapped: IProtocol, clock: IReactorTime, timeout: float) -> None:
        self.wrapped = wrapped
        if ITransientDataReceiver.providedBy(wrapped):  # it passes data through as it comes
            alsoProvides(self, ITransientDataReceiver)
        self._clock = clock
        self._timeout = timeout
        self._timer: IDelayedCall | None = None
        self.open = False
        self.failed = False
        self.peer = "?"
        #: Why the peer's certificate failed to verify, if it did.
        self.verifyProblem: str | None = None

    def connectionMade(self) -> None:
        self.peer = _describeAddress(self.transport.getPeer())
        self._timer = self._clock.callLater(self._timeout, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        self._failed(Failure(TLSHandshakeFailed(f"no TLS handshake within {self._timeout:g} s")))
        self.transport.abortConnection()

    def _failed(self, reason: Failure) -> None:
        """Report a failed handshake, once."""
        if not self.failed:
            self.failed = True
            self.handshakeFailed(reason)

    def _stopTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def handshakeCompleted(self) -> None:
        self._stopTimer()
        if self.transport.disconnecting:  # verification failed; connectionLost says why
            return
        self.open = True
        self.authenticated()
        self.wrapped.makeConnection(self.transport)
        self.handshakeSucceeded()

    def dataReceived(self, data: bytes) -> None:
        if self.open:
            self.wrapped.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._stopTimer()
        if self.open:
            self.open = False
            self.wrapped.connectionLost(reason)
            self.closed(reason)
        else:
            if self.verifyProblem is None:
                self.verifyProblem = self._peerChainProblem()
            self._failed(reason)

    def _peerChainProblem(self) -> str | None:
        """Who the peer claimed to be, if its certificate failed to verify."""
        try:
            chain = self.transport.getHandle().get_peer_cert_chain()
        except Exception:
            return None
        if not chain:
            return None
        return f"it presented {_describeCertificate(chain[0])}"

    def peerCertificate(self) -> str:
        try:
            return _describeName(ssl.Certificate.peerFromTransport(self.transport))
        except Exception:
            return "?"

    # Overridden by each side.

    def authenticated(self) -> None:
        pass

    def handshakeSucceeded(self) -> None:
        pass

    def handshakeFailed(self, reason: Failure) -> None:
        pass

    def closed(self, reason: Failure) -> None:
        pass


def _describeAddress(address: Any) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    return str(getattr(address, "name", None) or address)


class _GateFactory(Factory):
    """Builds the real factory's protocols, each behind a gate."""

    noisy = False

    def __init__(self, wrapped: IProtocolFactory, gate: Callable[[IProtocol], _HandshakeGate]) -> None:
        self.wrapped = wrapped
        self._gate = gate

    def logPrefix(self) -> str:
        prefix = getattr(self.wrapped, "logPrefix", None)
        return str(prefix()) if callable(prefix) else type(self.wrapped).__name__

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> _HandshakeGate | None:
        protocol = self.wrapped.buildProtocol(addr)
        if protocol is None:
            return None
        return self._gate(protocol)
