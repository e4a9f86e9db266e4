"""Tests for L{twisted_criu.flow.goodput}: what got across while an image had bytes to send."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu.flow.goodput import MIN_WINDOW_BYTES, WINDOW, GoodputMeter

MiB = 1 << 20


class GoodputMeterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.reports: list[tuple[int, int, float]] = []
        self.meter = GoodputMeter(self.clock, lambda *report: self.reports.append(report))
        self.meter.pushedBack()

    def test_nothingCountsUntilTheLinkPushesBack(self) -> None:
        """
        The link's buffers take the first MBs at once: until the link first
        holds bytes up, nothing is counted (it looked 2x faster than it is).
        """
        meter = GoodputMeter(self.clock, lambda *report: self.reports.append(report))
        meter.busy(True)
        self.clock.advance(0.01)
        meter.sent(20 * MiB, compressed=False)  # into the buffers
        meter.pushedBack()
        self.clock.advance(0.2)
        meter.sent(20 * MiB, compressed=False)
        self.assertEqual(len(self.reports), 1)
        raw, _, seconds = self.reports[0]
        self.assertEqual(raw, 20 * MiB)
        self.assertAlmostEqual(seconds, 0.2)

    def test_waitingForCriuIsNotCounted(self) -> None:
        """Time spent waiting for criu's next write is left out: only sending time counts."""
        self.meter.busy(True)
        self.clock.advance(0.1)
        self.meter.sent(8 * MiB, compressed=False)
        self.meter.busy(False)
        self.clock.advance(5.0)  # criu is slow
        self.meter.busy(True)
        self.clock.advance(0.1)
        self.meter.sent(8 * MiB, compressed=False)
        self.assertEqual(len(self.reports), 1)
        raw, compressedRaw, seconds = self.reports[0]
        self.assertEqual((raw, compressedRaw), (16 * MiB, 0))
        self.assertAlmostEqual(seconds, 0.2)

    def test_compressedShare(self) -> None:
        """A window says how many of its raw bytes went compressed."""
        self.meter.busy(True)
        for compressed in (True, False, True, True):
            self.clock.advance(WINDOW / 4)
            self.meter.sent(2 * MiB, compressed=compressed)
        self.assertEqual([r[:2] for r in self.reports], [(8 * MiB, 6 * MiB)])

    def test_tooFewBytesWait(self) -> None:
        """A window with less than a few MiB says nothing yet: it goes on until it has them."""
        self.meter.busy(True)
        self.clock.advance(WINDOW * 2)
        self.meter.sent(MIN_WINDOW_BYTES // 2, compressed=False)
        self.assertEqual(self.reports, [])
        self.clock.advance(WINDOW)
        self.meter.sent(MIN_WINDOW_BYTES // 2, compressed=False)
        self.assertEqual(len(self.reports), 1)
        self.assertAlmostEqual(self.reports[0][2], WINDOW * 3)

    def test_stopped(self) -> None:
        """Once the image is done, the time after it is not sending time."""
        self.meter.busy(True)
        self.clock.advance(0.05)
        self.meter.sent(MIN_WINDOW_BYTES, compressed=False)
        self.meter.stop()
        self.clock.advance(10)
        self.meter.busy(False)
        self.assertEqual(self.reports, [])
