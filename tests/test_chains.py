"""
Iterative migration and lifecycle, in one process on loopback: chains of
dumps (pre-dump, dump) through one proxy and cache, the end of a chain when
the restore finishes, kept sessions, dropping, and the control API that the
C{twisted-criu} command uses.
"""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import TestCase

from twisted_criu import cli
from twisted_criu.daemons.control import controlSite
from twisted_criu.storage.spill import SpillStore
from twisted_criu.twistd.options import unixEndpoint

from .helpers import Migration, MigrationCase, inThread, waitFor


def chainImages(snapshotId: str) -> dict[str, bytes]:
    """A pre-dump's or dump's images: bytes that say whose they are."""
    return {
        "pagemap-42.img": f"pagemap of {snapshotId}".encode() * 10,
        "pages-1.img": os.urandom(1 << 20) + snapshotId.encode(),
        "inventory.img": f"inventory {snapshotId}".encode(),
    }


class ChainTests(MigrationCase):
    def dump(self, snapshotId: str, images: dict[str, bytes], readParent: str | None = None) -> Any:
        """As criu (pre-)dump does: append to parent, read it, maybe read the parent's pagemap."""
        client = self.m.dump
        client.pushSnapshotId(snapshotId)
        ids = client.snapshotIds()
        parentPagemap = None
        if readParent is not None:
            parentPagemap = client.read(readParent, "pagemap-42.img")
        for name, data in images.items():
            client.write(snapshotId, name, data)
        client.finishDump()
        return ids, parentPagemap

    @inlineCallbacks
    def test_twoSnapshotChain(self) -> Any:
        """
        A pre-dump then a dump: the parent list grows on both daemons, the
        dump reads its parent's pagemap from the proxy, and the cache serves
        every snapshot of the chain.
        """
        m = self.m
        assert m.proxy and m.cache
        pre, final = chainImages("snap0"), chainImages("snap1")
        delivered = m.proxy.whenSessionDone()
        ids0, _ = yield inThread(self.dump, "snap0", pre)
        yield delivered
        self.assertEqual(ids0, ["snap0"])
        session = m.proxy.session
        assert session is not None
        self.assertEqual(session.state, "delivered")

        delivered = m.proxy.whenSessionDone()
        ids1, parentPagemap = yield inThread(self.dump, "snap1", final, "snap0")
        summary = yield delivered
        self.assertEqual(ids1, ["snap0", "snap1"])
        self.assertEqual(parentPagemap, pre["pagemap-42.img"])
        self.assertIs(m.proxy.session, session)  # one chain
        self.assertEqual(session.dumpsDelivered, 2)
        self.assertEqual(summary.snapshotIds, ["snap0", "snap1"])

        cacheDone = m.cache.whenSessionDone()

        def restore() -> dict[tuple[str, str], Any]:
            got: dict[tuple[str, str], Any] = {("", "ids"): m.restore.snapshotIds()}
            for snapshotId, images in (("snap0", pre), ("snap1", final)):
                for name in images:
                    got[(snapshotId, name)] = m.restore.read(snapshotId, name)
            m.restore.finishRestore()
            return got

        got = yield inThread(restore)
        self.assertEqual(got.pop(("", "ids")), ["snap0", "snap1"])
        expected = {("snap0", n): d for n, d in pre.items()}
        expected.update({("snap1", n): d for n, d in final.items()})
        self.assertEqual(got, expected)
        cacheSummary = yield cacheDone
        self.assertEqual(cacheSummary.snapshotIds, ["snap0", "snap1"])

        # The cache told the proxy: the chain is over, its images dropped.
        yield waitFor(lambda: m.proxy.session is None)  # type: ignore[union-attr]
        self.assertEqual(session.registry.keys(), [])
        self.assertEqual(m.proxy.listSessions(), [])
        # The next dump starts a new chain.
        ids, _ = yield inThread(self.dump, "snap9", chainImages("snap9"))
        self.assertEqual(ids, ["snap9"])
        assert m.proxy.session is not None
        self.assertNotEqual(m.proxy.session.id, session.id)

    @inlineCallbacks
    def test_proxyDoesNotResendDeliveredDumps(self) -> Any:
        """The final dump of a chain sends only its own images (and parent)."""
        m = self.m
        assert m.proxy and m.cache
        delivered = m.proxy.whenSessionDone()
        yield inThread(self.dump, "snap0", chainImages("snap0"))
        yield delivered
        before = m.cache.activity.images.copy()
        delivered = m.proxy.whenSessionDone()
        yield inThread(self.dump, "snap1", chainImages("snap1"))
        yield delivered
        received = sum(m.cache.activity.images.values()) - sum(before.values())
        self.assertEqual(received, len(chainImages("snap1")) + 1)  # + parent

    @inlineCallbacks
    def test_twentySessionsDropEverything(self) -> Any:
        """One migration after another: completed sessions leave nothing behind."""
        m = self.m
        assert m.proxy and m.cache
        for n in range(20):
            images = chainImages(f"s{n}")
            delivered = m.proxy.whenSessionDone()
            cacheDone = m.cache.whenSessionDone()
            yield inThread(self.dump, "/var/lib/criu/migration", images)
            yield delivered

            def restore() -> list[Any]:
                got = [m.restore.read("/var/lib/criu/migration", name) for name in images]
                m.restore.finishRestore()
                return got

            self.assertEqual((yield inThread(restore)), list(images.values()))
            yield cacheDone
            yield waitFor(lambda: m.proxy.session is None)  # type: ignore[union-attr]
            self.assertEqual(m.cache.listSessions(), [])
            self.assertEqual(m.proxy.listSessions(), [])
        self.assertEqual((m.proxy.sessionsCompleted, m.cache.sessionsCompleted), (20, 20))


