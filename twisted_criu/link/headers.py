# -*- test-case-name: tests.test_receiver -*-
"""The cache's reading of the proxy's header frames, between images."""

from __future__ import annotations

from twisted_criu import wire
from twisted_criu.errors import ProtocolError


def looksLikeTLS(data: bytes | memoryview) -> bool:
    """A TLS handshake record (type 22, version 3.x), where a header frame should start."""
    return len(data) >= 3 and data[0] == 0x16 and data[1] == 0x03 and 1 <= data[2] <= 4


def readHeader(frames: wire.FrameBuffer, data: bytes | memoryview, first: bool) -> wire.RemoteHeader | None:
    """
    Feed C{data} to C{frames}: the header it completes, or L{None} while
    more bytes are needed (what follows the header: C{frames.takeRest()}).
    C{first}: no image came on this link yet, so a TLS ClientHello may be
    what arrives.

    @raise ProtocolError: not a header frame.
    """
    if first and not frames.pending and looksLikeTLS(data):
        raise ProtocolError(
            "the peer speaks TLS (a proxy with the link key, or --tls) and this"
            " link is plain (--plain-link): give both ends the same choice"
        )
    payload = frames.feed(bytes(data))
    return None if payload is None else wire.RemoteHeader.fromBytes(payload)
