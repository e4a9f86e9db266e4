"""
A migration that never loses the process: twisted-criu-hook's confirmation
at post-dump, aborted dumps, one cache session per migration, restores that
can be run again (issue 11).  Both daemons run in-process on loopback,
criu is played by L{LocalImageClient} and L{StreamClient}, the hook is the
real L{runHook} talking to the daemons' control sockets.
"""

from __future__ import annotations

import io
import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_criu import cli
from twisted_criu.hook import runHook
from twisted_criu.criu.settle import connectionsWaiting, unreadBytes
from twisted_criu.daemons.control import controlSite
from twisted_criu.testing.criu import StreamClient
from twisted_criu.twistd.options import unixEndpoint

from .helpers import Migration, inThread, waitFor

FILES = {"pages-1.img": os.urandom(3 << 20), "core-1.img": b"core", "inventory.img": b"inventory"}


class _Hooked(TestCase):
    """Both daemons with their control sockets, --stream clients, and the hook."""

    timeout = 60
    cacheArgs: dict[str, Any] = {}
    proxyArgs: dict[str, Any] = {}

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.m = Migration(self)
        port = yield self.m.startCacheWith(restoreGrace=0.5, **self.cacheArgs)
        self.cachePort = port.getHost().port
        self.m.startProxy(self.cachePort, **self.proxyArgs)
        assert self.m.cache and self.m.proxy
        self.cacheControl = os.path.join(self.m.dst, "cache-control.sock")
        self.proxyControl = os.path.join(self.m.src, "proxy-control.sock")
        for daemon, path in ((self.m.cache, self.cacheControl), (self.m.proxy, self.proxyControl)):
            listening = yield serverFromString(reactor, unixEndpoint(path)).listen(controlSite(daemon))
            self.addCleanup(listening.stopListening)
        self.capture = StreamClient(self.m.captureSocket, timeout=20)
        self.addCleanup(self.capture.close)

    def hook(self, action: str) -> Any:
        """Run twisted-criu-hook at C{action}; fires with (exit status, what it printed)."""
        path = self.proxyControl if action == "post-dump" else self.cacheControl

        def run() -> tuple[int, str]:
            out = io.StringIO()
            status = runHook(action, path, out)
            return status, out.getvalue()

        return inThread(run)

    def logged(self, text: str) -> bool:
        return any(text in e["log_format"].format(**e) for e in self.events if "log_format" in e)

    def dumpFiles(self, files: dict[str, bytes] = FILES) -> Any:
        def dump() -> None:
            for name, data in files.items():
                self.capture.write(name, data)

        return inThread(dump)

    def restoreFiles(self, names: Any = FILES) -> Any:
        def restore() -> dict[str, bytes | None]:
            serve = StreamClient(self.m.serveSocket, timeout=20)
            try:
                return {name: serve.read(name) for name in names}
            finally:
                serve.close()

        return inThread(restore)

    def cacheStates(self) -> list[str]:
        assert self.m.cache
        return [s.state for s in self.m.cache.sessions.values()]