class SpillLifecycleTests(TestCase):
    """Completed sessions give back memory and spill files."""

    timeout = 60

    @inlineCallbacks
    def test_spillFilesGoneAfterEachSession(self) -> Any:
        m = Migration(self)
        spill = self.mktemp()
        os.makedirs(spill)
        cacheStore = SpillStore(1 << 20, spill)
        proxyStore = SpillStore(1 << 20, spill)
        port = yield m.startCacheWith(store=cacheStore)
        m.startProxy(port.getHost().port, store=proxyStore)
        assert m.proxy and m.cache
        for n in range(3):
            data = os.urandom(3 << 20)
            delivered = m.proxy.whenSessionDone()
            cacheDone = m.cache.whenSessionDone()

            def dump() -> None:
                m.dump.pushSnapshotId("snap")
                m.dump.write("snap", "pages-1.img", data)
                m.dump.finishDump()

            yield inThread(dump)
            yield delivered
            self.assertGreater(cacheStore.onDisk, 0)

            def restore() -> Any:
                got = m.restore.read("snap", "pages-1.img")
                m.restore.finishRestore()
                return got

            self.assertEqual((yield inThread(restore)), data)
            yield cacheDone
            yield waitFor(lambda: m.proxy.session is None)  # type: ignore[union-attr]
            for store in (cacheStore, proxyStore):
                self.assertEqual((store.inMemory, store.onDisk), (0, 0))
                directory = store.directory
                if directory is not None:
                    self.assertEqual(
                        [f for f in os.listdir(directory) if not f.startswith(".")], []
                    )


