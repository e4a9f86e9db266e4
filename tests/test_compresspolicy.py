"""Tests for C{--compress auto}'s choice, L{twisted_criu.flow.compresspolicy}, on a fake clock."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu.flow.compresspolicy import (
    CHUNK,
    FIRST_COMPRESSED,
    PROBE_INTERVAL,
    RAW_PROBE_CHUNKS,
    RAW_RUN_CHUNKS,
    VETO_SECONDS,
    CompressionPolicy,
)

MB = 1_000_000


class PolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.policy = CompressionPolicy(self.clock, threads=2)

    def feed(self, ratio: float, compressorRate: float, linkRate: float, times: int = 10) -> None:
        """Measurements of chunks of 1 MB: compressed C{ratio}x at C{compressorRate}, over a link of C{linkRate}."""
        for _ in range(times):
            self.policy.compressed(MB, int(MB / ratio), MB / compressorRate)
            self.policy.drained(10 * MB, 10 * MB / linkRate)

    def choices(self, count: int, step: float = 0.01) -> list[bool]:
        made = []
        for _ in range(count):
            made.append(self.policy.compressNext())
            self.clock.advance(step)
        return made

    def test_rawUntilTheLinkHoldsUp(self) -> None:
        """
        Nothing measured yet and criu not ahead of the link: raw, in chunks (that measures the link);
        once the link has held bytes up, a chunk is compressed (that
        measures the compressor).
        """
        self.assertEqual(self.choices(40), [False] * 40)
        self.assertFalse(self.policy.plainImage())
        self.policy.drained(10 * MB, 10 * MB / (125 * MB))
        self.assertTrue(self.policy.compressNext())
        self.assertFalse(self.policy.plainImage())

    def test_criuAheadOfAnUnmeasuredLink(self) -> None:
        """
        Nothing measured yet, but criu has written chunks the link has not
        taken: the first 16 MiB go compressed, then raw (a run that
        measures the link: where the link keeps up with the compressor,
        compressing all of it before it is measured was slower).
        """
        first = FIRST_COMPRESSED // CHUNK
        made = [self.policy.compressNext(ahead=True) for _ in range(first + 1)]
        self.assertEqual(made, [True] * first + [False])

    def test_linkSlowerThanTheCompressor(self) -> None:
        """
        The link held compressed chunks up before it was measured (a
        100 Mbit/s link): compressing goes on until it is measured, and
        then every chunk is compressed, with no raw probe at once.
        """
        self.clock.advance(60)  # (a proxy idle for a minute)
        self.assertTrue(all(self.policy.compressNext(ahead=True) for _ in range(4)))
        self.policy.heldUp(compressed=True)
        self.assertTrue(all(self.policy.compressNext(ahead=True) for _ in range(40)))
        self.feed(2.4, 300 * MB, 12.5 * MB, times=1)
        self.assertEqual(self.choices(300).count(False), 0)

    def test_heldUpAfterRawSaysNothing(self) -> None:
        """Held up just after a raw chunk: nothing said of the compressor; raw measures the link."""
        for _ in range(FIRST_COMPRESSED // CHUNK):
            self.policy.compressNext(ahead=True)
        self.policy.heldUp(compressed=False)
        self.assertFalse(self.policy.compressNext(ahead=True))

    def test_knownRandomRawEvenAhead(self) -> None:
        """Data known not to shrink goes raw, ahead or not."""
        self.policy.compressed(MB, MB + 20, MB / (700 * MB))
        self.assertFalse(self.policy.compressNext(ahead=True))

    def test_tinyImagesDecideNothing(self) -> None:
        """
        A 12-byte image never shrinks: it must not make a 512 MiB image that
        follows go raw (it did, the whole image the plain way).
        """
        self.policy.drained(10 * MB, 10 * MB / (125 * MB))
        for _ in range(5):
            self.policy.compressed(12, 21, 0.0001)
            self.policy.compressed(2000, 1900, 0.0001)
        self.assertTrue(self.policy.compressNext())
        self.assertFalse(self.policy.plainImage())

    def test_compressibleOnASlowLink(self) -> None:
        """2.6x data, 170 MB/s a core, a 125 MB/s link: compress (and probe raw rarely)."""
        self.feed(2.6, 170 * MB, 125 * MB)
        made = self.choices(100)  # one second of chunks
        self.assertEqual(made.count(False), 0)
        self.assertFalse(self.policy.plainImage())

    def test_describe(self) -> None:
        """The log says what was measured, and the choice it makes."""
        self.assertEqual(
            self.policy.describe(),
            "link unmeasured, compressor unmeasured a thread on unmeasured cores, ratio unmeasured: raw",
        )
        self.feed(2.6, 170 * MB, 125 * MB)
        self.assertEqual(self.policy.describe(), "link 125 MB/s, compressor 170 MB/s a thread on unmeasured cores, ratio 2.60x: compress all")

    def test_randomGoesRaw(self) -> None:
        """Data that does not compress goes raw, even on a slow link; whole images the plain way."""
        self.feed(1.0, 700 * MB, 125 * MB)
        made = self.choices(100)
        self.assertEqual(made.count(True), 0)
        self.assertTrue(self.policy.plainImage())

    def test_fastLinkGoesRaw(self) -> None:
        """A link faster than two compressing cores: raw."""
        self.feed(2.6, 170 * MB, 2000 * MB)
        self.assertEqual(self.choices(100).count(True), 0)
        self.assertTrue(self.policy.plainImage())

    def test_changeNoticed(self) -> None:
        """Random data turned compressible: a probe every interval sees it, and compression resumes."""
        self.feed(1.0, 700 * MB, 125 * MB)
        self.assertEqual(self.choices(50).count(True), 0)
        self.clock.advance(PROBE_INTERVAL)
        made = self.choices(1)
        self.assertEqual(made, [True])  # the probe
        self.feed(2.6, 170 * MB, 125 * MB, times=5)
        self.assertTrue(all(self.choices(20)))

    def test_linkGotFastNoticed(self) -> None:
        """While compressing, a raw run now and then measures the link again."""
        self.feed(2.6, 170 * MB, 125 * MB)
        self.assertTrue(all(self.choices(10)))
        self.clock.advance(self.policy.rawProbeInterval())
        self.feed(2.6, 170 * MB, 125 * MB, times=1)  # (the chunks compressed meanwhile)
        made = self.choices(RAW_PROBE_CHUNKS)
        self.assertEqual(made, [False] * RAW_PROBE_CHUNKS)
        for _ in range(10):
            self.policy.drained(10 * MB, 10 * MB / (5000 * MB))
        self.assertFalse(any(self.choices(20)))

    def test_noRawProbeRightAfterARawRun(self) -> None:
        """
        A proxy idle for a minute starts an image: the raw run that
        measures the link is its raw measurement, and compressing follows
        without a raw probe (it sent 16 MiB raw at once, 4 % of a 512 MiB
        migration at 1 Gbit/s).
        """
        self.clock.advance(60)
        self.policy.drained(10 * MB, 10 * MB / (125 * MB))
        self.policy.linkRate = None  # (as before the image)
        self.assertFalse(self.policy.compressNext())
        self.assertEqual(self.policy.rawRun(), RAW_RUN_CHUNKS)  # the link unmeasured: a run measures it
        self.feed(2.4, 300 * MB, 125 * MB, times=1)
        made = self.choices(300)  # a second of chunks at 300 MB/s
        self.assertEqual(made.count(False), 0)

    def test_rawProbesWithinBudget(self) -> None:
        """
        Compressing all over a 1 Gbit/s link: the raw probes' extra bytes
        take at most 2 % of the link's time (a probe every 2 s took 4 %),
        and a probe still comes while a long image is sent.
        """
        self.feed(2.4, 300 * MB, 125 * MB)
        made = self.choices(6000, step=1 / 300)  # 20 s of chunks at 300 MB/s raw
        raw = made.count(False)
        self.assertGreater(raw, 0)
        extra = raw * MB * (1 - 1 / 2.4) / (125 * MB)
        self.assertLessEqual(extra, 0.02 * 20)
        self.assertAlmostEqual(self.policy.rawProbeInterval(), 16 * (1 << 20) * (1 - 1 / 2.4) / (125 * MB) / 0.02, places=3)

    def test_unknownLinkIsProbedRaw(self) -> None:
        """Compression measured but the link never: a raw run measures it."""
        self.policy.compressed(MB, MB // 3, MB / (170 * MB))
        self.assertEqual(self.choices(RAW_PROBE_CHUNKS), [False] * RAW_PROBE_CHUNKS)


class SpareCoresPolicyTests(SynchronousTestCase):
    """Compressing needs idle cores: on a busy machine it slows the migration down."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.spare: list[float | None] = []
        self.policy = CompressionPolicy(self.clock, threads=1, spareCores=lambda: self.spare.pop(0))

    def feed(self, spare: float, compressing: float, times: int = 10) -> None:
        """2.4x data at 300 MB/s a core over a 280 MB/s link, C{spare} cores idle, 0.25 s at a time."""
        perChunk = MB / (300 * MB)
        for _ in range(times):
            for _ in range(max(1, round(compressing * 0.25 / perChunk))):
                self.policy.compressed(MB, int(MB / 2.4), perChunk)
            self.clock.advance(0.25)
            self.spare.append(spare)
            self.policy.drained(70 * MB, 0.25)

    def test_busyMachineGoesRaw(self) -> None:
        """Unshaped loopback on 2 cores: no core idle, raw (compressing made it 1.2x slower)."""
        self.feed(spare=0.05, compressing=0.0)
        self.assertLess(self.policy.cores or 0, 0.1)
        self.assertFalse(self.policy.worthIt())

    def test_idleCoreCompresses(self) -> None:
        """The link holds the bytes up and a core sits idle: compress."""
        self.policy.drained(10 * MB, 10 * MB / (125 * MB))  # a slow link
        self.feed(spare=0.9, compressing=0.0, times=1)
        self.policy.linkRate = 125 * MB
        self.assertTrue(self.policy.worthIt())

    def test_compressingCoresCount(self) -> None:
        """Cores the compressing threads keep busy count as theirs: compression goes on."""
        self.feed(spare=0.1, compressing=0.9)
        self.policy.linkRate = 125 * MB
        self.assertGreater(self.policy.cores or 0, 0.9)
        self.assertTrue(self.policy.worthIt())

    def test_pauseIsNotASample(self) -> None:
        """Idle cores between two dumps say nothing of the next one's."""
        self.feed(spare=0.05, compressing=0.0, times=3)
        self.clock.advance(30)
        self.spare.append(2.0)
        self.policy.drained(70 * MB, 0.25)
        self.assertLess(self.policy.cores or 0, 0.1)


