"""Tests for L{twisted_criu.progress}: timing, counters, progress lines."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu.progress import Activity, Direction, formatBytes

GiB = 1 << 30


class ActivityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.activity = Activity(self.clock, interval=5.0)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def progressLines(self) -> list[str]:
        return [formatEvent(e) for e in self.events if "progress:" in e.get("log_format", "")]

    def test_endCountsAndTimes(self) -> None:
        transfer = self.activity.begin(Direction.FROM_PROXY, "s/pages-1.img", 100 << 20, lambda: 0)
        self.clock.advance(0.5)
        timing = self.activity.end(transfer, 100 << 20)
        self.assertEqual(timing["seconds"], 0.5)
        self.assertEqual(timing["timing"], "in 0.50 s, 209.7 MB/s")
        self.assertEqual(self.activity.images[Direction.FROM_PROXY], 1)
        self.assertEqual(self.activity.bytes[Direction.FROM_PROXY], 100 << 20)
        self.assertEqual(self.activity.active, set())

    def test_smallImagesHaveNoRate(self) -> None:
        transfer = self.activity.begin(Direction.TO_CRIU, "core-1.img", 10, lambda: 10)
        self.clock.advance(0.01)
        self.assertEqual(self.activity.end(transfer, 10)["timing"], "in 0.01 s")

    def test_abandon(self) -> None:
        transfer = self.activity.begin(Direction.FROM_CRIU, "x.img", None, lambda: 5)
        self.activity.abandon(transfer)
        self.activity.abandon(transfer)  # once
        self.assertEqual(self.activity.abandoned[Direction.FROM_CRIU], 1)
        self.assertEqual(self.activity.images[Direction.FROM_CRIU], 0)

    def test_progressLineWithETA(self) -> None:
        """Large transfers get a line every interval: done, rate, ETA if the size is known."""
        done = [0]
        self.activity.startReporting()
        self.addCleanup(self.activity.stopReporting)
        self.activity.begin(Direction.TO_CACHE, "snap1/pages-1.img", 4 * GiB, lambda: done[0])
        self.activity.begin(Direction.FROM_CRIU, "snap1/pages-2.img", None, lambda: done[0] // 2)
        quick = self.activity.begin(Direction.TO_CRIU, "core-1.img", 10, lambda: 0)
        done[0] = GiB // 2
        self.clock.advance(2)
        self.activity.end(quick, 10)
        self.assertEqual(self.progressLines(), [])  # nothing older than the interval yet
        done[0] = GiB
        self.clock.advance(3)  # 5 s: 1 GiB at 214.7 MB/s, 3 GiB left
        self.assertEqual(
            self.progressLines(),
            [
                "progress: snap1/pages-1.img to the cache: 1.0 GiB of 4.0 GiB (25 %), 214.7 MB/s, ETA 15 s",
                "progress: snap1/pages-2.img from criu: 512.0 MiB so far, 107.4 MB/s",
            ],
        )
        event = [e for e in self.events if "progress:" in e.get("log_format", "")][0]
        self.assertEqual((event["done"], event["size"]), (GiB, 4 * GiB))

    def test_noReportingWhenDisabled(self) -> None:
        activity = Activity(self.clock, interval=0)
        activity.startReporting()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_formatBytes(self) -> None:
        self.assertEqual(
            [formatBytes(n) for n in (300, 2048, 5 << 20, 3 * GiB // 2)],
            ["300 B", "2.0 KiB", "5.0 MiB", "1.5 GiB"],
        )
