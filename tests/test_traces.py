"""
Replay real criu traffic (C{shared/criu-traces/remote-*}) through the
daemons in this process (as C{twistd} processes: L{tests.slow.test_traces}).

The traces are the project's C{shared/criu-traces}, copied into
C{tests/criu-traces} so that a clean clone has them (their image bytes are
checked against the recorded SHA-256s below).  If they are missing these
tests fail: they are the only check against what real criu sends.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from attrs import define, field
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.helpers import socketDirectory
from twisted_criu import wire
from twisted_criu.daemons.cache import ImageCacheService
from twisted_criu.daemons.proxy import ImageProxyService
from twisted_criu.registry import SessionSummary
from twisted_criu.testing.replay import LegOutcome, TraceReplay
from twisted_criu.testing.traces import Op, Trace, fillerBytes, loadTrace, tracesIn
from twisted_criu.twistd.options import unixEndpoint

reactor: Any = _reactor

REPO = Path(__file__).resolve().parent.parent
#: A copy of the project's shared/criu-traces, kept in the repository so
#: that a clean clone has them (tests.test_traces checks the copy is whole).
TRACES = REPO / "tests" / "criu-traces"
REMOTE_TRACES = ["remote-a-sleep", "remote-b-mem64", "remote-c-tree", "remote-d-iterative"]
PUBLISHED = ["remote-a-sleep", "remote-c-tree"]

#: Seconds a replay step may wait for a daemon; a Deferred for a session.
STEP_TIMEOUT = 15.0
SESSION_TIMEOUT = 30.0


@lru_cache(maxsize=None)
def trace(name: str) -> Trace:
    if not TRACES.is_dir():
        raise AssertionError(
            f"criu traces not found at {TRACES}"
        )
    return loadTrace(TRACES / name)


def summaryOf(name: str) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((TRACES / name / "summary.json").read_text())
    return summary


def within(d: Deferred[Any], seconds: float = SESSION_TIMEOUT) -> Deferred[Any]:
    return d.addTimeout(seconds, reactor)


def expectedSummary(t: Trace) -> SessionSummary:
    """What a daemon holding every image of C{t} and its C{parent} reports."""
    parentSize = sum(len(wire.encodeSnapshotId(s)) for s in t.snapshotIds)
    size = sum(i.size for i in t.images.values()) + parentSize
    return SessionSummary(len(t.images) + 1, size, t.snapshotIds)


@define
class Migration:
    """What one replay of a trace through the daemons produced."""

    dumps: list[LegOutcome] = field(factory=list)
    restore: LegOutcome | None = None
    proxySessions: list[SessionSummary] = field(factory=list)
    cacheSession: SessionSummary | None = None

    @property
    def legs(self) -> list[LegOutcome]:
        return self.dumps + ([] if self.restore is None else [self.restore])


def assertLegsMatch(test: SynchronousTestCase, legs: list[LegOutcome]) -> None:
    """Every read of every leg got what criu got."""
    for outcome in legs:
        test.assertEqual(outcome.problems(), [], outcome.leg)


def assertRestoredAll(
    test: SynchronousTestCase, trace: Trace, restore: LegOutcome, snapshotId: str
) -> None:
    """Every image of C{snapshotId} read back byte-exact, ENOENTs as recorded."""
    enoent = sorted(r.key for r in restore.reads if r.error == wire.ENOENT)
    test.assertEqual(enoent, sorted(trace.enoents))
    readBack = {r.key: (r.size, r.sha256) for r in restore.reads if r.key[0] and not r.error}
    sent = {k: (i.size, i.sha256) for k, i in trace.images.items() if k[0] == snapshotId}
    test.assertEqual(readBack, sent)


class TraceLoadingTests(SynchronousTestCase):
    """The traces load, and the replay schedule is the recorded one."""

    def test_everyRemoteTraceIsCovered(self) -> None:
        if not TRACES.is_dir():
            self.fail(f"criu traces not found at {TRACES}")
        self.assertEqual([p.name for p in tracesIn(TRACES)], REMOTE_TRACES)

    def test_requestOrder(self) -> None:
        """Writes open and reads happen in connection order, as criu made them."""
        for name in REMOTE_TRACES:
            summary = summaryOf(name)
            for leg in trace(name).legs:
                order = [
                    f"{c.op.value}:{'/'.join(filter(None, c.key))}"
                    for _, c in sorted(leg.connections.items())
                ]
                self.assertEqual(order, summary[leg.name + ".jsonl"]["request_order"])

    def test_framesAreCriu(self) -> None:
        """The replay's requests are byte for byte the frames criu sent."""
        for name in REMOTE_TRACES:
            for leg in trace(name).legs:
                for c in leg.connections.values():
                    frame = wire.LocalRequest(c.name, c.snapshotId, c.openMode).toBytes()
                    self.assertEqual(frame, c.frame, (name, leg.name, c.conn))

    def test_overlap(self) -> None:
        """The dumps keep as many pipes open at once as criu did."""
        for name in REMOTE_TRACES:
            summary = summaryOf(name)
            for leg in trace(name).dumps:
                recorded = summary[leg.name + ".jsonl"]
                self.assertGreaterEqual(leg.maxOpenWrites, recorded["max_overlapping_data_transfers"])
                self.assertLessEqual(leg.maxOpenWrites, recorded["max_open_transfers"])
                self.assertGreaterEqual(leg.maxOpenWrites, 5)

    def test_finishBeforeEOF(self) -> None:
        """In d's first dump the FINISH comes before pages-1.img reaches EOF."""
        (dump1, dump2) = trace("remote-d-iterative").dumps
        self.assertEqual(dump1.finishBeforeEOF, [("snap1", "pages-1.img")])
        self.assertIn(("snap2", "pages-1.img"), dump2.finishBeforeEOF)

    def test_images(self) -> None:
        """a and c replay the published bytes, b and d stand-ins of the same size."""
        for name in REMOTE_TRACES:
            manifest = json.loads((TRACES / name / "images-manifest.json").read_text())
            for (snapshotId, imageName), image in trace(name).images.items():
                entry = manifest[f"remote/{snapshotId}/{imageName}"]
                self.assertEqual(image.size, entry["bytes"])
                self.assertEqual(image.published, name in PUBLISHED)
                if image.size:
                    self.assertEqual(image.sha256 == entry["sha256"], image.published)

    def test_fillerIsDeterministic(self) -> None:
        self.assertEqual(fillerBytes("k", 100), fillerBytes("k", 100))
        self.assertNotEqual(fillerBytes("k", 100), fillerBytes("l", 100))
        self.assertEqual(fillerBytes("k", 0), b"")

    def test_iterative(self) -> None:
        d = trace("remote-d-iterative")
        self.assertEqual([leg.name for leg in d.dumps], ["dump1", "dump2"])
        self.assertEqual(d.snapshotIds, ["snap1", "snap2"])
        self.assertEqual(d.images[("snap2", "pages-1.img")].size, 0)
        early = [c.key for c in d.dumps[1].requests(Op.READ) if c.closedEarly]
        self.assertEqual(early, [("snap1", "pages-1.img")])


