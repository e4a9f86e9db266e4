# -*- test-case-name: tests.test_tls -*-
"""Certificates and keys: loading them with clear errors, and the OpenSSL connection creators of both ends."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable

from attrs import frozen
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from twisted_criu.link.tls.diagnostics import _describeName, _describeVerifyError, _sslReasons
from twisted_criu.link.tls.errors import _PEM_CERTIFICATE, TLSSetupError
from twisted_criu.link.tls.gate import _HandshakeGate

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
