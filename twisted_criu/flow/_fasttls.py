# -*- test-case-name: tests.test_fasttls -*-
"""
TLS records at OpenSSL's speed: the link's bulk bytes through OpenSSL's
C API instead of pyOpenSSL's per-record calls.

Twisted's L{TLSMemoryBIOProtocol} hands OpenSSL one 16 KiB record at a time
through pyOpenSSL, which allocates and copies a fresh buffer for every
record read from or written to its memory BIOs: on this VM that costs about
2 CPU-seconds per GiB each way, four times the cipher's own cost.
L{FastTLSMemoryBIOProtocol} does the same work once the handshake is done:
it encrypts straight from the caller's buffer, drains the encrypted records
into one reused buffer, sends them from there straight into the socket
while nothing waits before them (L{writeNow
<twisted_criu.flow._fastpath.writeNow>}), and decrypts into another reused
buffer, handing the application up to 1 MiB at a time (a view of that
buffer, not a copy, if it provides L{ITransientDataReceiver}).  Once the
handshake is done, the socket is read with C{recv_into} into a reused
buffer too (L{BufferedReads}): a fresh C{bytes} per read cost the cache
about 0.7 CPU-seconds per GiB.  Anything unusual (a record OpenSSL will
not write now, an alert, the peer's close, an error) goes back to
Twisted's own code, which handles it as it always did.

It steps outside two public APIs: L{TLSMemoryBIOProtocol}'s private state
(C{_handshakeDone}, C{_appSendBuffer}, C{_lostTLSConnection}, C{_aborted},
C{_tlsConnection}) and pyOpenSSL's (C{Connection._ssl}, C{_from_ssl},
C{_into_ssl}, and its cffi C{lib}/C{ffi}).  L{available} says whether both
are there as expected; if not, the endpoints use Twisted's protocol
unchanged.  C{tests.test_fasttls} pins it against real TLS connections.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from twisted_criu.flow._fastpath import BufferedReads, writeNow
from twisted_criu.interfaces import ITransientDataReceiver

try:
    from OpenSSL import SSL
    from OpenSSL._util import ffi as _ffi, lib as _lib
except ImportError:  # pragma: no cover - pyOpenSSL without its cffi binding
    _ffi = _lib = None

#: The largest plaintext of one TLS record.
RECORD = 1 << 14
#: How much is encrypted, or decrypted, before it is handed on.
BATCH = 1 << 20
#: How much one read of the socket takes once the handshake is done.
READ_SIZE = 1 << 18


def available() -> bool:
    """Are the private pieces this module uses where it expects them?"""
    if _lib is None or _ffi is None:
        return False
    needed = ("SSL_write", "SSL_read", "BIO_read", "SSL_get_error", "SSL_ERROR_WANT_READ")
    return all(hasattr(_lib, name) for name in needed) and all(
        hasattr(SSL.Connection, name) for name in ("_raise_ssl_error",)
    ) and all(
        hasattr(TLSMemoryBIOProtocol, name)
        for name in ("_write", "_flushReceiveBIO", "_tlsShutdownFinished", "_shutdownTLS")
    )


class _SharedBuffer:
    """
    One C buffer for every connection of the process (the reactor runs one
    at a time): a buffer per connection would be megabytes per session that
    the allocator does not give back.  A nested use gets a buffer of its own.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._buffer: Any = None
        self._busy = False

    def __enter__(self) -> Any:
        if self._busy:
            return _ffi.new("char[]", self.size)
        self._busy = True
        if self._buffer is None:
            self._buffer = _ffi.new("char[]", self.size)
        return self._buffer

    def __exit__(self, *exc: object) -> None:
        self._busy = False


_sealedBuffer = _SharedBuffer(BATCH + 2 * RECORD)
_openedBuffer = _SharedBuffer(BATCH)