class PostDumpTests(_Hooked):
    proxyArgs = {"linkTimeout": 2.0}

    @inlineCallbacks
    def test_confirmedBeforeCriuCloses(self) -> Any:
        """
        post-dump runs before criu closes its --stream connection: the hook
        returns 0 once the cache holds every image, and the session is
        delivered already.
        """
        yield self.dumpFiles()
        status, out = yield self.hook("post-dump")
        self.assertEqual(status, 0, out)
        self.assertIn("the cache holds all 3 images", out)
        self.assertEqual(self.cacheStates(), ["delivered"])
        yield inThread(self.capture.close)
        self.assertEqual((yield self.restoreFiles()), FILES)

    @inlineCallbacks
    def test_waitsForWhatCriuStillWrites(self) -> Any:
        """The hook confirms only once every pipe criu wrote has been read whole."""
        data = os.urandom(4 << 20)
        writer = yield inThread(self.capture.openWrite, "pages-1.img")
        yield inThread(writer.write, data[: 1 << 20])
        confirming = self.hook("post-dump")
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertNoResult(confirming)
        yield inThread(writer.write, data[1 << 20 :])
        yield inThread(writer.close)
        status, out = yield confirming
        self.assertEqual(status, 0, out)
        self.assertIn(f"all 1 images ({len(data)} bytes)", out)

    @inlineCallbacks
    def test_cacheGoneResumesAndAborts(self) -> Any:
        """
        No cache: nothing moves for the link timeout, the hook exits 1 (criu
        resumes the process), the proxy aborts the session, and the next
        dump is a new session.
        """
        assert self.m.cache and self.m.proxy
        yield self.m.cache.stopService()
        yield self.dumpFiles()
        first = self.m.proxy.session
        status, out = yield self.hook("post-dump")
        self.assertEqual(status, 1)
        self.assertIn("criu resumes the process", out)
        self.assertIn("nothing moved for 2 s", out)
        self.assertTrue(self.logged("session 1 aborted"))
        yield inThread(self.capture.close)
        yield inThread(self.m.dump.write, "snap", "a.img", b"a")
        yield waitFor(
            lambda: self.m.proxy.session is not first  # type: ignore[union-attr]
            and self.m.proxy.session.registry.keys() == [("snap", "a.img")]  # type: ignore[union-attr]
        )

    @inlineCallbacks
    def test_stalledCacheGetsAbort(self) -> Any:
        """
        The cache stops reading: the hook fails, and once the link is back
        the proxy tells the cache, which aborts the session: it is never
        restored.
        """
        assert self.m.cache and self.m.proxy
        yield inThread(self.capture.write, "core-1.img", b"core")
        yield waitFor(lambda: self.cacheStates() == ["dumping"])
        port = self.m.cache.remoteEndpoint.port
        assert port is not None
        yield port.stopListening()  # a new connection gets nowhere either
        for link in list(self.m.cache._links):
            link.transport.pauseProducing()  # type: ignore[attr-defined]
        yield inThread(self.capture.write, "pages-1.img", os.urandom(32 << 20))
        status, out = yield self.hook("post-dump")
        self.assertEqual(status, 1, out)
        self.assertTrue(self.logged("session 1 aborted: the post-dump hook gets no confirmation"))
        port.port = self.cachePort  # type: ignore[attr-defined]
        port.startListening()
        # The cache catches up and sees that the proxy dropped its old link
        # (on a plain link, a second link for the session is refused while
        # the first looks alive; with the link key it would replace it).
        for link in list(self.m.cache._links):
            link.transport.resumeProducing()  # type: ignore[attr-defined]
        yield waitFor(lambda: self.logged("session 1 aborted: the proxy says criu's dump failed"))
        self.assertEqual(self.m.cache.sessions, {})
        self.assertEqual(self.m.proxy.listSessions(), [])
        self.assertEqual((yield self.restoreFiles(["core-1.img"])), {"core-1.img": None})

    @inlineCallbacks
    def test_linkCutWhileConfirmingIsResent(self) -> Any:
        """The link breaks while the hook waits: the next connection sends everything again."""
        assert self.m.cache and self.m.proxy
        yield self.dumpFiles({"pages-1.img": os.urandom(24 << 20)})
        confirming = self.hook("post-dump")
        yield waitFor(lambda: self.m.proxy.session is not None and self.m.proxy.session.sender is not None)  # type: ignore[union-attr]
        self.m.proxy.session.sender.abort()  # type: ignore[union-attr]
        status, out = yield confirming
        self.assertEqual(status, 0, out)
        self.assertEqual(self.cacheStates(), ["delivered"])

    @inlineCallbacks
    def test_noDumpNoConfirmation(self) -> Any:
        assert self.m.proxy
        yield self.m.proxy.session.stop()  # type: ignore[union-attr]
        self.m.proxy.session = None
        status, out = yield self.hook("post-dump")
        self.assertEqual(status, 1)
        self.assertIn("no dump under way", out)


