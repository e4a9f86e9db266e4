"""
C{--rate-limit}: its values; the token bucket and the throttle on a fake
clock; and, on loopback, a proxy (and a push) that keep the link under the
limit, measured by a relay that counts what arrives, over a plain link and
over the default TLS link.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import portforward
from twisted.python import usage
from twisted.test.proto_helpers import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.helpers import inThread, waitFor
from tests.test_tls import TLSMigration
from twisted_criu import cli
from twisted_criu.cli.control import describeLink
from twisted_criu.daemons.metrics import DaemonCollector, ErrorCounter
from twisted_criu.daemons.proxy import ImageProxyService
from twisted_criu.flow.ratelimit import LinkThrottle, RateLimitedEndpoint, TokenBucket, describeRate, throttleOf
from twisted_criu.progress import Activity, Direction
from twisted_criu.twistd import proxy_tap
from twisted_criu.twistd.options import cacheEndpoint
from twisted_criu.twistd.parsers import parseRate
from twisted_criu.views import LinkView


def shortDirectory(test: SynchronousTestCase) -> str:
    """A directory for -D whose socket paths are short enough for AF_UNIX."""
    directory = tempfile.mkdtemp(prefix="rl-")
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


class ParseRateTests(SynchronousTestCase):
    def test_units(self) -> None:
        for value, rate in [
            ("300M", 300e6),
            ("300MB/s", 300e6),
            ("300M/s", 300e6),
            ("1.5G", 1.5e9),
            ("2k", 2000),
            ("2K", 2000),
            ("64Mi", 64 << 20),
            ("64MiB/s", 64 << 20),
            ("1Gi/s", 1 << 30),
            ("16Ki", 16 << 10),
            ("5000", 5000),
            ("5000B/s", 5000),
            (" 1T ", 1e12),
        ]:
            self.assertEqual(parseRate(value), rate, value)

    def test_refused(self) -> None:
        for value in ["", "abc", "300m", "300MB", "300 M", "1e6", "-5M", "M", "300Mib", "1Ki B/s", "300MB/h"]:
            with self.assertRaises(ValueError, msg=value) as e:
                parseRate(value)
            self.assertIn("not a rate in bytes per second (try 300M", str(e.exception))

    def test_bits(self) -> None:
        with self.assertRaises(ValueError) as e:
            parseRate("1Gb/s")
        self.assertIn("bytes, not bits: 1 Gbit/s is 125M", str(e.exception))

    def test_tooLow(self) -> None:
        with self.assertRaises(ValueError) as e:
            parseRate("300")
        self.assertIn("did you mean 300M?", str(e.exception))
        with self.assertRaises(ValueError) as e:
            parseRate("0M")
        self.assertIn("above 0", str(e.exception))

    def test_proxyOption(self) -> None:
        options = proxy_tap.Options()
        directory = shortDirectory(self)
        options.parseOptions(["-D", directory, "--plain-link", "--rate-limit", "300M"])
        self.assertEqual(options["rate-limit"], 300e6)
        options = proxy_tap.Options()
        with self.assertRaises(usage.UsageError) as e:
            options.parseOptions(["-D", directory, "--plain-link", "--rate-limit", "300m"])
        self.assertEqual(
            str(e.exception), "--rate-limit 300m: not a rate in bytes per second (try 300M, 1.5G, 64Mi or 50MB/s)"
        )
        self.assertIn("--rate-limit=", options.__str__())

    def test_pushOption(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        options = cli.PushOptions()
        with self.assertRaises(usage.UsageError) as e:
            options.parseOptions([directory, "--address", "127.0.0.1", "--plain-link", "--rate-limit", "x"])
        self.assertIn("--rate-limit: not a rate in bytes per second", str(e.exception))

    def test_describe(self) -> None:
        self.assertEqual(describeRate(300e6), "300 MB/s")
        self.assertEqual(describeRate(1.5e9), "1.5 GB/s")
        self.assertEqual(describeRate(64 << 20), "67.1 MB/s")
        self.assertEqual(describeRate(2000), "2 kB/s")
        self.assertEqual(describeRate(12), "12 B/s")


class TokenBucketTests(SynchronousTestCase):
    def test_burst(self) -> None:
        """A burst is 1/20 s of the rate, at least 64 KiB; a wake's worth is half of it, at most 1/4 s."""
        clock = Clock()
        self.assertEqual(TokenBucket(clock, 300e6).burst, 15_000_000)
        self.assertEqual(TokenBucket(clock, 300e6).quantum, 7_500_000)
        self.assertEqual(TokenBucket(clock, 100e3).burst, 1 << 16)
        self.assertEqual(TokenBucket(clock, 100e3).quantum, 25_000)

    def test_refill(self) -> None:
        """Tokens come at the rate, up to the burst; spending may go below 0 (a debt)."""
        clock = Clock()
        bucket = TokenBucket(clock, 1e6, burst=100_000)
        self.assertEqual(bucket.available(), 100_000)
        bucket.spend(100_000)
        self.assertEqual(bucket.available(), 0)
        clock.advance(0.01)
        self.assertEqual(bucket.available(), 10_000)
        clock.advance(10)
        self.assertEqual(bucket.available(), 100_000)
        bucket.spend(150_000)
        self.assertEqual(bucket.available(), -50_000)
        self.assertAlmostEqual(bucket.delayFor(50_000), 0.1)
        self.assertAlmostEqual(bucket.delayFor(10**9), 0.15)  # at most a burst is waited for
        self.assertEqual(bucket.sent, 250_000)

    def test_anySecond(self) -> None:
        """Taking all it gives, at any moment, never gets more than rate + burst in a second."""
        clock = Clock()
        bucket = TokenBucket(clock, 1e6)
        taken = []
        for step in range(3000):
            clock.advance(0.001 * (1 + step % 7))
            got = bucket.available()
            if got > 0:
                bucket.spend(got)
                taken.append((clock.seconds(), got))
        self.assertLessEqual(largestWindow(taken), 1e6 + bucket.burst)
        self.assertGreater(largestWindow(taken), 0.99e6)

    def test_achieved(self) -> None:
        """What was sent over the last 2 s, or since sending began if that is later."""
        clock = Clock()
        bucket = TokenBucket(clock, 1e6)
        self.assertEqual(bucket.achieved(), 0.0)
        for _ in range(40):
            clock.advance(0.25)
            bucket.spend(250_000)
        self.assertAlmostEqual(bucket.achieved(), 1e6, delta=1)
        clock.advance(1)
        self.assertAlmostEqual(bucket.achieved(), 0.5e6, delta=1)  # half the window was idle
        clock.advance(60)
        self.assertEqual(bucket.achieved(), 0.0)
        bucket.spend(10)  # a few bytes (a handshake), then an idle link
        clock.advance(2)
        for _ in range(4):
            bucket.spend(250_000)
            clock.advance(0.25)
        self.assertAlmostEqual(bucket.achieved(), 1e6, delta=1)  # since the transfer began