class ParallelCompressorsTests(SynchronousTestCase):
    def test_oneCoreStaysWithTheReactor(self) -> None:
        from twisted_criu.flow.compress import parallelCompressors

        self.assertEqual(parallelCompressors(2, 2), 1)
        self.assertEqual(parallelCompressors(2, 1), 1)
        self.assertEqual(parallelCompressors(2, 8), 2)
        from twisted_criu.flow.compress import LinkCompression, Mode

        self.assertEqual(
            LinkCompression(Mode.AUTO, Clock(), threads=2).policy.threads, parallelCompressors(2, os.cpu_count() or 1)
        )

    def test_twoCoresOnAFastLink(self) -> None:
        """
        2 cores, 2.4x data at 300 MB/s a thread, a 280 MB/s link (TLS,
        unshaped) that leaves a third of a core idle: compressing what
        that core can beside raw chunks would gain under 1.2x, so raw.
        """
        from twisted_criu.flow.compress import LinkCompression, Mode

        policy = LinkCompression(Mode.AUTO, Clock(), threads=2).policy
        policy.threads = 1  # as parallelCompressors gives on 2 cores
        for _ in range(10):
            policy.compressed(MB, int(MB / 2.4), MB / (300 * MB))
            policy.drained(10 * MB, 10 * MB / (280 * MB))
        policy.cores = 0.33
        self.assertFalse(policy.worthIt())

    def test_shareBesideRawOnASlowLink(self) -> None:
        """
        1 Gbit/s, 2.34x data at 211 MB/s a thread with 0.7 idle core (the
        benchmark's redis while criu still dumps): compressing all would
        gain 1.2x (the thread is the bottleneck), a share beside raw
        chunks 1.7x: about 72 % of the chunks, spread evenly.
        """
        clock = Clock()
        policy = CompressionPolicy(clock, threads=1)
        for _ in range(10):
            policy.compressed(MB, int(MB / 2.34), MB / (211 * MB))
            policy.drained(10 * MB, 10 * MB / (122 * MB))
        policy.cores = 0.7
        self.assertAlmostEqual(policy.share(), 0.71, places=2)
        made = []
        for _ in range(100):
            made.append(policy.compressNext())
            clock.advance(0.001)
        self.assertEqual(made.count(True), 71)
        self.assertNotIn([False] * 3, [made[i : i + 3] for i in range(98)])  # no long raw stretch
        self.assertEqual(policy.rawRun(), 1)  # raw chunks one at a time, between compressed ones


