# -*- test-case-name: tests.test_goodput -*-
"""
How fast an image's raw bytes get across while it has bytes to send (not
while it waits for criu), measured in windows: what C{--compress auto}
checks its choice against.  On a link that is short of CPU rather than of
bandwidth (both ends on one machine, or a busy one), compressing makes
the link itself slower, and only this says so.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime

#: Seconds of sending (not waiting for criu) a window covers.
WINDOW = 0.15
#: Raw bytes a window needs to say anything (socket buffers take a few MiB at once).
MIN_WINDOW_BYTES = 1 << 22


class GoodputMeter:
    """
    Adds up raw bytes handed to the link and the time spent sending them
    (the producer busy: paused by the link, compressing, or writing; not
    waiting for criu), and calls C{report(raw, compressedRaw, seconds)}
    each time a window is full.

    Nothing counts until L{pushedBack}: until the link first pushes back,
    its buffers (sockets, a shaper's queue: tens of MB on a 1 Gbit/s link
    with 100 ms of queue) take bytes far faster than it carries them.
    """

    def __init__(
        self, clock: IReactorTime, report: Callable[[int, int, float], None], window: float = WINDOW
    ) -> None:
        self._clock = clock
        self._report = report
        self._window = window
        self._busySince: float | None = None
        self._busy = 0.0
        self._raw = 0
        self._compressedRaw = 0
        self._counting = False

    def pushedBack(self) -> None:
        """The link held bytes up (its buffers are full): from now on, what gets across counts."""
        if not self._counting:
            self._counting = True
            self._busySince = self._clock.seconds()  # (held up: sending)

    def busy(self, sending: bool) -> None:
        """From now on, the image is sending (C{True}) or waiting for criu."""
        if not self._counting:
            return
        now = self._clock.seconds()
        since = self._busySince
        if since is not None:
            self._busy += now - since
        self._busySince = now if sending else None
        self._maybeReport()

    def sent(self, raw: int, compressed: bool) -> None:
        """C{raw} bytes of the image went to the link (compressed or not)."""
        if not self._counting:
            return
        self._raw += raw
        if compressed:
            self._compressedRaw += raw
        self.busy(self._busySince is not None)

    def _maybeReport(self) -> None:
        if self._busy < self._window or self._raw < MIN_WINDOW_BYTES:
            return
        raw, compressedRaw, seconds = self._raw, self._compressedRaw, self._busy
        self._raw = self._compressedRaw = 0
        self._busy = 0.0
        self._report(raw, compressedRaw, seconds)

    def stop(self) -> None:
        """The image is done: what is left is too little to report."""
        self._busySince = None
