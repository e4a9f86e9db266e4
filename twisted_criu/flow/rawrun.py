# -*- test-case-name: tests.test_compress -*-
"""
Raw chunks of an image being compressed, by C{sendfile} on a plain socket:
a run of them, between compressed ones, as fast as C{--compress none}.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from twisted_criu import wire
from twisted_criu.flow.sockets import SENDFILE_SIZE, Framing, SocketSendfile


class RawRun(Framing):
    """
    Up to C{limit} bytes of an image, from where its reader is (byte
    C{start}), as raw chunks of at least C{least} bytes (fewer only once
    the image is complete); no trailer: the image goes on after the run.
    """

    stopped = "the link went away during the image"

    def __init__(
        self, available: Callable[[], int], complete: Callable[[], bool], start: int, limit: int, least: int
    ) -> None:
        self._available = available
        self._complete = complete
        self._start = start
        self._limit = limit
        self._least = least
        #: Raw bytes and chunk words sent so far (the chunks' lengths).
        self.chunks = 0

    def nextPiece(self, producer: SocketSendfile) -> tuple[bytes, int] | None:
        left = self._available() - self._start - producer.sent
        length = min(left, SENDFILE_SIZE, wire.MAX_CHUNK, self._limit - producer.sent)
        if length <= 0 or (left < self._least and not self._complete()):
            producer.finish(b"", None)  # caught up with criu, or the run is over
            return None
        self.chunks += 1
        return wire.chunkWord(length), length

    def over(self, sent: int) -> bool:
        return sent >= self._limit

    def short(self, left: int) -> Failure:
        return Failure(ConnectionLost("the stored image ended inside an announced chunk"))