class KeepAndControlTests(TestCase):
    """--keep, the control API, and the twisted-criu command against it."""

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.m = Migration(self)
        # A 1 MiB budget: the 2 MiB images below spill on the cache.
        port = yield self.m.startCacheWith(keep=True, store=SpillStore(1 << 20, self.mktemp()))
        self.m.startProxy(port.getHost().port)
        assert self.m.cache and self.m.proxy
        self.control = os.path.join(self.m.dst, "cache-control.sock")
        self.proxyControl = os.path.join(self.m.src, "proxy-control.sock")
        for daemon, path in ((self.m.cache, self.control), (self.m.proxy, self.proxyControl)):
            port = yield serverFromString(reactor, unixEndpoint(path)).listen(controlSite(daemon))
            self.addCleanup(port.stopListening)

    def command(self, function: Any, optionsClass: Any, *argv: str) -> Any:
        options = optionsClass()
        options.parseOptions(list(argv))
        out = io.StringIO()
        return function(reactor, options, out).addCallback(lambda _: out.getvalue())

    @inlineCallbacks
    def migrate(self, images: dict[str, bytes]) -> Any:
        m = self.m
        assert m.cache and m.proxy
        delivered = m.proxy.whenSessionDone()
        cacheDone = m.cache.whenSessionDone()

        def dump() -> None:
            m.dump.pushSnapshotId("snap1")
            for name, data in images.items():
                m.dump.write("snap1", name, data)
            m.dump.finishDump()

        yield inThread(dump)
        yield delivered
        listing = yield self.command(cli.ls, cli.LsOptions, "--from", self.m.dst, "-l")
        self.assertIn("delivered", listing)

        def restore() -> None:
            m.restore.read("snap1", "pages-1.img")
            m.restore.finishRestore()

        yield inThread(restore)
        yield cacheDone

    @inlineCallbacks
    def test_keptSessionListedPulledDropped(self) -> Any:
        images = {"pages-1.img": os.urandom(2 << 20), "core-1.img": b"core", "empty.img": b""}
        yield self.migrate(images)
        m = self.m
        assert m.cache
        [kept] = m.cache.listSessions()
        self.assertEqual((kept.kept, kept.state), (True, "kept"))
        self.assertEqual(kept.bytes, sum(map(len, images.values())) + 11)

        listing = yield self.command(cli.ls, cli.LsOptions, "--from", self.control, "-l")
        self.assertIn(f"session {kept.id:>4}  kept", listing)
        self.assertIn("2,097,152  snap1/pages-1.img", listing)
        # what is in memory and what spilled, for the daemon and the session
        self.assertRegex(listing, r"  store: [\d.]+ KiB in memory of a 1\.0 MiB memory limit, 1\.\d MiB spilled to disk\n")
        self.assertRegex(listing, r"kept +4 images +2\.0 MiB \(1\.\d MiB spilled\)")

        target = self.mktemp()
        out = yield self.command(cli.pull, cli.PullOptions, target, "--from", self.m.dst)
        self.assertIn(f"pulled session {kept.id}: 3 images", out)
        for name, data in images.items():
            with open(os.path.join(target, name), "rb") as f:
                self.assertEqual(f.read(), data)
            self.assertEqual(os.stat(os.path.join(target, name)).st_mode & 0o777, 0o600)
        self.assertFalse(os.path.exists(os.path.join(target, "parent")))
        with self.assertRaises(cli.CommandError) as e:  # no silent overwrite
            yield self.command(cli.pull, cli.PullOptions, target, "--from", self.m.dst)
        self.assertIn("exists (use --force to overwrite)", str(e.exception))

        out = yield self.command(cli.drop, cli.DropOptions, kept.id, "--from", self.m.dst)
        self.assertIn(f"dropped session {kept.id}: 4 images", out)  # and parent
        self.assertEqual(m.cache.listSessions(), [])
        with self.assertRaises(cli.CommandError) as e:
            yield self.command(cli.drop, cli.DropOptions, kept.id, "--from", self.m.dst)
        self.assertIn(f"no session {kept.id}", str(e.exception))

    @inlineCallbacks
    def test_busySessionIsNotDropped(self) -> Any:
        m = self.m
        assert m.cache
        yield inThread(m.dump.write, "snap1", "late.img", b"late")
        read = inThread(m.restore.read, "snap1", "late.img")
        yield waitFor(lambda: m.cache.readsWaiting == 1)  # type: ignore[union-attr]
        current = m.cache.session.id  # type: ignore[union-attr]
        with self.assertRaises(cli.CommandError) as e:
            yield self.command(cli.drop, cli.DropOptions, current, "--from", self.control)
        self.assertIn("is busy", str(e.exception))
        yield inThread(m.dump.finishDump)
        self.assertEqual((yield read), b"late")
        with self.assertRaises(cli.CommandError) as e:  # being restored
            yield self.command(cli.drop, cli.DropOptions, current, "--from", self.control)
        self.assertIn("is being restored", str(e.exception))

    @inlineCallbacks
    def test_pullAChain(self) -> Any:
        """A chain is pulled as criu lays one out on disk: DIR, DIR/parent, ..."""
        m = self.m
        assert m.proxy
        for snapshotId in ("snap0", "snap1"):
            delivered = m.proxy.whenSessionDone()

            def dump(snapshotId: str = snapshotId) -> None:
                m.dump.pushSnapshotId(snapshotId)
                m.dump.write(snapshotId, "pages-1.img", snapshotId.encode())
                m.dump.finishDump()

            yield inThread(dump)
            yield delivered
        target = self.mktemp()
        yield self.command(cli.pull, cli.PullOptions, "--from", self.proxyControl, target)
        with open(os.path.join(target, "pages-1.img"), "rb") as f:
            self.assertEqual(f.read(), b"snap1")
        with open(os.path.join(target, "parent", "pages-1.img"), "rb") as f:
            self.assertEqual(f.read(), b"snap0")
        other = self.mktemp()
        yield self.command(
            cli.pull, cli.PullOptions, "--from", self.proxyControl, "--snapshot-id", "snap0", other
        )
        self.assertEqual(sorted(os.listdir(other)), ["pages-1.img"])

    @inlineCallbacks
    def test_noDaemon(self) -> Any:
        with self.assertRaises(cli.CommandError) as e:
            yield self.command(cli.ls, cli.LsOptions, "--from", self.mktemp())
        self.assertIn("no such socket or directory", str(e.exception))
        empty = self.mktemp()
        os.makedirs(empty)
        with self.assertRaises(cli.CommandError) as e:
            yield self.command(cli.ls, cli.LsOptions, "--from", empty)
        self.assertIn("no control socket", str(e.exception))


