# -*- test-case-name: tests.test_tls -*-
"""Explaining a failed TLS handshake in one line an operator can act on."""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from twisted_criu.link.tls.errors import TLSHandshakeFailed

# -- explaining failures -----------------------------------------------------


def _sslReasons(error: BaseException) -> str:
    """The reason strings of an C{OpenSSL.SSL.Error}, without the library noise."""
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
    "sslv3 alert bad certificate": "the peer rejected our certificate (or our link key: is it the same file on both hosts?)",
    "sslv3 alert certificate expired": "the peer says our certificate has expired",
    "tlsv1 alert decrypt error": "the peer rejected our certificate (or our link key: is it the same file on both hosts?)",
    "wrong version number": "the peer does not speak TLS (started with --plain-link, or one of CRIU's C daemons?)",
    "packet length too long": "the peer does not speak TLS (started with --plain-link, or one of CRIU's C daemons?)",
    "record layer failure": "the peer does not speak TLS (started with --plain-link, or one of CRIU's C daemons?)",
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
        " (did it reject our certificate or link key, or is it plain: --plain-link or a C daemon? its log says why)"
    )


def _isTLSError(reason: Failure) -> bool:
    from service_identity import VerificationError

    return reason.check(SSL.Error, VerificationError) is not None


def _describeName(certificate: ssl.Certificate) -> str:
    subject = certificate.original.to_cryptography().subject
    return subject.rfc4514_string() or "(empty subject)"


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
