# -*- test-case-name: tests.test_livewrites -*-
"""
Which of the images criu is writing the link cuts through next: the
largest one that holds L{LIVE_MIN} bytes.  A smaller write waits: it goes
whole once complete, or is cut through once it has grown.
"""

from __future__ import annotations

from typing import Callable

from twisted_criu.interfaces import IGrowableWriter
from twisted_criu.keys import ImageKey

#: A write is cut through once it holds this much.  criu keeps some small
#: images open for all of a dump (seccomp.img, 12 bytes): cut through at
#: once, one held the link while the pages waited to go whole after criu
#: was done (0.9 s of a 512 MiB redis's downtime).
LIVE_MIN = 1 << 20


class LiveWrites:
    """
    criu's writes under way that a free link may cut through.

    @param grown: called when a write reaches L{LIVE_MIN} bytes while
        still under way (offer it to the link).
    """

    def __init__(self, grown: Callable[[], None]) -> None:
        self._grown = grown
        self._writes: dict[ImageKey, IGrowableWriter] = {}

    def started(self, key: ImageKey, writer: IGrowableWriter) -> None:
        """A write of C{key} started (any older one of C{key} is forgotten)."""
        self._writes.pop(key, None)
        self._writes[key] = writer
        writer.whenGrown(LIVE_MIN).addCallback(lambda _: self._grew(key, writer))

    def _grew(self, key: ImageKey, writer: IGrowableWriter) -> None:
        if writer.writing and self._writes.get(key) is writer:
            self._grown()

    def ended(self, key: ImageKey) -> None:
        """C{key}'s write was published: it goes whole, if it still waits."""
        writer = self._writes.get(key)
        if writer is not None and not writer.writing:
            del self._writes[key]

    def discard(self, key: ImageKey) -> None:
        """C{key}'s write is on its way some other way (resumed)."""
        self._writes.pop(key, None)

    def take(self) -> tuple[ImageKey, IGrowableWriter] | None:
        """The largest write under way that holds L{LIVE_MIN} bytes, no longer waiting."""
        for key in [key for key, writer in self._writes.items() if not writer.writing]:
            del self._writes[key]
        grown = [item for item in self._writes.items() if item[1].size >= LIVE_MIN]
        if not grown:
            return None
        key, writer = max(grown, key=lambda item: item[1].size)
        del self._writes[key]
        return key, writer

    def clear(self) -> None:
        self._writes.clear()
