# -*- test-case-name: tests.test_tls -*-
"""CRIU's TLS defaults, and the errors of TLS setup and handshakes."""

from __future__ import annotations

import re

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