class PushTests(TestCase):
    """twisted-criu push: an on-disk dump to a cache, as a proxy would."""

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.m = Migration(self)
        port = yield self.m.startCache()
        self.port = port.getHost().port
        self.dumpDir = self.mktemp()
        os.makedirs(self.dumpDir)
        self.images = {
            "pages-1.img": os.urandom(3 << 20),
            "inventory.img": b"inventory",
            "pipes-data.img": b"",
        }
        for name, data in self.images.items():
            with open(os.path.join(self.dumpDir, name), "wb") as f:
                f.write(data)
        with open(os.path.join(self.dumpDir, "dump.log"), "w") as f:
            f.write("criu's log is not an image\n")
        os.symlink("/etc", os.path.join(self.dumpDir, "parent"))

    def push(self, *argv: str) -> Any:
        options = cli.PushOptions()
        options.parseOptions(
            [self.dumpDir, "--address", "127.0.0.1", "--port", str(self.port), "--plain-link", *argv]
        )
        out = io.StringIO()
        return cli.push(reactor, options, out).addCallback(lambda _: out.getvalue())

    @inlineCallbacks
    def test_pushForStreamRestore(self) -> Any:
        out = yield self.push()
        self.assertIn("pushed 3 images", out)
        self.assertIn("confirmed by the cache", out)
        from twisted_criu.testing.criu import StreamClient

        def restore() -> dict[str, Any]:
            client = StreamClient(self.m.serveSocket, timeout=10)
            got = {name: client.read(name) for name in [*self.images, "dump.log", "memfd.img"]}
            client.close()
            return got

        got = yield inThread(restore)
        self.assertIsNone(got.pop("dump.log"))
        self.assertIsNone(got.pop("memfd.img"))
        self.assertEqual(got, self.images)

    @inlineCallbacks
    def test_pushForRemoteRestore(self) -> Any:
        yield self.push("--snapshot-id", "/var/lib/criu/migration", "--checksum")
        m = self.m

        def restore() -> Any:
            ids = m.restore.snapshotIds()
            got = {n: m.restore.read("/var/lib/criu/migration", n) for n in self.images}
            m.restore.finishRestore()
            return ids, got

        ids, got = yield inThread(restore)
        self.assertEqual(ids, ["/var/lib/criu/migration"])
        self.assertEqual(got, self.images)

    @inlineCallbacks
    def test_nobodyListening(self) -> Any:
        """A refused connection fails the push at once, not after --timeout."""
        self.port = 1  # nothing listens there
        started = reactor.seconds()
        with self.assertRaises(cli.CommandError) as e:
            yield self.push("--timeout", "30")
        self.assertIn("refused the connection: is criu-cache running there", str(e.exception))
        self.assertLess(reactor.seconds() - started, 10)

    def test_imageFiles(self) -> None:
        self.assertEqual(
            cli.imageFiles(self.dumpDir), ["inventory.img", "pages-1.img", "pipes-data.img"]
        )

    def test_needsADestination(self) -> None:
        from twisted.python import usage

        options = cli.PushOptions()
        with self.assertRaises(usage.UsageError):
            options.parseOptions([self.dumpDir])
