"""Which write the link cuts through next (L{LiveWrites})."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from twisted_criu.link.livewrites import LIVE_MIN, LiveWrites
from twisted_criu.storage.spill import SpillStore


class LiveWritesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = SpillStore(64 << 20, self.mktemp())
        self.addCleanup(self.store.close)
        self.offers: list[None] = []
        self.live = LiveWrites(lambda: self.offers.append(None))

    def writer(self, key: str, size: int) -> Any:
        writer: Any = self.store.newWriter()

        def abortUnfinished() -> None:
            if writer.writing:
                writer.abort()

        self.addCleanup(abortUnfinished)
        writer.write(b"x" * size)
        self.live.started(("s", key), writer)
        return writer

    def test_smallWriteWaits(self) -> None:
        """A write under L{LIVE_MIN} bytes is not taken, and offered once it reaches it."""
        writer = self.writer("seccomp.img", 12)
        self.assertIsNone(self.live.take())
        self.assertEqual(self.offers, [])
        writer.write(b"y" * LIVE_MIN)
        self.assertEqual(self.offers, [None])
        self.assertEqual(self.live.take(), (("s", "seccomp.img"), writer))
        self.assertIsNone(self.live.take())

    def test_largestFirst(self) -> None:
        """Of the writes that have grown, the largest goes first."""
        self.writer("pagemap.img", LIVE_MIN)
        pages = self.writer("pages-1.img", 3 * LIVE_MIN)
        taken = self.live.take()
        assert taken is not None
        self.assertEqual(taken, (("s", "pages-1.img"), pages))

    def test_endedWritesGoWhole(self) -> None:
        """A write that was committed small is neither taken nor offered."""
        writer = self.writer("seccomp.img", 12)
        writer.commit()
        self.live.ended(("s", "seccomp.img"))
        self.assertIsNone(self.live.take())
        self.assertEqual(self.offers, [])

    def test_abortedWriteIsDropped(self) -> None:
        writer = self.writer("pages-1.img", 2 * LIVE_MIN)
        writer.abort()
        self.assertIsNone(self.live.take())

    def test_discard(self) -> None:
        """A write resumed another way is not taken again."""
        self.writer("pages-1.img", 2 * LIVE_MIN)
        self.assertEqual(self.offers, [None])  # grown at once
        self.live.discard(("s", "pages-1.img"))
        self.assertIsNone(self.live.take())
