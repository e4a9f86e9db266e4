# -*- test-case-name: tests.test_storage,tests.test_heldpipes -*-
"""A reader that follows a spill store's writer: the bytes of an image as criu writes them."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from twisted.internet.defer import Deferred
from zope.interface import implementer

from twisted_criu.interfaces import IGrowingImage, IStoredImage
from twisted_criu.storage.spill.readers import _SpillReader

if TYPE_CHECKING:
    from twisted_criu.storage.spill.store import _SpillWriter


@implementer(IGrowingImage)
class _GrowingReader(_SpillReader):
    """
    Follows a L{_SpillWriter}: reads what is already in memory or durably
    in the spill file (whole aligned buffers), and more after each change.
    """

    def __init__(self, writer: _SpillWriter) -> None:
        super().__init__([], writer._store._io)
        self._writer: _SpillWriter | None = writer
        self._segments = writer._segments  # the list itself: commit hands it on
        self._lastMayGrow = True
        self.complete = False
        self.aborted = False
        #: The image the write became, once committed.
        self.image: IStoredImage | None = None
        self.onChange: Callable[[], None] = lambda: None
        #: Runs known final (every segment but the writer's last, which is
        #: sealed before the next is added), and their bytes: a change looks
        #: at the last segment only, not at the hundreds of holds before it.
        self._settled = 0
        self._settledBytes = 0
        try:
            self._refresh()  # our own descriptors now: raises here, if at all (EMFILE)
        except OSError:
            self.close()
            raise

    @property
    def available(self) -> int:
        self._refresh()
        return self._settledBytes + sum(size for _, size, _ in self._runs[self._settled :])

    def _refresh(self) -> None:
        writer = self._writer
        if writer is None:
            return
        segments, runs = self._segments, self._runs
        last = len(segments) - 1
        for i in range(self._settled, len(segments)):
            segment = segments[i]
            size = writer._durable(segment)
            if i < len(runs):
                fd, _, kind = runs[i]
                runs[i] = (fd, size, kind)
            else:
                runs.append((os.dup(segment.fd), size, segment.kind))
            if i < last and i == self._settled:
                self._settled += 1
                self._settledBytes += size

    def _changed(self, complete: bool = False, aborted: bool = False) -> None:
        """Called by the writer after each change (before it drops anything)."""
        if not aborted:
            self._refresh()
        if complete or aborted:
            self._writer = None
            self._lastMayGrow = False
        self.complete, self.aborted = complete, aborted
        self.onChange()

    # After an abort, what was available stays readable (our own fds): a
    # chunk already announced can still be completed.

    def read(self, size: int) -> bytes:
        self._refresh()
        return super().read(size)

    def whenReadable(self) -> Deferred[None] | None:
        self._refresh()
        return super().whenReadable()

    def sendfile(self, out: int, count: int) -> int:
        self._refresh()
        return super().sendfile(out, count)

    def skip(self, count: int) -> int:
        self._refresh()
        return super().skip(count)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer._unfollow(self)
        super().close()