class CheckedChoiceTests(SynchronousTestCase):
    """
    The model's choice is checked against what gets across: on a link short
    of CPU (both ends on one 2-core machine), compressing slowed the link
    down as it went (407 MB/s measured, then 286, 235, 136) and the model
    compressed more, 1.16x slower than raw.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.policy = CompressionPolicy(self.clock, threads=1)
        for _ in range(10):
            self.policy.compressed(MB, int(MB / 2.4), MB / (300 * MB))
            self.policy.drained(10 * MB, 10 * MB / (150 * MB))
        self.policy.cores = 0.8
        self.policy.delivered(100 * MB, 0, 100 / 450)  # raw got 450 MB/s across

    def test_compressingThatLosesStops(self) -> None:
        """Compressing gets less across than raw did: raw, until the veto expires."""
        self.assertTrue(self.policy.worthIt())
        self.policy.delivered(50 * MB, 20 * MB, 50 / 250)
        self.assertTrue(self.policy.worthIt(), "one window judges nothing")
        self.policy.delivered(50 * MB, 20 * MB, 50 / 260)
        self.assertFalse(self.policy.worthIt())
        self.assertEqual(self.choices(50).count(True), 0)
        self.assertIn("compressing lost to raw", self.policy.describe())
        self.assertIn("across raw 450 MB/s compressed 255 MB/s", self.policy.describe())
        self.clock.advance(VETO_SECONDS / 2)
        for _ in range(3):  # probes while raw: they judge nothing, nor extend the wait
            self.policy.delivered(5 * MB, 1 * MB, 5 / 100)
        self.clock.advance(VETO_SECONDS / 2)
        self.assertTrue(self.policy.worthIt(), "tried again later: the link may have changed")

    def test_compressingThatWinsGoesOn(self) -> None:
        """1 Gbit/s: raw got 117 MB/s across, a compressed share 200: compressing goes on."""
        self.policy.rawAcross = None
        self.policy.delivered(100 * MB, 0, 100 / 117)
        for _ in range(5):
            self.policy.delivered(50 * MB, 30 * MB, 50 / 200)
        self.assertTrue(self.policy.worthIt())
        self.assertGreater(self.choices(50).count(True), 0)

    def test_probeAmongRawJudgesNothing(self) -> None:
        """A window with one probe chunk among raw ones is neither raw nor a trial."""
        self.policy.delivered(50 * MB, 1 * MB, 50 / 100)
        self.policy.delivered(50 * MB, 1 * MB, 50 / 100)
        self.assertTrue(self.policy.worthIt())
        self.assertEqual(self.policy.rawAcross, 450 * MB)

    def test_unknownRawJudgesNothing(self) -> None:
        """Compressing from the start (raw never measured): nothing to compare with, it goes on."""
        policy = CompressionPolicy(self.clock, threads=1)
        policy.compressed(MB, int(MB / 2.4), MB / (300 * MB))
        policy.drained(10 * MB, 10 * MB / (150 * MB))
        policy.cores = 0.8
        for _ in range(3):
            policy.delivered(50 * MB, 50 * MB, 50 / 100)
        self.assertTrue(policy.worthIt())

    def choices(self, count: int) -> list[bool]:
        made = []
        for _ in range(count):
            made.append(self.policy.compressNext())
            self.clock.advance(0.001)
        return made
