# -*- test-case-name: tests.test_compresspolicy -*-
"""
When C{--compress auto} compresses a chunk: a small pure policy fed with
what the proxy measures (the compressor's rate and ratio, the link's
drain rate), so that it is unit-tested with a fake clock.

Sending raw gets bytes across at the link's rate.  Compressing a share
of the chunks gets them across faster: the compressing threads take what
they can (compressor rate x cores: the idle cores, plus what the threads
use already), and raw chunks fill the rest of the link beside them.  If
the threads keep up with the link (compressor rate x cores >= link rate
x ratio), every chunk is compressed.  The policy compresses that share
(L{CompressionPolicy.share}) when it beats raw by a margin.  Until the
link's rate is measured it compresses the first L{FIRST_COMPRESSED} bytes
that wait for the link (all of them if the link holds them up) and then
sends raw; it sends raw when the data does not compress (ratio under
L{MIN_RATIO}), and when too few cores are idle (on a machine that criu,
TLS and the link keep busy, compressing slows the migration down); and
now and then it tries the other choice (a probe) so that a change of
data or of link is noticed.

The model can be wrong where the link is short of CPU rather than of
bandwidth (its two ends on one busy machine): compressing then takes the
CPU the link runs on, and the link gets slower as the policy compresses
more.  So whatever the model says is checked against what gets across
(L{CompressionPolicy.delivered}): compressing that does not beat raw by
L{TRIAL_GAIN} stops for L{VETO_SECONDS}.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: Raw bytes per chunk of a compressed image: what the policy chooses for.
CHUNK = 1 << 20
#: Data that compresses less than this goes raw (random or compressed pages).
MIN_RATIO = 1.1
#: Compress only if that is this much faster than raw: the rates are
#: noisy, and decompressing costs the cache too.  When it was all or
#: nothing, 1.1 and 1.5 both compressed on a CPU-bound 2-core TLS link at
#: 250-300 MB/s (3 and 4 runs of 6), 0.5-1.2 s slower; with a share
#: compressed beside raw chunks, such a link gains about 1.1x, and a
#: 1 Gbit/s link with 0.7 idle core 1.7x.
MARGIN = 1.25
#: Weight of a new measurement in the moving averages.
WEIGHT = 0.3
#: Seconds between probes of the choice not taken.
PROBE_INTERVAL = 2.0
#: While compressing all, raw probes cost the link at most this share of
#: its time (a probe's chunks take the link 2.4x as long raw: at 1 Gbit/s
#: a probe every 2 s made a 512 MiB migration 4 % slower).
RAW_PROBE_BUDGET = 0.02
#: Chunks a raw probe sends (enough for the link to be the bottleneck:
#: past the socket's buffer and a shaper's queue, which take several MiB
#: at once and would make any link look fast).
RAW_PROBE_CHUNKS = 16
#: Chunks smaller than this say nothing of how the data compresses (a
#: 12-byte image never shrinks), and are not counted.
MIN_SAMPLE = 1 << 16
#: Chunks sent raw in a row, once raw is the choice, before asking again.
RAW_RUN_CHUNKS = 32
#: Before the link is measured, the chunks criu has written ahead of it go
#: compressed, this many raw bytes of them, and after that raw (which
#: measures the link), unless the link held compressed chunks up by then:
#: a link slower than the compressor (raw, as before, they took 7 % of a
#: 128 MiB migration's downtime at 100 Mbit/s; 32 MiB gained nothing more).
FIRST_COMPRESSED = 16 * CHUNK
#: Idle cores are sampled over the link's busy stretches: a longer gap is
#: a pause (between images or dumps) and starts the next sample afresh.
MAX_CORE_SAMPLE = 1.0
#: Compressing goes on only while it gets the raw bytes across this much
#: faster than sending them raw did.
TRIAL_GAIN = 1.1
#: Windows of compressing (see L{twisted_criu.flow.goodput}) that judge it.
TRIAL_WINDOWS = 2
#: A window with less than this share of its bytes compressed is a probe
#: among raw chunks, and judges nothing.
TRIAL_MIN_SHARE = 0.1
#: After compressing lost to raw, seconds of raw before it is tried again.
VETO_SECONDS = 10.0


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
    @ivar rawAcross: raw bytes per second that got across while sending
        raw (and not waiting for criu), L{None} before it is measured.
    @ivar compressedAcross: the same while compressing, over the last
        L{TRIAL_WINDOWS} windows.
    """

    log = Logger()

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
        #: When the link was last checked against raw (a raw run long
        #: enough to measure it, or the unmeasured link holding compressed
        #: chunks up): raw probes count from then.
        self._linkChecked = clock.seconds()
        self._rawProbeLeft = 0
        #: Raw bytes compressed before the link was measured.
        self._unmeasuredCompressed = 0
        #: The link held compressed chunks up before it was measured.
        self._heldUpCompressed = False
        #: What the log last said auto does: raw, all or a share.
        self._lastMode = ""
        #: Chunks owed to the compressor (the share, accumulated).
        self._credit = 0.0
        self.rawAcross: float | None = None
        self.compressedAcross: float | None = None
        self._trial: list[float] = []
        #: Until when compressing lost to raw and is not tried.
        self._vetoUntil: float | None = None

    def compressed(self, raw: int, compressed: int, seconds: float) -> None:
        """A chunk of C{raw} bytes compressed to C{compressed} in C{seconds} of one thread."""
        self._compressing += seconds
        if raw < MIN_SAMPLE:
            return
        self._lastProbe = self._clock.seconds()  # (how the data compresses is known: no probe needed soon)
        self.ratio = _average(self.ratio, raw / max(compressed, 1))
        if seconds > 0:
            self.compressorRate = _average(self.compressorRate, raw / seconds)

    def drained(self, count: int, seconds: float) -> None:
        """The link took C{count} bytes in C{seconds} while it was the bottleneck."""
        if count > 0 and seconds > 0:
            self.linkRate = _average(self.linkRate, count / seconds)
            self._sampleCores()

    def heldUp(self, compressed: bool) -> None:
        """
        The link held the proxy up (its buffers full) just after a
        compressed chunk (C{compressed}) or a raw one.
        """
        if compressed and self.linkRate is None and not self._heldUpCompressed:
            self._heldUpCompressed = True
            self._linkChecked = self._clock.seconds()  # (slower than the compressor: no raw probe needed soon)

    def delivered(self, raw: int, compressedRaw: int, seconds: float) -> None:
        """
        C{raw} bytes got across in C{seconds} of sending (not waiting for
        criu), C{compressedRaw} of them compressed: what the choice made
        is checked against.
        """
        if raw <= 0 or seconds <= 0:
            return
        rate = raw / seconds
        if not compressedRaw:
            self.rawAcross = _average(self.rawAcross, rate)
            return
        if compressedRaw < raw * TRIAL_MIN_SHARE:
            return
        if self._vetoUntil is not None and self._clock.seconds() < self._vetoUntil:
            return  # (a probe's chunk in a short window: raw was chosen)
        self._trial = self._trial[-(TRIAL_WINDOWS - 1) :] + [rate]
        if len(self._trial) < TRIAL_WINDOWS or self.rawAcross is None:
            return
        self.compressedAcross = sum(self._trial) / len(self._trial)
        if self.compressedAcross < self.rawAcross * TRIAL_GAIN:
            self.log.info(
                "--compress auto: compressing got {compressed:.0f} MB/s across against {raw:.0f} MB/s raw"
                " (the link is short of CPU, not of bandwidth): raw for {seconds:.0f} s",
                compressed=self.compressedAcross / 1e6,
                raw=self.rawAcross / 1e6,
                seconds=VETO_SECONDS,
            )
            self._vetoUntil = self._clock.seconds() + VETO_SECONDS
            self._trial = []

    def _vetoed(self) -> bool:
        """Did compressing lose to raw a short while ago?"""
        until = self._vetoUntil
        if until is None:
            return False
        if self._clock.seconds() < until:
            return True
        self._vetoUntil = None  # try again: the link or the machine may have changed
        self.compressedAcross = None
        return False

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

    def share(self) -> float:
        """
        The share of chunks to compress (0: all raw, 1: all compressed),
        from the measurements so far.
        """
        if self.linkRate is None:
            return 0.0  # the link has not held anything up yet
        if self._vetoed():
            return 0.0
        if self.ratio is None or self.compressorRate is None:
            return 1.0  # compress, to measure it
        if self.ratio < MIN_RATIO:
            return 0.0
        cores = self.threads if self.cores is None else self.cores
        compressor = self.compressorRate * cores  # raw bytes a second the threads can take
        link = self.linkRate
        if compressor >= link * self.ratio:
            return 1.0 if self.ratio >= MARGIN else 0.0
        # The threads compress what they can; raw chunks fill the rest of the link.
        total = compressor + link - compressor / self.ratio
        if total < link * MARGIN:
            return 0.0
        return compressor / total

    def worthIt(self) -> bool:
        """Do the measurements so far say compressing (some chunks) is faster?"""
        return self.share() > 0

    def describe(self) -> str:
        """What the policy has measured, for the log."""

        def rate(value: float | None) -> str:
            return "unmeasured" if value is None else f"{value / 1e6:.0f} MB/s"

        ratio = "unmeasured" if self.ratio is None else f"{self.ratio:.2f}x"
        cores = "unmeasured" if self.cores is None else f"{self.cores:.2f}"
        share = self.share()
        choice = "raw" if share <= 0 else "compress all" if share >= 1 else f"compress {share:.0%}"
        if self._vetoUntil is not None:
            choice += " (compressing lost to raw)"
        across = ""
        if self.rawAcross is not None:
            across = f", across raw {rate(self.rawAcross)}"
            if self.compressedAcross is not None:
                across += f" compressed {rate(self.compressedAcross)}"
        return (
            f"link {rate(self.linkRate)}, compressor {rate(self.compressorRate)} a thread"
            f" on {cores} cores, ratio {ratio}{across}: {choice}"
        )

    def _probeDue(self) -> bool:
        now = self._clock.seconds()
        if now - self._lastProbe < PROBE_INTERVAL:
            return False
        self._lastProbe = now
        return True

    def rawProbeInterval(self) -> float:
        """
        Seconds between raw probes while every chunk is compressed: at
        least L{PROBE_INTERVAL}, and long enough that a probe's extra
        bytes take at most L{RAW_PROBE_BUDGET} of the link's time.
        """
        ratio, link = self.ratio, self.linkRate
        if ratio is None or link is None or ratio <= 1.0:
            return PROBE_INTERVAL
        extra = RAW_PROBE_CHUNKS * CHUNK * (1.0 - 1.0 / ratio) / link
        return max(PROBE_INTERVAL, extra / RAW_PROBE_BUDGET)

    def _rawProbeDue(self) -> bool:
        """Is it time to measure the link raw again (L{rawProbeInterval} since it was last checked)?"""
        now = self._clock.seconds()
        if now - self._linkChecked < self.rawProbeInterval():
            return False
        self._linkChecked = now
        return True

    def compressNext(self, ahead: bool = False) -> bool:
        """
        Compress the next chunk?  C{ahead}: criu has written several
        chunks more than the image has sent (they wait for the link).
        """
        share = self.share()
        mode = "raw" if share <= 0 else "all" if share >= 1 else "share"
        if mode != self._lastMode:
            self._lastMode = mode
            self.log.debug("--compress auto: {policy}", policy=self.describe())
        return self._choose(share, ahead)

    def _choose(self, share: float, ahead: bool) -> bool:
        """Compress the next chunk, given the L{share} to compress?"""
        if self._rawProbeLeft:
            self._rawProbeLeft -= 1
            return False
        if self.linkRate is None:
            return self._compressUnmeasured(ahead)
        if share >= 1.0:
            if self.ratio is not None and self._rawProbeDue():
                # Learn (again) how fast the link is without compression
                # (with raw chunks beside compressed ones, it is measured
                # all along).
                self._rawProbeLeft = RAW_PROBE_CHUNKS - 1
                return False
            return True
        if share > 0:
            self._credit += share
            if self._credit >= 1.0:
                self._credit -= 1.0
                return True
            return False
        return self._probeDue()  # one chunk, to see whether the data changed

    def _compressUnmeasured(self, ahead: bool) -> bool:
        """
        Compress the next chunk, the link not measured yet?  What waits for
        the link goes compressed, the first L{FIRST_COMPRESSED} bytes, or
        all of it while the link holds compressed chunks up; then raw (a
        link that keeps up with criu, or with the compressor, is measured
        raw).  What criu trickles goes raw: a link that keeps up needs no
        compression.
        """
        if not ahead or (self.ratio is not None and self.ratio < MIN_RATIO):
            return False
        if self._heldUpCompressed or self._unmeasuredCompressed < FIRST_COMPRESSED:
            self._unmeasuredCompressed += CHUNK
            return True
        return False

    def rawRun(self) -> int:
        """
        After L{compressNext} said raw: how many chunks, that one included,
        may go raw (in one run, by sendfile where it can) before asking again.
        """
        if self._rawProbeLeft:
            count, self._rawProbeLeft = self._rawProbeLeft + 1, 0
            return count
        if self.worthIt():
            return 1
        self._linkChecked = self._clock.seconds()  # (it measures the link: no raw probe needed soon)
        return RAW_RUN_CHUNKS

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