class RestoreTests(_Hooked):
    @inlineCallbacks
    def dumped(self) -> Any:
        yield self.dumpFiles()
        status, out = yield self.hook("post-dump")
        self.assertEqual(status, 0, out)
        yield inThread(self.capture.close)

    @inlineCallbacks
    def test_hookedRestoreRetried(self) -> Any:
        """
        A hooked restore that never confirms (criu failed after reading) is
        served again to the next restore; post-resume ends the session on
        both daemons.
        """
        assert self.m.cache and self.m.proxy
        yield self.dumped()
        status, _ = yield self.hook("pre-restore")
        self.assertEqual(status, 0)
        self.assertEqual((yield self.restoreFiles()), FILES)
        self.assertEqual(self.cacheStates(), ["restoring"])  # waits for post-resume
        status, _ = yield self.hook("pre-restore")  # criu is run again
        self.assertEqual(self.cacheStates(), ["failed-restore"])
        self.assertEqual((yield self.restoreFiles()), FILES)
        status, out = yield self.hook("post-resume")
        self.assertEqual(status, 0, out)
        self.assertIn("restore of session 1 confirmed", out)
        self.assertEqual(self.m.cache.sessions, {})
        yield waitFor(lambda: self.m.proxy.listSessions() == [])  # type: ignore[union-attr]

    @inlineCallbacks
    def test_remoteFinishThenPostResume(self) -> Any:
        """criu --remote's finish confirms the restore; the hook's post-resume after it is fine too."""
        assert self.m.cache
        m = self.m

        def dumpAndRestore() -> bytes | None:
            m.dump.write("snap1", "core-1.img", b"core")
            m.dump.finishDump()
            data = m.restore.read("snap1", "core-1.img")
            m.restore.finishRestore()
            return data

        self.assertEqual((yield inThread(dumpAndRestore)), b"core")
        yield waitFor(lambda: self.m.cache.sessions == {})  # type: ignore[union-attr]
        status, out = yield self.hook("post-resume")
        self.assertEqual(status, 0, out)
        self.assertIn("restore of session 1 confirmed", out)

    @inlineCallbacks
    def test_preRestoreAfterCriuConnected(self) -> Any:
        """criu --stream reads before it runs pre-restore: the same restore is then hooked."""
        assert self.m.cache
        yield self.dumped()

        def restore() -> Any:
            serve = StreamClient(self.m.serveSocket, timeout=20)
            got = serve.read("inventory.img")
            status = runHook("pre-restore", self.cacheControl, io.StringIO())
            rest = {name: serve.read(name) for name in FILES}
            serve.close()
            return got, status, rest

        got, status, rest = yield inThread(restore)
        self.assertEqual((got, status, rest), (b"inventory", 0, FILES))
        self.assertEqual(self.cacheStates(), ["restoring"])
        self.assertFalse(self.logged("was never confirmed"))

    @inlineCallbacks
    def test_killedBeforePreRestoreKeepsImages(self) -> Any:
        """
        criu restore killed after reading a few files, before its hook ran:
        the connection closes as a finished one would, but a dump the hook
        confirmed ends only with the hook's confirmation.
        """
        yield self.dumped()
        self.assertEqual((yield self.restoreFiles(["inventory.img"])), {"inventory.img": b"inventory"})
        self.assertEqual(self.cacheStates(), ["restoring"])
        self.assertEqual((yield self.restoreFiles()), FILES)  # the retry

    @inlineCallbacks
    def test_brokenRestoreKeepsImages(self) -> Any:
        """Without the hook, a --stream restore whose pipe broke is served again."""
        yield self.dumped()

        def brokenRestore() -> None:
            serve = StreamClient(self.m.serveSocket, timeout=20)
            reader = serve.openRead("pages-1.img")
            assert reader is not None
            reader.read(1000)
            reader.close()  # criu died: the pipe breaks
            serve.close()

        yield inThread(brokenRestore)
        yield waitFor(lambda: self.cacheStates() == ["failed-restore"])
        self.assertEqual((yield self.restoreFiles()), FILES)

    @inlineCallbacks
    def test_restartedCacheGetsTheDeliveredDumpAgain(self) -> Any:
        """The cache restarts after delivery: the proxy resends and ends the dump; the restore works."""
        assert self.m.cache
        yield self.dumped()
        yield waitFor(lambda: self.m.proxy.session.state == "delivered")  # type: ignore[union-attr]
        links = list(self.m.cache._links)
        yield self.m.cache.stopService()
        for link in links:  # as a killed cache's would
            link.transport.abortConnection()  # type: ignore[attr-defined]
        yield self.m.startCache(self.cachePort, restoreGrace=0.5)
        yield waitFor(lambda: self.cacheStates() == ["delivered"])
        self.assertEqual((yield self.restoreFiles()), FILES)

    @inlineCallbacks
    def test_nothingToRestoreFailsAtOnce(self) -> Any:
        """With no session delivered and no proxy sending, a restore gets ENOENT at once."""
        assert self.m.proxy
        yield self.m.proxy.stopService()
        yield waitFor(lambda: not self.m.cache.proxiesLinked)  # type: ignore[union-attr]
        yield deferLater(reactor, 0.6, lambda: None)  # past the start-up grace
        self.assertEqual((yield self.restoreFiles(["inventory.img"])), {"inventory.img": None})
        self.assertTrue(self.logged("no session is delivered: nothing to restore"))


