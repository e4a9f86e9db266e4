# -*- test-case-name: tests.test_compresspolicy -*-
"""
When C{--compress auto} compresses a chunk: a small pure policy fed with
what the proxy measures (the compressor's rate and ratio, the link's
drain rate), so that it is unit-tested with a fake clock.

Compressing gets raw bytes across at C{min(compressor rate x threads,
link rate x ratio)}; sending raw at the link rate.  The policy compresses
when the first is the larger (by a margin), sends raw when the data does
not compress (ratio under L{MIN_RATIO}) or the link outruns the
compressor, and now and then tries the other choice (a probe) so that a
change of data or of link is noticed.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

#: Data that compresses less than this goes raw (random or compressed pages).
MIN_RATIO = 1.1
#: Compress only if that is this much faster than raw (measurement noise).
MARGIN = 1.1
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


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + WEIGHT * (new - old)


class CompressionPolicy:
    """
    Decides, chunk by chunk, whether compressing gets the bytes across
    sooner; learns across images and connections of one proxy.

    @ivar compressorRate: raw bytes per second one thread compresses.
    @ivar ratio: raw bytes per compressed byte, of recent chunks.
    @ivar linkRate: bytes per second the link drains when it is the bottleneck.
    """

    def __init__(self, clock: IReactorTime, threads: int) -> None:
        self._clock = clock
        self.threads = threads
        self.compressorRate: float | None = None
        self.ratio: float | None = None
        self.linkRate: float | None = None
        self._lastProbe = clock.seconds()
        self._rawProbeLeft = 0
        self._compressProbe = False

    def compressed(self, raw: int, compressed: int, seconds: float) -> None:
        """A chunk of C{raw} bytes compressed to C{compressed} in C{seconds} of one thread."""
        if raw < MIN_SAMPLE:
            return
        self.ratio = _average(self.ratio, raw / max(compressed, 1))
        if seconds > 0:
            self.compressorRate = _average(self.compressorRate, raw / seconds)

    def drained(self, count: int, seconds: float) -> None:
        """The link took C{count} bytes in C{seconds} while it was the bottleneck."""
        if count > 0 and seconds > 0:
            self.linkRate = _average(self.linkRate, count / seconds)

    def worthIt(self) -> bool:
        """Do the measurements so far say compressing is faster?"""
        if self.ratio is None or self.compressorRate is None:
            return True  # nothing measured yet: compress to measure
        if self.ratio < MIN_RATIO:
            return False
        if self.linkRate is None:
            return True
        withCompression = min(self.compressorRate * self.threads, self.linkRate * self.ratio)
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
        if self.worthIt():
            if self.ratio is not None and (self.linkRate is None or self._probeDue()):
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
        if self.worthIt() or self._rawProbeLeft:
            return False
        if self._clock.seconds() - self._lastProbe >= PROBE_INTERVAL:
            return False  # the image's first chunk is the probe
        return True
