# -*- test-case-name: tests.test_tls -*-
"""
Mutual TLS on the proxy -> cache link, with the flags of CRIU's page server
(C{--tls}, C{--tls-cacert}, C{--tls-cert}, C{--tls-key},
C{--tls-no-cn-verify}).

Both ends present a certificate and check the other's against a CA.  The
proxy also checks that the cache's certificate names the host it dialled
(unless told not to).  The wrapping is Twisted's own (L{TLSMemoryBIOFactory}
around whatever stream endpoint the user gave), with one addition: the link
protocol is told about a connection only once the TLS handshake has
succeeded.  Until then a peer has not proven who it is, so the cache must not
let it touch a session (even a connect that goes nowhere would otherwise
reopen a finished one), and the proxy must not count it as a link.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Callable

from attrs import frozen
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

#: CRIU's defaults for the page server's --tls-cacert, --tls-cert, --tls-key.
DEFAULT_CACERT = "/etc/pki/CA/cacert.pem"
DEFAULT_CERT = "/etc/pki/criu/cert.pem"
DEFAULT_KEY = "/etc/pki/criu/private/key.pem"

#: Seconds a TLS handshake may take before the connection is dropped.
DEFAULT_HANDSHAKE_TIMEOUT = 60.0

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


class TLSSetupError(Exception):
    """A certificate or key file is missing, unreadable or unusable."""


class TLSHandshakeFailed(Exception):
    """The TLS handshake with the peer failed; the message says why."""


# -- credentials -------------------------------------------------------------


@frozen
class TLSCredentials:
    """
    What one end needs for mutual TLS.

    @ivar authorities: the CA certificates a peer's certificate must chain to.
    @ivar certificate: this end's certificate and private key.
    @ivar chain: intermediate CA certificates sent after C{certificate}.
    """

    authorities: tuple[ssl.Certificate, ...]
    certificate: ssl.PrivateCertificate
    chain: tuple[ssl.Certificate, ...] = ()

    def trustRoot(self) -> Any:
        return ssl.trustRootFromCertificates(list(self.authorities))

    def describe(self) -> str:
        """For the log: who we are, and whom we trust."""
        trusted = "; ".join(_describeName(a) for a in self.authorities)
        return f"our certificate {_describeName(self.certificate)}; peers must chain to {trusted}"


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSSetupError(f"{option} {path}: cannot read it: {e.strerror}") from None


def _certificates(option: str, path: str, data: bytes) -> list[ssl.Certificate]:
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise TLSSetupError(f"{option} {path}: no PEM certificate in it")
    certificates = []
    for block in blocks:
        try:
            certificates.append(ssl.Certificate.loadPEM(block))
        except (SSL.Error, crypto.Error) as e:
            raise TLSSetupError(f"{option} {path}: not a valid certificate ({_sslReasons(e)})") from None
    return certificates


def _describeName(certificate: ssl.Certificate) -> str:
    subject = certificate.original.to_cryptography().subject
    return subject.rfc4514_string() or "(empty subject)"


def loadCredentials(
    cacert: str,
    cert: str,
    key: str,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> TLSCredentials:
    """
    Read PEM files: CA certificates (one or more), this end's certificate
    (optionally followed by intermediates) and its unencrypted private key.

    @raise TLSSetupError: with a message naming the option and the file.
    """
    from cryptography.hazmat.primitives import serialization

    authorities = _certificates("--tls-cacert", cacert, _read("--tls-cacert", cacert))
    own = _certificates("--tls-cert", cert, _read("--tls-cert", cert))
    keyData = _read("--tls-key", key)
    try:
        # cryptography, not pyOpenSSL: an encrypted key is an error here,
        # where OpenSSL would prompt for a passphrase on the terminal.
        privateKey = serialization.load_pem_private_key(keyData, password=None)
    except TypeError:
        raise TLSSetupError(
            f"--tls-key {key}: the key is encrypted; give an unencrypted key"
            " (readable by this daemon's user only)"
        ) from None
    except (ValueError, Exception) as e:
        raise TLSSetupError(f"--tls-key {key}: not a PEM private key ({e})") from None
    leaf = own[0].original.to_cryptography()
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != privateKey.public_key().public_bytes(*spki):
        raise TLSSetupError(f"--tls-key {key} is not the key of --tls-cert {cert}")
    expiry = leaf.not_valid_after_utc
    if expiry < now():
        raise TLSSetupError(f"--tls-cert {cert} expired on {expiry:%Y-%m-%d %H:%M} UTC")
    for authority in authorities:
        if not authority.original.to_cryptography().not_valid_after_utc > now():
            raise TLSSetupError(
                f"--tls-cacert {cacert}: the CA certificate {_describeName(authority)} has expired"
            )
    keyPair = ssl.KeyPair(crypto.PKey.from_cryptography_key(privateKey))  # type: ignore[arg-type]
    certificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(own[0], keyPair)
    return TLSCredentials(tuple(authorities), certificate, tuple(own[1:]))


# -- connection creators -----------------------------------------------------


def serverConnectionCreator(credentials: TLSCredentials) -> IOpenSSLServerConnectionCreator:
    """
    The cache's TLS options: present its certificate, and require one from
    the proxy that chains to the CA (no name check: the proxy dials out from
    wherever it is).
    """
    return _RecordingServerCreator(
        ssl.CertificateOptions(
            privateKey=credentials.certificate.privateKey.original,
            certificate=credentials.certificate.original,
            extraCertChain=[c.original for c in credentials.chain],
            trustRoot=credentials.trustRoot(),  # implies verify and requireCertificate
        )
    )


@implementer(IOpenSSLServerConnectionCreator)
class _RecordingServerCreator:
    """
    L{ssl.CertificateOptions}' connections, with the same checks, plus a
    verify callback that notes which certificate failed and why, for the
    log: OpenSSL itself only says "certificate verify failed".
    """

    def __init__(self, options: ssl.CertificateOptions) -> None:
        self.options = options

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        context = self.options.getContext()
        connection = SSL.Connection(context, None)
        gate = tlsProtocol.wrappedProtocol

        def verify(conn: SSL.Connection, certificate: Any, error: int, depth: int, ok: int) -> bool:
            if not ok and isinstance(gate, _HandshakeGate) and gate.verifyProblem is None:
                gate.verifyProblem = _describeVerifyError(certificate, error)
            return bool(ok)

        connection.set_verify(context.get_verify_mode(), verify)
        return connection


#: OpenSSL's X509_V_ERR_* texts for what goes wrong in practice.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}


def _describeVerifyError(certificate: Any, error: int) -> str:
    why = _VERIFY_ERRORS.get(error, f"X509 verify error {error}")
    return f"{why}: {_describeCertificate(certificate)}"


def _describeCertificate(certificate: Any) -> str:
    """C{"CN=cache (DNS:cache.example, IP:10.0.0.2), issued by CN=CA"}."""
    from cryptography import x509

    try:
        cert = certificate.to_cryptography()
        subject = cert.subject.rfc4514_string() or "(empty subject)"
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            altNames = "no subjectAltName"
        else:
            altNames = ", ".join(
                [f"DNS:{n}" for n in names.get_values_for_type(x509.DNSName)]
                + [f"IP:{n}" for n in names.get_values_for_type(x509.IPAddress)]
            ) or "no DNS or IP subjectAltName"
        issuer = cert.issuer.rfc4514_string() or "(empty issuer)"
        return f"{subject} ({altNames}), issued by {issuer}"
    except Exception:
        return "(unreadable certificate)"


def clientConnectionCreator(
    credentials: TLSCredentials, hostname: str | None
) -> IOpenSSLClientConnectionCreator | ssl.CertificateOptions:
    """
    The proxy's TLS options: present its certificate, and check that the
    cache's chains to the CA and, if C{hostname} is given, that it names
    C{hostname} in its subjectAltName (a DNS name or an IP address).
    """
    if hostname is None:  # --tls-no-cn-verify: the chain is still checked
        return ssl.CertificateOptions(
            privateKey=credentials.certificate.privateKey.original,
            certificate=credentials.certificate.original,
            extraCertChain=[c.original for c in credentials.chain],
            trustRoot=credentials.trustRoot(),
        )
    return ssl.optionsForClientTLS(
        hostname,
        credentials.trustRoot(),
        credentials.certificate,
        extraCertificateOptions={"extraCertChain": [c.original for c in credentials.chain]},
    )


# -- explaining failures -----------------------------------------------------


def _sslReasons(error: BaseException) -> str:
    """The reason strings of an L{SSL.Error}, without the library noise."""
    reasons: list[str] = []
    for arg in error.args:
        if isinstance(arg, list):
            for entry in arg:
                if isinstance(entry, tuple) and entry:
                    reasons.append(str(entry[-1]))
    return "; ".join(r for r in reasons if r) or str(error) or type(error).__name__


#: What a reason from OpenSSL usually means on this link.
_HINTS = {
    "certificate verify failed": "the peer's certificate does not chain to --tls-cacert, or is expired",
    "peer did not return a certificate": "it sent no certificate (started without --tls-cert?)",
    "tlsv13 alert certificate required": "the peer wants a certificate and got none",
    "tlsv1 alert unknown ca": "the peer does not trust our certificate's CA (--tls-cacert there)",
    "sslv3 alert bad certificate": "the peer rejected our certificate",
    "sslv3 alert certificate expired": "the peer says our certificate has expired",
    "tlsv1 alert decrypt error": "the peer rejected our certificate",
    "wrong version number": "the peer does not speak TLS (started without --tls?)",
    "packet length too long": "the peer does not speak TLS (started without --tls?)",
    "record layer failure": "the peer does not speak TLS (started without --tls?)",
    "http request": "the peer does not speak TLS",
}


def describeFailure(reason: Failure, detail: str | None = None) -> str:
    """
    A one-line explanation of why a TLS connection failed; C{detail} (which
    certificate failed to verify, and why) is added to OpenSSL's message.
    """
    from service_identity import VerificationError

    value = reason.value
    if isinstance(value, VerificationError):
        names = []
        for mismatch in getattr(value, "errors", ()):
            wanted = getattr(mismatch, "mismatched_id", None)
            name = getattr(wanted, "hostname", None) or getattr(wanted, "ip", wanted)
            names.append(name.decode("ascii", "replace") if isinstance(name, bytes) else str(name))
        presented = f"; {detail}" if detail else ""
        return (
            f"its certificate is not for {', '.join(names) or 'the name dialled'}{presented}"
            " (dial a name in its subjectAltName, or use --tls-no-cn-verify)"
        )
    if isinstance(value, SSL.Error):
        why = _sslReasons(value)
        if detail is not None:
            return f"{why} ({detail})"
        hints = [hint for text, hint in _HINTS.items() if text in why]
        return f"{why} ({hints[0]})" if hints else why
    if isinstance(value, (TLSHandshakeFailed, CancelledError)):
        return str(value) or type(value).__name__
    return (
        "the peer closed the connection during the handshake"
        " (did it reject our certificate? its log says why)"
    )


def _isTLSError(reason: Failure) -> bool:
    from service_identity import VerificationError

    return reason.check(SSL.Error, VerificationError) is not None


# -- the handshake gate ------------------------------------------------------


@implementer(IHandshakeListener)
class _HandshakeGate(Protocol):
    """
    Sits between L{TLSMemoryBIOProtocol} and the real protocol, and connects
    the real protocol only once the handshake has succeeded.  Its transport
    is then the TLS protocol itself, exactly as without the gate.
    """

    log = Logger()
    transport: Any

    def __init__(self, wrapped: IProtocol, clock: IReactorTime, timeout: float) -> None:
        self.wrapped = wrapped
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
        return self._endpoint.listen(TLSMemoryBIOFactory(self._creator, False, gates))


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
    L{ClientService} counts a refused handshake as a failed attempt.

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
        d: Deferred[Any] = self._endpoint.connect(TLSMemoryBIOFactory(self._creator, True, gates))

        def connected(tlsProtocol: TLSMemoryBIOProtocol) -> Deferred[IProtocol]:
            gate = tlsProtocol.wrappedProtocol
            assert isinstance(gate, _ClientGate)
            return gate.ready

        return d.addCallback(connected)

    def backoff(self, policy: Callable[[int], float]) -> Callable[[int], float]:
        """
        C{policy} (a L{ClientService} retry policy), also backing off over
        links refused after the handshake: to L{ClientService} those look
        like successful connections, which reset its attempt count.
        """
        return lambda attempt: policy(attempt + self.rejections)


# -- endpoint strings --------------------------------------------------------


def _splitDescription(description: str) -> list[str]:
    """Split an endpoint string on unescaped colons, as Twisted does."""
    parts, current, chars = [], [], iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def endpointType(description: str) -> str:
    """C{"tcp"} for C{"tcp:host=h:port=1"}."""
    return _splitDescription(description)[0].strip().lower()


def endpointHost(description: str) -> str | None:
    """
    The host a client endpoint string dials: its C{host=} argument, or the
    first argument of C{tcp:HOST:PORT}; L{None} if it has none (C{unix:}).
    """
    kind, *arguments = _splitDescription(description)
    positional: list[str] = []
    for argument in arguments:
        name, equals, value = argument.partition("=")
        if equals and name == "host":
            return value or None
        if not equals:
            positional.append(argument)
    if kind.strip().lower() in ("tcp", "tcp6") and positional:
        return positional[0] or None
    return None