class FastTLSMemoryBIOProtocol(TLSMemoryBIOProtocol):
    """L{TLSMemoryBIOProtocol} with the bulk data path in C calls (see the module)."""

    #: Bulk records moved by the fast path, for tests: (written, read).
    fastRecords = (0, 0)
    #: The socket's reads into a reused buffer, once the handshake is done
    #: (L{None} on a transport that is not a TCP connection).
    _reads: BufferedReads | None = None
    _readsStarted = False
    #: The application takes views of the decrypted bytes (no copy).
    _transientViews = False

    def _ready(self) -> bool:
        connection = self._tlsConnection
        return (
            self._handshakeDone
            and not self._lostTLSConnection
            and not self._aborted
            and connection is not None
            and hasattr(connection, "_ssl")
        )

    # -- sending -------------------------------------------------------------

    def _write(self, data: Any) -> None:
        if not self._ready() or self._appSendBuffer:
            super()._write(data)
            return
        view = memoryview(data).cast("B")
        size = len(view)
        if size == 0:
            return
        connection = self._tlsConnection
        outgoing = connection._from_ssl
        transport = self.transport
        assert transport is not None
        source = _ffi.from_buffer(view)
        sent = records = 0
        try:
            with _sealedBuffer as sealed:
                filled = 0
                while sent < size:
                    written = _lib.SSL_write(connection._ssl, source + sent, min(RECORD, size - sent))
                    if written <= 0:
                        break
                    sent += written
                    records += 1
                    # Take each record out at once: a memory BIO that grows
                    # to megabytes costs more than the cipher.
                    while (count := _lib.BIO_read(outgoing, sealed + filled, _sealedBuffer.size - filled)) > 0:
                        filled += count
                    if filled >= BATCH:
                        writeNow(transport, _ffi.buffer(sealed, filled))
                        filled = 0
                if filled:
                    writeNow(transport, _ffi.buffer(sealed, filled))
        finally:
            del source  # before the view: a view with an export cannot be freed
        self.fastRecords = (self.fastRecords[0] + records, self.fastRecords[1])
        if sent < size:
            # Not now (or not at all): Twisted's path buffers the rest or
            # reports the error, as it always does.
            super()._write(bytes(view[sent:]))

    # -- receiving -----------------------------------------------------------

    def _flushReceiveBIO(self) -> None:
        if not self._ready():
            super()._flushReceiveBIO()
            return
        if not self._readsStarted:
            self._startBufferedReads()
        connection = self._tlsConnection
        records = 0
        failure: SSL.Error | None = None
        with _openedBuffer as opened:
            filled = 0
            while not self._lostTLSConnection:
                count = _lib.SSL_read(connection._ssl, opened + filled, BATCH - filled)
                if count > 0:
                    filled += count
                    records += 1
                    if filled == BATCH:
                        self._deliver(opened, filled)
                        filled = 0
                    continue
                # Ask why now: anything the application does with the
                # connection (a reply written while data is delivered)
                # changes the answer.
                if _lib.SSL_get_error(connection._ssl, count) != _lib.SSL_ERROR_WANT_READ:
                    try:
                        connection._raise_ssl_error(connection._ssl, count)
                    except SSL.Error as e:
                        failure = e
                break
            self._deliver(opened, filled)
        self.fastRecords = (self.fastRecords[0], self.fastRecords[1] + records)
        if failure is not None:
            self._readFailed(failure)
        self._flushSendBIO()

    def _startBufferedReads(self) -> None:
        """The handshake is done: read the socket into a reused buffer from now on."""
        self._readsStarted = True
        self._transientViews = ITransientDataReceiver.providedBy(self.wrappedProtocol)
        self._reads = BufferedReads.install(self.transport, self._readSize, self._socketRead, READ_SIZE)

    def _readSize(self) -> int:
        """How much the next read of the socket takes into the reused buffer (0: Twisted's read)."""
        return READ_SIZE if self._ready() else 0

    def _socketRead(self, view: memoryview) -> None:
        """Bytes read from the socket (looked up each time: tests wrap C{dataReceived})."""
        self.dataReceived(view)

    def _deliver(self, opened: Any, count: int) -> None:
        if count and not self._aborted:
            data = _ffi.buffer(opened, count)
            ProtocolWrapper.dataReceived(self, memoryview(data) if self._transientViews else data[:])

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self._reads is not None:
            self._reads.restore()
        super().connectionLost(reason)

    def _readFailed(self, error: SSL.Error) -> None:
        """What Twisted's C{_flushReceiveBIO} does with a failed read."""
        if isinstance(error, SSL.WantReadError):
            return
        if isinstance(error, SSL.ZeroReturnError):
            self._shutdownTLS()
            self._tlsShutdownFinished(None)
            return
        try:
            raise error
        except SSL.Error:
            self._tlsShutdownFinished(Failure())


class FastTLSMemoryBIOFactory(TLSMemoryBIOFactory):
    """L{TLSMemoryBIOFactory} building L{FastTLSMemoryBIOProtocol}s."""

    protocol = FastTLSMemoryBIOProtocol


def tlsFactory(creator: Any, isClient: bool, wrapped: Any) -> TLSMemoryBIOFactory:
    """The fast factory where L{available}, Twisted's own otherwise."""
    factory = FastTLSMemoryBIOFactory if available() else TLSMemoryBIOFactory
    return factory(creator, isClient, wrapped)