class SessionTests(_Hooked):
    """Issue 11's reproductions 3 and 4, and the retention time."""

    cacheArgs = {"retain": 1.0}

    @inlineCallbacks
    def test_staleParentNeverServed(self) -> Any:
        """A pre-dump and a dump with no finish between: a restore read at once sees both ids."""
        m = self.m

        def chain() -> list[str]:
            m.dump.pushSnapshotId("pre1")
            m.dump.write("pre1", "pages-1.img", os.urandom(2 << 20))
            m.dump.pushSnapshotId("dump2")
            m.dump.write("dump2", "pages-1.img", os.urandom(2 << 20))
            m.dump.finishDump()
            return m.restore.snapshotIds()

        self.assertEqual((yield inThread(chain)), ["pre1", "dump2"])

    @inlineCallbacks
    def test_pushedSessionDoesNotMix(self) -> Any:
        """
        Images pushed and never restored are their own session: the next
        dump's restore gets the dump, and the pushed session can be dropped
        while the proxy is linked.
        """
        assert self.m.cache
        directory = self.mktemp()
        os.makedirs(directory)
        for name, data in (("pipes-data.img", b""), ("inventory.img", b"pushed inventory")):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        options = cli.PushOptions()
        options.parseOptions([directory, "--to", f"tcp:host=127.0.0.1:port={self.cachePort}", "--plain-link"])
        yield cli.push(reactor, options, io.StringIO())
        [pushed] = list(self.m.cache.sessions)
        yield self.dumpFiles()
        yield inThread(self.capture.close)
        yield waitFor(lambda: self.cacheStates() == ["delivered", "delivered"])
        got = yield self.restoreFiles([*FILES, "pipes-data.img"])
        self.assertEqual(got, {**FILES, "pipes-data.img": None})
        dropOptions = cli.DropOptions()
        dropOptions.parseOptions([pushed, "--from", self.cacheControl])
        out = io.StringIO()
        yield cli.drop(reactor, dropOptions, out)
        self.assertIn(f"dropped session {pushed}", out.getvalue())

    @inlineCallbacks
    def test_unrestoredSessionDroppedAfterRetention(self) -> Any:
        """--retain: a delivered session nobody restores is dropped, on both daemons."""
        assert self.m.cache and self.m.proxy
        yield self.dumpFiles()
        yield inThread(self.capture.close)
        yield waitFor(lambda: self.cacheStates() == ["delivered"])
        yield waitFor(lambda: self.m.cache.sessions == {}, timeout=5)  # type: ignore[union-attr]
        self.assertTrue(self.logged("was not restored within --retain 1 s"))
        yield waitFor(lambda: self.m.proxy.listSessions() == [])  # type: ignore[union-attr]


class UnconfirmedRestoreTests(_Hooked):
    cacheArgs = {"retain": 1.0}

    @inlineCallbacks
    def test_unconfirmedRestoreDroppedAfterRetention(self) -> Any:
        """--retain: a restore that is never confirmed keeps the images that long, no longer."""
        assert self.m.cache
        yield self.dumpFiles()
        status, out = yield self.hook("post-dump")
        self.assertEqual(status, 0, out)
        yield inThread(self.capture.close)
        self.assertEqual((yield self.restoreFiles()), FILES)
        self.assertEqual(self.cacheStates(), ["restoring"])  # a hooked dump waits for post-resume
        yield waitFor(lambda: self.m.cache.sessions == {}, timeout=5)  # type: ignore[union-attr]
        self.assertTrue(self.logged("was not restored within --retain 1 s"))


class SettleTests(SynchronousTestCase):
    """What the proxy asks the kernel before it confirms a dump."""

    def test_unreadBytes(self) -> None:
        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)

        class Transport:
            def fileno(self) -> int:
                return right.fileno()

        self.assertEqual(unreadBytes(Transport()), 0)
        left.sendall(b"x" * 1000)
        self.assertEqual(unreadBytes(Transport()), 1000)
        right.recv(400)
        self.assertEqual(unreadBytes(Transport()), 600)

    def test_connectionsWaiting(self) -> None:
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(5)
        self.assertFalse(connectionsWaiting(server))
        client = socket.create_connection(server.getsockname())
        self.addCleanup(client.close)
        self.assertTrue(connectionsWaiting(server))
        server.accept()[0].close()
        self.assertFalse(connectionsWaiting(server))