class InProcessTests(TestCase):
    """Each trace through an ImageProxyService and ImageCacheService in this reactor."""

    timeout = 60

    async def startDaemons(self) -> tuple[ImageProxyService, ImageCacheService, str, str]:
        directory = socketDirectory(self)
        proxySocket = os.path.join(directory, "img-proxy.sock")
        cacheSocket = os.path.join(directory, "img-cache.sock")
        cache = ImageCacheService(
            reactor,
            serverFromString(reactor, unixEndpoint(cacheSocket)),
            serverFromString(reactor, "tcp:0:interface=127.0.0.1"),
        )
        cache.startService()
        self.addCleanup(cache.stopService)
        port = (await cache.remoteEndpoint.whenListening()).getHost().port  # type: ignore[attr-defined]
        proxy = ImageProxyService(
            reactor,
            serverFromString(reactor, unixEndpoint(proxySocket)),
            clientFromString(reactor, f"tcp:host=127.0.0.1:port={port}"),
        )
        proxy.startService()
        self.addCleanup(proxy.stopService)
        await proxy.localEndpoint.whenListening()
        await cache.localEndpoint.whenListening()
        return proxy, cache, proxySocket, cacheSocket

    async def migrate(
        self,
        trace: Trace,
        settle: bool = False,
        check: Callable[[TraceReplay, str], None] | None = None,
    ) -> Migration:
        """
        Replay every dump of C{trace} on the proxy, then its restore on the
        cache.  A dump starts once the proxy forwarded the previous one;
        the restore starts right after the last FINISH (the cache waits
        for images still on the way) unless C{settle}.  C{check(replay,
        cacheSocket)} runs in the replay thread just before the restore.
        """
        proxy, cache, proxySocket, cacheSocket = await self.startDaemons()
        replay = TraceReplay(trace, timeout=STEP_TIMEOUT)
        migration = Migration()
        cacheDone = cache.whenSessionDone()
        proxyDone: Deferred[SessionSummary] | None = None
        for leg in trace.dumps:
            if proxyDone is not None:
                migration.proxySessions.append(await within(proxyDone))
            proxyDone = proxy.whenSessionDone()
            migration.dumps.append(await deferToThread(replay.replayDump, proxySocket, leg))
        assert proxyDone is not None
        if settle:
            migration.proxySessions.append(await within(proxyDone))
        if check is not None:
            await deferToThread(check, replay, cacheSocket)
        migration.restore = await deferToThread(replay.replayRestore, cacheSocket)
        if not settle:
            migration.proxySessions.append(await within(proxyDone))
        migration.cacheSession = await within(cacheDone)
        return migration

    async def assertFullReplay(self, name: str) -> None:
        t = trace(name)
        migration = await self.migrate(t)
        assertLegsMatch(self, migration.legs)
        assert migration.restore is not None and migration.cacheSession is not None
        assertRestoredAll(self, t, migration.restore, "snap1")
        expected = expectedSummary(t)
        self.assertEqual(migration.proxySessions, [expected])
        self.assertEqual(migration.cacheSession, expected)

    async def test_remoteASleep(self) -> None:
        await self.assertFullReplay("remote-a-sleep")

    async def test_remoteBMem64(self) -> None:
        """70 MB of pages still on their way when the restore starts."""
        await self.assertFullReplay("remote-b-mem64")

    async def test_remoteCTree(self) -> None:
        await self.assertFullReplay("remote-c-tree")

    async def test_remoteDIterative(self) -> None:
        """
        Two dumps through one proxy, then the restore of the first.

        Checked here: what the daemons do as the protocol requires.  The
        first dump and the restore of every snap1 image are as recorded;
        the second dump's images (its pages-1.img has 0 bytes) reach the
        cache whole; each dump is delivered on its own (two deliveries of
        one proxy session, the chain), and the cache's session spans both
        and the restore.  The chain itself (C{parent} and snap1 as the
        second dump sees them) is L{test_remoteDParentChain}.
        """
        t = trace("remote-d-iterative")
        held: list[LegOutcome] = []
        snap2 = [k for k in t.images if k[0] == "snap2"]

        def checkCache(replay: TraceReplay, cacheSocket: str) -> None:
            held.append(replay.verifyHeld(cacheSocket, snap2))

        migration = await self.migrate(t, settle=True, check=checkCache)
        dump1, dump2 = migration.dumps
        assert migration.restore is not None and migration.cacheSession is not None
        assertLegsMatch(self, [dump1])
        assertLegsMatch(self, held)
        self.assertEqual([r.size for r in held[0].reads if r.key[1] == "pages-1.img"], [0])
        self.assertEqual(set(dump2.written), set(snap2) | {("", "parent")})
        parent = ("", wire.PARENT_IMAGE)
        self.assertEqual(
            [r for r in migration.restore.reads if r.key != parent and r.problem()], []
        )
        assertRestoredAll(self, t, migration.restore, "snap1")
        self.assertEqual(len(migration.proxySessions), 2)
        self.assertEqual(migration.cacheSession.images, len(t.images) + 1)

    async def test_remoteDParentChain(self) -> None:
        """
        The second dump must see C{parent} as C{[snap1, snap2]} and read
        snap1's pagemap and pages from the proxy (protocol document, S2
        and S4; the trace's replies), and the restore must get the same
        list.  The proxy starts a fresh session after the first dump, so
        it answers C{[snap2]} and ENOENT.
        """
        migration = await self.migrate(trace("remote-d-iterative"), settle=True)
        assertLegsMatch(self, migration.legs)
        assert migration.cacheSession is not None
        self.assertEqual(migration.cacheSession.snapshotIds, ["snap1", "snap2"])
