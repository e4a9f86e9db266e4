# -*- test-case-name: tests.test_progress -*-
"""
What a daemon is moving, for operators: per-image log events with their
time and rate, a periodic progress line for long transfers, and the
counters behind the metrics endpoint.
"""

from __future__ import annotations

from collections import Counter
from enum import Enum
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twisted_criu.flow.ratelimit import TokenBucket, describeRate

#: Images smaller than this get no rate in their log line (it means nothing).
RATE_THRESHOLD = 1 << 16


class Direction(Enum):
    """Which way an image moves through a daemon."""

    FROM_CRIU = "from criu"
    TO_CACHE = "to the cache"
    FROM_PROXY = "from the proxy"
    TO_CRIU = "to criu"


def formatBytes(n: float) -> str:
    """C{1.5 GiB}, C{12.0 MiB}, C{300 B}."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def formatRate(bytesPerSecond: float) -> str:
    return f"{bytesPerSecond / 1e6:.1f} MB/s"


class ImageInFlight:
    """One image on its way in or out; C{progress()} says how many bytes moved."""

    def __init__(
        self,
        direction: Direction,
        image: str,
        size: int | None,
        progress: Callable[[], int],
        started: float,
    ) -> None:
        self.direction = direction
        self.image = image
        self.size = size
        self.progress = progress
        self.started = started


class Activity:
    """
    A daemon's transfers and counters.

    Protocols call L{begin} when an image starts moving and L{end} when it
    has moved (or L{abandon} when it broke off); L{end} returns the time
    and rate for their log line.  Every C{interval} seconds, transfers that
    have been running longer than that get a progress line.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, interval: float = 10.0) -> None:
        self.clock = clock
        self.interval = interval
        self.active: set[ImageInFlight] = set()
        self.images: Counter[Direction] = Counter()
        self.bytes: Counter[Direction] = Counter()
        self.abandoned: Counter[Direction] = Counter()
        #: Image bytes on the link (compressed or not), and the raw bytes they carried.
        self.wireBytes: Counter[Direction] = Counter()
        self.linkRawBytes: Counter[Direction] = Counter()
        self.notFound = 0
        self.waitedReads = 0
        #: The link's C{--rate-limit}, if any: its progress says what it achieves.
        self.linkLimit: TokenBucket | None = None
        self._reporter: LoopingCall | None = None

    def begin(
        self, direction: Direction, image: str, size: int | None, progress: Callable[[], int]
    ) -> ImageInFlight:
        transfer = ImageInFlight(direction, image, size, progress, self.clock.seconds())
        self.active.add(transfer)
        return transfer

    def end(self, transfer: ImageInFlight, size: int) -> dict[str, Any]:
        """
        Count a completed transfer; returns C{seconds} and C{rate} (bytes per
        second, or None for an instant), for the caller's log event.
        """
        self.active.discard(transfer)
        self.images[transfer.direction] += 1
        self.bytes[transfer.direction] += size
        seconds = max(0.0, self.clock.seconds() - transfer.started)
        rate = size / seconds if seconds > 0 else None
        timing = f"in {seconds:.2f} s"
        limited = self.linkLimit is not None and transfer.direction is Direction.TO_CACHE
        if rate is not None and size >= RATE_THRESHOLD:
            timing += f", {formatRate(rate)}"
            if limited:
                timing += self.limitNote()
        fields = {"seconds": round(seconds, 3), "rate": rate, "timing": timing}
        if limited:
            fields.update(self.limitFields())
        return fields

    def onWire(self, direction: Direction, raw: int, wire: int) -> None:
        """An image of C{raw} bytes crossed the link as C{wire} bytes."""
        self.linkRawBytes[direction] += raw
        self.wireBytes[direction] += wire

    def abandon(self, transfer: ImageInFlight) -> None:
        if transfer in self.active:
            self.active.discard(transfer)
            self.abandoned[transfer.direction] += 1

    @property
    def bytesInFlight(self) -> int:
        return sum(transfer.progress() for transfer in self.active)

    def limitNote(self) -> str:
        """C{" (link: 15.9 MB/s, --rate-limit 16 MB/s)"}, or nothing without a limit."""
        limit = self.linkLimit
        if limit is None:
            return ""
        return f" (link: {describeRate(limit.achieved())}, --rate-limit {describeRate(limit.rate)})"

    def limitFields(self) -> dict[str, Any]:
        """The limit and the link's achieved rate, for a log event's fields (JSON logs)."""
        limit = self.linkLimit
        if limit is None:
            return {}
        return {"rateLimit": limit.rate, "linkRate": round(limit.achieved(), 1)}

    # -- the progress line -------------------------------------------------

    def startReporting(self) -> None:
        if self._reporter is None and self.interval > 0:
            self._reporter = LoopingCall(self.report)
            self._reporter.clock = self.clock
            self._reporter.start(self.interval, now=False)

    def stopReporting(self) -> None:
        reporter, self._reporter = self._reporter, None
        if reporter is not None and reporter.running:
            reporter.stop()

    def report(self) -> None:
        """Log a progress line for every transfer older than the interval."""
        now = self.clock.seconds()
        for transfer in sorted(self.active, key=lambda t: (t.started, t.image)):
            elapsed = now - transfer.started
            if elapsed < self.interval:
                continue
            done = transfer.progress()
            rate = done / elapsed if elapsed > 0 else 0.0
            if transfer.size:
                left = max(0, transfer.size - done)
                eta = f", ETA {left / rate:.0f} s" if rate > 0 else ""
                amount = (
                    f"{formatBytes(done)} of {formatBytes(transfer.size)}"
                    f" ({100 * done / transfer.size:.0f} %)"
                )
            else:
                eta = ""
                amount = f"{formatBytes(done)} so far"
            limited = transfer.direction is Direction.TO_CACHE
            limit = self.limitNote() if limited else ""
            self.log.info(
                "progress: {image} {direction}: {amount}, {rateText}{eta}{limit}",
                image=transfer.image,
                direction=transfer.direction.value,
                amount=amount,
                rateText=formatRate(rate),
                eta=eta,
                limit=limit,
                done=done,
                size=transfer.size,
                rate=rate,
                elapsed=elapsed,
                **(self.limitFields() if limited else {}),
            )