class FakeTCP:
    """What a L{LinkThrottle} uses of a TCP connection: it writes all it is given."""

    def __init__(self) -> None:
        self.connected = True
        self.disconnected = False
        self.writing = True
        self.written: list[int] = []
        self.lost: list[Any] = []

    def writeSomeData(self, data: Any) -> int:
        self.written.append(len(data))
        return len(data)

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)
        self.connected = False

    def startWriting(self) -> None:
        self.writing = True

    def stopWriting(self) -> None:
        self.writing = False


class LinkThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bucket = TokenBucket(self.clock, 1e6, burst=100_000)
        self.transport = FakeTCP()
        self.throttle = LinkThrottle(self.bucket, self.transport)  # type: ignore[arg-type]

    def test_writesUpToTheTokens(self) -> None:
        """Writes go in pieces of at most the tokens there are; out of them, writing stops until they are due."""
        t = self.transport
        self.assertEqual(t.writeSomeData(b"x" * 60_000), 60_000)
        self.assertEqual(t.writeSomeData(b"x" * 60_000), 40_000)
        self.assertEqual(t.writeSomeData(b"x" * 60_000), 0)
        self.assertFalse(t.writing)
        self.assertEqual(t.written, [60_000, 40_000])
        self.clock.advance(0.049)
        self.assertFalse(t.writing)
        self.clock.advance(0.001)  # half a burst is due
        self.assertTrue(t.writing)
        self.assertEqual(t.writeSomeData(b"x" * 60_000), 50_000)
        self.assertEqual(self.bucket.sent, 150_000)

    def test_allowance(self) -> None:
        """The sendfile path asks first; told 0, it is woken (startWriting) when tokens are due."""
        self.assertEqual(self.throttle.allowance(), 100_000)
        self.throttle.charge(100_000 - 100)
        self.transport.writing = False
        self.assertEqual(self.throttle.allowance(), 0)  # too few to bother
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.throttle.allowance()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # one wake
        self.clock.advance(0.05)
        self.assertTrue(self.transport.writing)
        self.assertEqual(self.throttle.allowance(), 50_100)

    def test_lost(self) -> None:
        """A lost connection loses its throttle: no wake, its own methods back."""
        t = self.transport
        self.assertIs(throttleOf(t), self.throttle)
        t.writeSomeData(b"x" * 200_000)
        t.writeSomeData(b"x")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        t.connectionLost("gone")
        self.assertEqual(t.lost, ["gone"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(throttleOf(t))
        self.assertNotIn("writeSomeData", vars(t))
        self.assertEqual(t.writeSomeData(b"x" * 200_000), 200_000)

    def test_emptyWrites(self) -> None:
        """Twisted's empty write (a drained buffer asking its producer) is no write to limit."""
        self.bucket.spend(200_000)
        self.assertEqual(self.transport.writeSomeData(b""), 0)
        self.assertTrue(self.transport.writing)


class NoLimitTests(SynchronousTestCase):
    def test_noLimiterInThePath(self) -> None:
        """Without --rate-limit the cache's endpoint is the plain one: nothing of the limiter runs."""
        options = proxy_tap.Options()
        options.parseOptions(["-D", shortDirectory(self), "--plain-link"])
        self.assertIsNone(options["rate-limit"])
        endpoint, _, _ = cacheEndpoint(reactor, options, 1.0)
        self.assertNotIsInstance(endpoint, RateLimitedEndpoint)
        limited, _, _ = cacheEndpoint(reactor, options, 1.0, TokenBucket(reactor, 1e6))
        self.assertIsInstance(limited, RateLimitedEndpoint)


def largestWindow(arrivals: list[tuple[float, int]], width: float = 1.0) -> float:
    """The most bytes of C{arrivals} (time, count) within any C{width} seconds."""
    best = total = 0.0
    first = 0
    for when, count in arrivals:
        total += count
        while arrivals[first][0] <= when - width:
            total -= arrivals[first][1]
            first += 1
        best = max(best, total)
    return best


class _Counted(portforward.ProxyServer):
    def dataReceived(self, data: bytes) -> None:
        self.factory.arrivals.append((reactor.seconds(), len(data)))  # type: ignore[attr-defined]
        super().dataReceived(data)


class CountingRelay:
    """Forwards loopback connections to C{port}, noting when the bytes towards it arrive."""

    def __init__(self, test: TestCase, port: int) -> None:
        factory: Any = portforward.ProxyFactory("127.0.0.1", port)
        factory.protocol = _Counted
        factory.arrivals = []
        self.arrivals: list[tuple[float, int]] = factory.arrivals
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        test.addCleanup(listening.stopListening)
        address: Any = listening.getHost()
        self.port: int = address.port

    @property
    def total(self) -> int:
        return sum(count for _, count in self.arrivals)


class LimitedLinkMixin:
    """
    48 MiB through a proxy limited to 16 MB/s (and 24 MiB pushed at 12
    MB/s): the relay between it and the cache never sees more than the
    limit and a burst in any second (give or take what a busy machine
    bunches together: 30 %), and the transfer takes as long as the limit
    says.
    Without the limit the same bytes cross loopback in well under a second.
    """

    timeout = 120
    #: Arguments of both daemons that choose the link.
    link: tuple[str, ...] = ()

    def checkLimited(self, relay: CountingRelay, rate: float, size: int, elapsed: float) -> None:
        case: Any = self
        burst = max(rate / 20, 1 << 16)
        case.assertGreaterEqual(relay.total, size)
        case.assertLess(largestWindow(relay.arrivals), rate * 1.3 + burst)  # bunched by a busy machine
        # the first burst is free; the rest can only come at the rate
        case.assertGreater(elapsed, (size - burst) / rate * 0.97)
        case.assertLess(elapsed, size / rate * 4 + 5)  # and it does not crawl

    @inlineCallbacks
    def test_proxy(self) -> Any:
        """Cut through (chunks by sendfile on a plain link, written through TLS otherwise)."""
        case: Any = self
        m = TLSMigration(case)
        yield m.startCache(*self.link)
        relay = CountingRelay(case, m.port)
        rate, size = 16e6, 48 << 20
        proxy, dump = m.startProxy(
            *self.link, "--connect", f"tcp:host=127.0.0.1:port={relay.port}", "--rate-limit", "16M"
        )
        yield inThread(dump.pushSnapshotId, "snap1")
        yield m.waitForLog("the cache speaks twisted-criu's link extension")
        data = os.urandom(size)

        def write() -> None:
            writer = dump.openWrite("snap1", "pages-1.img")
            for start in range(0, len(data), 1 << 20):
                writer.write(data[start : start + (1 << 20)])
            writer.close()
            dump.finishDump()

        started = reactor.seconds()
        yield inThread(write)
        yield proxy.whenSessionDone()
        elapsed = reactor.seconds() - started
        self.checkLimited(relay, rate, size, elapsed)
        view = proxy.linkView()
        assert view is not None
        case.assertEqual(view.rateLimit, rate)
        case.assertGreaterEqual(view.sentBytes, size)
        case.assertEqual((yield m.restoreAll(["pages-1.img"])), {"pages-1.img": data})
        case.assertEqual(len(m.lines("link rate limited to 16 MB/s (--rate-limit)")), 1)
        forwarded = m.lines("forwarded snap1/pages-1.img")
        case.assertIn("--rate-limit 16 MB/s)", forwarded[0])

    @inlineCallbacks
    def test_push(self) -> Any:
        """A stored image (sendfile on a plain link, read and written through TLS otherwise)."""
        case: Any = self
        m = TLSMigration(case)
        yield m.startCache(*self.link)
        relay = CountingRelay(case, m.port)
        rate, size = 12e6, 24 << 20
        directory = case.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "pages-1.img"), "wb") as f:
            f.write(os.urandom(size))
        options = cli.PushOptions()
        options.parseOptions(
            [directory, "--to", f"tcp:host=127.0.0.1:port={relay.port}", "--rate-limit", "12M", *self.link]
        )
        out = io.StringIO()
        started = reactor.seconds()
        yield cli.push(reactor, options, out)
        elapsed = reactor.seconds() - started
        self.checkLimited(relay, rate, size, elapsed)
        case.assertIn("at most 12 MB/s (--rate-limit)", out.getvalue())
        # push returns once the cache confirmed; its end of the link (through
        # the relay) closes a moment later: not after the test.
        cache = m.cache
        assert cache is not None
        yield waitFor(lambda: not cache.proxiesLinked)


