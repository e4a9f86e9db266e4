# -*- test-case-name: tests.test_linkkey -*-
"""
The link key: a secret file both ends of the link hold, from which each
derives the same TLS identity.

The file is one line of 64 hex digits (32 random bytes), root's and 0600.
From it both ends derive one Ed25519 key pair and a self-signed certificate
(HKDF-SHA256, so the same file always gives the same identity, and the file
itself never travels).  The link is TLS 1.3 in which each end presents that
certificate and accepts only a peer whose certificate carries the same
public key: proof that the peer holds the file.  TLS then encrypts the link
and protects every byte against tampering.  The key's fingerprint (a hash
of the public key, not the secret) is logged so that operators can compare
the two hosts' keys without showing them.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from datetime import datetime, timezone
from typing import Any

from attrs import frozen
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from twisted_criu.link.tls.gate import _HandshakeGate

#: Where root's daemons keep the key (other users: under their config dir).
ROOT_KEY_PATH = "/etc/twisted-criu/link.key"
#: The environment variable that names another default key file.
KEY_ENVIRONMENT = "TWISTED_CRIU_LINK_KEY"

_SECRET_BYTES = 32
_DERIVATION = b"twisted-criu link key v1"


class LinkKeyError(Exception):
    """The key file cannot be used; the message names it and what to do."""


def defaultKeyPath(environ: dict[str, str] | None = None, euid: int | None = None) -> str:
    """
    C{$TWISTED_CRIU_LINK_KEY} if set; else L{ROOT_KEY_PATH} for root, and
    C{$XDG_CONFIG_HOME/twisted-criu/link.key} (C{~/.config/...}) for others.
    """
    environ = dict(os.environ) if environ is None else environ
    euid = os.geteuid() if euid is None else euid
    if environ.get(KEY_ENVIRONMENT):
        return environ[KEY_ENVIRONMENT]
    if euid == 0:
        return ROOT_KEY_PATH
    config = environ.get("XDG_CONFIG_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".config"
    )
    return os.path.join(config, "twisted-criu", "link.key")


@frozen
class LinkKey:
    """
    The TLS identity derived from a link key file.

    @ivar path: the file it was read from.
    @ivar fingerprint: 16 hex digits of the public key's SHA-256, for logs.
    @ivar created: whether this start generated the file.
    """

    path: str
    certificate: ssl.PrivateCertificate
    publicKey: bytes
    fingerprint: str
    created: bool = False

    def describe(self) -> str:
        return f"link key {self.path} (fingerprint {self.fingerprint})"

    def serverCreator(self) -> IOpenSSLServerConnectionCreator:
        """The cache's TLS: accept only a proxy that holds this key."""
        return _PinnedKeyCreator(self, "proxy")

    def clientCreator(self) -> IOpenSSLClientConnectionCreator:
        """The proxy's TLS: talk only to a cache that holds this key."""
        return _PinnedKeyCreator(self, "cache")


def loadKey(path: str, create: bool, option: str = "--link-key") -> LinkKey:
    """
    Read the key file at C{path}, generating it first if it is absent and
    C{create} is true (atomically: two daemons starting at once end up
    with the same key).

    @raise LinkKeyError: missing (and not created), unreadable, readable by
        others, or not a key.
    """
    created = False
    if create and not os.path.lexists(path):
        created = _generate(path, option)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LinkKeyError(
            f"{option} {path}: no link key there; copy the cache host's key to it"
            " (or start a daemon once, which creates one)"
        ) from None
    except OSError as e:
        raise LinkKeyError(f"{option} {path}: cannot read it: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise LinkKeyError(f"{option} {path}: not a regular file")
        if info.st_mode & 0o077:
            raise LinkKeyError(
                f"{option} {path}: group or others may read or write it"
                f" (mode {stat.S_IMODE(info.st_mode):o}): chmod 600 {path}"
            )
        if info.st_uid not in (0, os.geteuid()):
            raise LinkKeyError(
                f"{option} {path}: owned by uid {info.st_uid}, not by root or us: another user"
                " could change it"
            )
        text = f.read(4096)
    try:
        secret = bytes.fromhex(text.decode("ascii").strip())
    except ValueError:
        secret = b""
    if len(secret) != _SECRET_BYTES:
        raise LinkKeyError(
            f"{option} {path}: not a twisted-criu link key (one line of {2 * _SECRET_BYTES}"
            " hex digits); remove it to have a new one generated"
        )
    return _derive(path, secret, created)


def _generate(path: str, option: str) -> bool:
    """Write a new key to C{path} unless another process just did; C{True} if we did."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        temporary = os.path.join(directory, f".link.key.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, secrets.token_hex(_SECRET_BYTES).encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)  # fails if it exists: never overwrites a key
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(temporary)
    except OSError as e:
        raise LinkKeyError(
            f"{option} {path}: no key there and cannot create one: {e.strerror}"
        ) from None


#: A fixed validity (the certificate only carries the public key).
_NOT_BEFORE = datetime(2000, 1, 1, tzinfo=timezone.utc)
_NOT_AFTER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)


def _derive(path: str, secret: bytes, created: bool) -> LinkKey:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.x509.oid import NameOID

    seed = HKDF(hashes.SHA256(), 32, salt=None, info=_DERIVATION).derive(secret)
    private = Ed25519PrivateKey.from_private_bytes(seed)
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    fingerprint = hashlib.sha256(public).hexdigest()[:16]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"twisted-criu link key {fingerprint}")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(int(fingerprint, 16) or 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .sign(private, None)
    )
    pair = ssl.KeyPair(crypto.PKey.from_cryptography_key(private))
    own = ssl.PrivateCertificate.fromCertificateAndKeyPair(
        ssl.Certificate(crypto.X509.from_cryptography(certificate)), pair
    )
    return LinkKey(path, own, public, fingerprint, created)


def _publicKeyOf(certificate: Any) -> bytes | None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = certificate.to_cryptography().public_key()
    if not isinstance(key, Ed25519PublicKey):
        return None
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLClientConnectionCreator)
class _PinnedKeyCreator:
    """
    TLS 1.3 connections presenting the key's certificate and requiring the
    peer's to carry the same public key (whatever OpenSSL thinks of its
    chain: the certificate is self-signed, the key is what counts).
    """

    def __init__(self, key: LinkKey, peer: str) -> None:
        self._key = key
        self._peer = peer
        self._options = ssl.CertificateOptions(
            privateKey=key.certificate.privateKey.original,
            certificate=key.certificate.original,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_3,
        )
        # AES-128-GCM first: 128-bit security, and the cheapest cipher on
        # CPUs with AES instructions (the link's CPU cost is mostly this).
        self._options.getContext().set_tls13_ciphersuites(
            b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
        )

    def _connection(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        context = self._options.getContext()
        connection = SSL.Connection(context, None)
        gate = tlsProtocol.wrappedProtocol

        def verify(conn: SSL.Connection, certificate: Any, error: int, depth: int, ok: int) -> bool:
            if depth > 0:
                return True  # only the peer's own certificate counts
            presented = _publicKeyOf(certificate)
            if presented == self._key.publicKey:
                return True
            if isinstance(gate, _HandshakeGate) and gate.verifyProblem is None:
                theirs = "no link key" if presented is None else (
                    f"link key fingerprint {hashlib.sha256(presented).hexdigest()[:16]}"
                )
                gate.verifyProblem = (
                    f"the {self._peer} holds a different link key ({theirs}; ours is"
                    f" {self._key.fingerprint}, {self._key.path}): copy one host's key file to the other"
                )
            return False

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return self._connection(tlsProtocol)

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return self._connection(tlsProtocol)
