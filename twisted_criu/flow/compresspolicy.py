# -*- test-case-name: tests.test_compresspolicy -*-
"""
When C{--compress auto} compresses a chunk: a small pure policy fed with
what the proxy measures (the compressor's rate and ratio, the link's
drain rate), so that it is unit-tested with a fake clock.

Compressing gets raw bytes across at C{min(compressor rate x cores,
link rate x ratio)}; sending raw at the link rate.  The cores are those
the compressing threads can have: the idle ones, plus what they use
already.  The policy compresses when the first is the larger (by a
margin); it sends raw until the link has been seen to hold the bytes up
(its rate measured), when the data does not compress (ratio under
L{MIN_RATIO}), when the link outruns the compressor, and when no core is
idle (on a machine that criu, TLS and the link keep busy, compressing
slows the migration down); and now and then it tries the other choice (a
probe) so that a change of data or of link is noticed.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime

#: Data that compresses less than this goes raw (random or compressed pages).
MIN_RATIO = 1.1
#: Compress only if that is this much faster than raw: the rates are
#: noisy, and decompressing costs the cache too.  At 1.1, on a 2-core
#: machine whose TLS link ran at 250-300 MB/s, 3 of 6 runs compressed and
#: were 0.5-1.2 s slower.  At 1.5, 4 of 6 still did (the link, measured
#: while criu competes for the cores, looks slower than it is), at about
#: the cost of raw: the measurement, not the margin, is what to improve.
MARGIN = 1.5
#: Weight of a new measurement in the moving averages.
WEIGHT = 0.3
#: Seconds between probes of the choice not taken.
PROBE_INTERVAL = 2.0
#: Chunks a raw probe sends (enough for the link to be the bottleneck:
#: past the socket's buffer and a shaper's queue, which take several MiB
#: at once and would make any link look fast).
RAW_PROBE_CHUNKS = 16
#: Chunks smaller than this say nothing of how the data compresses (a
#: 12-byte image never shrinks), and are not counted.
MIN_SAMPLE = 1 << 16
#: Chunks sent raw in a row, once raw is the choice, before asking again.
RAW_RUN_CHUNKS = 32
#: Idle cores are sampled over the link's busy stretches: a longer gap is
#: a pause (between images or dumps) and starts the next sample afresh.
MAX_CORE_SAMPLE = 1.0


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + WEIGHT * (new - old)


class CompressionPolicy:
    """
    Decides, chunk by chunk, whether compressing gets the bytes across
    sooner; learns across images and connections of one proxy.

    @ivar compressorRate: raw bytes per second one thread compresses.
    @ivar ratio: raw bytes per compressed byte, of recent chunks.
    @ivar linkRate: bytes per second the link drains when it is the bottleneck.
    @ivar cores: cores the compressing threads can have (idle ones, plus
        what they use), L{None} before it is measured (then: C{threads}).
    """

    def __init__(
        self, clock: IReactorTime, threads: int, spareCores: Callable[[], float | None] = lambda: None
    ) -> None:
        self._clock = clock
        self.threads = threads
        self.compressorRate: float | None = None
        self.ratio: float | None = None
        self.linkRate: float | None = None
        self.cores: float | None = None
        self._spareCores = spareCores
        self._sampled = clock.seconds()
        self._compressing = 0.0
        self._lastProbe = clock.seconds()
        self._rawProbeLeft = 0
        self._compressProbe = False

    def compressed(self, raw: int, compressed: int, seconds: float) -> None:
        """A chunk of C{raw} bytes compressed to C{compressed} in C{seconds} of one thread."""
        self._compressing += seconds
        if raw < MIN_SAMPLE:
            return
        self.ratio = _average(self.ratio, raw / max(compressed, 1))
        if seconds > 0:
            self.compressorRate = _average(self.compressorRate, raw / seconds)

    def drained(self, count: int, seconds: float) -> None:
        """The link took C{count} bytes in C{seconds} while it was the bottleneck."""
        if count > 0 and seconds > 0:
            self.linkRate = _average(self.linkRate, count / seconds)
            self._sampleCores()

    def _sampleCores(self) -> None:
        """The cores compressing could have had since the last sample."""
        now = self._clock.seconds()
        elapsed = now - self._sampled
        if elapsed <= 0:
            return
        spare = self._spareCores()
        busy = self._compressing / elapsed
        self._sampled, self._compressing = now, 0.0
        if spare is not None and elapsed <= MAX_CORE_SAMPLE:
            self.cores = _average(self.cores, min(float(self.threads), spare + busy))

    def worthIt(self) -> bool:
        """Do the measurements so far say compressing is faster?"""
        if self.linkRate is None:
            return False  # the link has not held anything up yet
        if self.ratio is None or self.compressorRate is None:
            return True  # compress, to measure it
        if self.ratio < MIN_RATIO:
            return False
        cores = self.threads if self.cores is None else self.cores
        withCompression = min(self.compressorRate * cores, self.linkRate * self.ratio)
        return withCompression > self.linkRate * MARGIN

    def _probeDue(self) -> bool:
        now = self._clock.seconds()
        if now - self._lastProbe < PROBE_INTERVAL:
            return False
        self._lastProbe = now
        return True

    def compressNext(self) -> bool:
        """Compress the next chunk?"""
        if self._rawProbeLeft:
            self._rawProbeLeft -= 1
            return False
        if self.linkRate is None:
            return False  # raw, measuring the link
        if self.worthIt():
            if self.ratio is not None and self._probeDue():
                # Learn (again) how fast the link is without compression.
                self._rawProbeLeft = RAW_PROBE_CHUNKS - 1
                return False
            return True
        return self._probeDue()  # one chunk, to see whether the data changed

    def rawRun(self) -> int:
        """
        After L{compressNext} said raw: how many chunks, that one included,
        may go raw (in one run, by sendfile where it can) before asking again.
        """
        if self._rawProbeLeft:
            count, self._rawProbeLeft = self._rawProbeLeft + 1, 0
            return count
        return 1 if self.worthIt() else RAW_RUN_CHUNKS

    def plainImage(self) -> bool:
        """
        Send a whole image the way C{--compress none} does (sendfile where
        it can), because raw is faster and no probe is due?
        """
        if self.linkRate is None or self.worthIt() or self._rawProbeLeft:
            return False  # (unmeasured: chunks, to measure the link)
        if self._clock.seconds() - self._lastProbe >= PROBE_INTERVAL:
            return False  # the image's first chunk is the probe
        return True