class PlainLinkTests(LimitedLinkMixin, TestCase):
    link = ("--plain-link",)


class TLSLinkTests(LimitedLinkMixin, TestCase):
    link = ()


class ShownTests(SynchronousTestCase):
    """What the operator sees of the limit: progress lines, log fields, status, metrics."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.bucket = TokenBucket(self.clock, 16e6)
        self.activity = Activity(self.clock, interval=1.0)
        self.activity.linkLimit = self.bucket
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def test_progressLines(self) -> None:
        """Lines of images going to the cache add the link's rate and the limit; others do not."""
        done = [0]
        self.activity.startReporting()
        self.addCleanup(self.activity.stopReporting)
        self.activity.begin(Direction.TO_CACHE, "pages-1.img", 64 << 20, lambda: done[0])
        self.activity.begin(Direction.FROM_CRIU, "pages-2.img", None, lambda: done[0])
        for _ in range(8):
            self.clock.advance(0.25)
            self.bucket.spend(4_000_000)
            done[0] += 4_000_000
        lines = [formatEvent(e) for e in self.events if "progress:" in e.get("log_format", "")]
        self.assertEqual(
            lines[-2:],
            [
                # the link's rate counts from its first byte, 0.25 s in
                "progress: pages-1.img to the cache: 26.7 MiB of 64.0 MiB (42 %), 14.0 MB/s, ETA 3 s"
                " (link: 16 MB/s, --rate-limit 16 MB/s)",
                "progress: pages-2.img from criu: 26.7 MiB so far, 14.0 MB/s",
            ],
        )
        event = [e for e in self.events if "progress:" in e.get("log_format", "")][-2]
        self.assertEqual((event["rateLimit"], event["linkRate"]), (16e6, 16e6))

    def test_imageLine(self) -> None:
        transfer = self.activity.begin(Direction.TO_CACHE, "pages-1.img", 8 << 20, lambda: 0)
        for _ in range(8):
            self.bucket.spend(1 << 20)
            self.clock.advance(0.0625)
        fields = self.activity.end(transfer, 8 << 20)
        self.assertEqual(fields["timing"], "in 0.50 s, 16.8 MB/s (link: 16.8 MB/s, --rate-limit 16 MB/s)")
        self.assertEqual(fields["rateLimit"], 16e6)
        unlimited = Activity(self.clock)
        fields = unlimited.end(unlimited.begin(Direction.TO_CACHE, "pages-1.img", 8 << 20, lambda: 0), 8 << 20)
        self.assertNotIn("rateLimit", fields)
        self.assertNotIn("--rate-limit", fields["timing"])

    def test_ls(self) -> None:
        link = LinkView(16e6, 800_000, 15.9e6, 48 << 20).toJSON()
        self.assertEqual(describeLink(link), "  link: 15.9 MB/s now, --rate-limit 16 MB/s; 48.0 MiB sent\n")
        self.assertEqual(describeLink(None), "")

    def test_metrics(self) -> None:
        """A proxy with a limit has its series; without one (or a cache), none."""
        clock = MemoryReactorClock()

        def proxy(bucket: TokenBucket | None) -> ImageProxyService:
            local = serverFromString(clock, "unix:/nonexistent/img-proxy.sock")
            cache = clientFromString(clock, "tcp:host=127.0.0.1:port=9")
            return ImageProxyService(clock, local, cache, rateLimit=bucket)

        def linkSeries(daemon: ImageProxyService) -> dict[str, float]:
            return {
                metric.name: metric.samples[0].value
                for metric in DaemonCollector(daemon, ErrorCounter()).collect()
                if metric.name.startswith("twisted_criu_link")
                and metric.name not in ("twisted_criu_link_raw_bytes", "twisted_criu_link_wire_bytes")
            }

        bucket = TokenBucket(clock, 16e6)
        clock.advance(1)
        bucket.spend(1234)
        clock.advance(1)
        collected = linkSeries(proxy(bucket))
        self.assertEqual(linkSeries(proxy(None)), {})
        self.assertEqual(
            collected,
            {
                "twisted_criu_link_rate_limit_bytes_per_second": 16e6,
                "twisted_criu_link_rate_bytes_per_second": 1234.0,
                "twisted_criu_link_sent_bytes": 1234,
            },
        )
