"""
The attacks of issue 15 ("Secure by default"), run against real C{twistd
criu-proxy} and C{twistd criu-cache} processes on loopback and UNIX sockets.

Each test is one attack, made by C{tests/slow/attacker.py} run as C{nobody}
(C{setpriv}), and checks what the user would: the attack fails for the
attacker (refused or closed, bounded in time, memory and descriptors, with
a clear line in the daemon's log), and the legitimate migration around it
still succeeds, every image read back byte-exact.

Link attacks (1-4) come from a local user; a peer from the network is
played by a cache started with C{--allow-local-users} (that user then gets
past the local-owner check, as a remote peer does).  UNIX-socket attacks
(5-7) need a user who may connect: the daemons share their sockets with a
group (C{--socket-mode 660}, images directories set-group-ID to
C{nogroup}), the attacker's.  Every daemon's command line comes from
L{daemonArgs}.  Needs root (C{setpriv}, C{chown}).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from tests.slow import test_process_failures as pf
from tests.slow.hostile import (
    FORGED, STEP, MiB, SNAP, AttackCase, Sampler, attack, cpuSeconds, descriptors, images, lastReport, spawn,
    twistedCriu, vm, waitForLog,
)
from twisted_criu import wire
from twisted_criu.daemons.restores import LINKED_GRACE
from twisted_criu.testing.criu import LocalImageClient


class LinkAttackTests(AttackCase):
    """Attacks 1-4: on the cache's link port."""

    def test_1_localUserReplacesDeliveredImage(self) -> None:
        """
        After a delivered dump, a local user sends a header for core-1.img
        and 8 bytes (with a made-up session and an end of dump, or none at
        all, as CRIU's C proxy): closed before anything is read.  (Before
        any dump: L{tests.test_allow}.)
        """
        self.startPair()
        dumped = images("1")
        self.dump(dumped)
        v3 = wire.LINK_EXTENSION_VERSION
        evil = wire.RemoteHeader("core-1.img", SNAP, wire.O_WRONLY, 8, None, v3, session="evil").toBytes()
        ended = evil + b"EVILBYTE" + wire.RemoteHeader("", "", 1, 0, None, v3, session="evil").toBytes()
        anonymous = wire.RemoteHeader("core-1.img", SNAP, wire.O_WRONLY, 8, None).toBytes() + b"EVILBYTE"
        for frames in (ended, anonymous):
            report = attack("send", f"127.0.0.1:{self.port}", frames.hex(), "5")
            self.assertRefusedAtOnce(report)
            print(f"attack 1: link closed after {report['seconds']} s")
        waitForLog(self.cache, r"refused a link from 127\.0\.0\.1:\d+: a loopback peer of uid 65534, not of uid 0", 2)
        # Closed sockets are listed as root's: send and close at once, or
        # connect from a port that also has a TIME_WAIT socket.
        self.assertEqual(attack("burst", f"127.0.0.1:{self.port}", ended.hex(), "40")["sent"], 40)
        reused = attack("reuse", f"127.0.0.1:{self.port}", ended.hex(), "20")
        print(f"attack 1: 40 sent-and-closed links, 20 from a TIME_WAIT port: {reused['accepted']} accepted")
        self.assertEqual(reused["accepted"], 0)
        waitForLog(self.cache, r"refused a link from ", 2 + 40 + 20)
        self.assertEqual(self.cacheSessions(), [("1", "delivered")])
        self.restore(dumped)

    def test_2_secondProxyWhileLinked(self) -> None:
        """While the real proxy's dump arrives, a second "proxy" sends a fake inventory.img: refused."""
        self.startPair()
        dumped = images("2")
        inventory = dumped.pop("inventory.img")
        self.dump(dumped, finish=False)
        fake = b"FAKE INVENTORY"
        v3 = wire.LINK_EXTENSION_VERSION
        for session in ("made-up", None):
            header = wire.RemoteHeader(
                "inventory.img", SNAP, wire.O_WRONLY, len(fake), None, v3 if session else None, session=session
            )
            report = attack("send", f"127.0.0.1:{self.port}", (header.toBytes() + fake).hex(), "5")
            self.assertRefusedAtOnce(report)
            print(f"attack 2: second proxy closed after {report['seconds']} s")
        waitForLog(self.cache, r"refused a link from .*: a loopback peer of uid 65534", 2)
        self.assertEqual(self.cacheSessions(), [("1", "dumping")])
        self.assertEqual(len(re.findall(r"proxy connected from", self.cache.log())), 1)
        pf.writeImage(self.path("img-proxy.sock"), "inventory.img", inventory)
        dumped["inventory.img"] = inventory
        self.finishDump(dumped)
        self.restore(dumped)

    def test_3_4_refusedBeforeAnythingIsRead(self) -> None:
        """By default a local user's silent connections and port scans are closed at once."""
        self.startPair()
        for how in ("idle", "drip"):
            report = attack(how, f"127.0.0.1:{self.port}", "10")
            self.assertRefusedAtOnce(report)
            print(f"attack 3 ({how}, local user): closed after {report['seconds']} s")
        self.assertEqual(attack("scan", f"127.0.0.1:{self.port}", "20")["sent"], 20)
        waitForLog(self.cache, r"refused a link from .*: a (loopback|local) peer (of uid 65534|whose socket is)", 22)
        dumped = images("3")
        self.dump(dumped)
        self.restore(dumped)

    def test_3_silentConnectionsBlockNoRestore(self) -> None:
        """
        With the default link (the link key), a peer past the owner check
        that holds an idle connection and one that drips a byte a second
        never becomes a link: both are dropped at the handshake deadline;
        a restore with nothing to read gets ENOENT after the grace, and a
        migration goes through.
        """
        self.silentConnections(plain=False)

    def test_3_silentConnectionsOnAPlainLink(self) -> None:
        """The same with --plain-link, where nothing is refused before a header."""
        self.silentConnections(plain=True)

    def silentConnections(self, plain: bool) -> None:
        link = ["--plain-link"] if plain else []
        self.startPair(cacheArgs=["--allow-local-users", *link], proxyArgs=link, withProxy=False)
        silent = [spawn(how, f"127.0.0.1:{self.port}", "300") for how in ("idle", "drip")]
        for process in silent:
            self.addCleanup(process.wait, 10)
            self.addCleanup(process.kill)
        if plain:
            waitForLog(self.cache, r"proxy connected from", 2)
        cacheSocket = self.path("img-cache.sock")
        for _ in range(2):
            started = time.monotonic()
            self.assertIsNone(pf.readImage(cacheSocket, "inventory.img"))
            waited = time.monotonic() - started
            self.assertLess(waited, LINKED_GRACE + 3)
            print(f"attack 3 (idle + drip past the owner check, plain={plain}): ENOENT after {waited:.2f} s")
        waitForLog(self.cache, r"criu restore asks for images, but no session is delivered", 2)
        if not plain:
            started = time.monotonic()
            # the drip's first byte is no TLS; the idle one meets the deadline
            waitForLog(self.cache, r"TLS: refused a connection from 127.0.0.1:\d+: handshake failed: ", 2)
            waitForLog(self.cache, r"handshake failed: no TLS handshake within 10 s", 1)
            print(f"attack 3 (link key): both silent connections dropped, {time.monotonic() - started:.2f} s after the restores' ENOENT")
            self.assertNotIn("proxy connected from", self.cache.log())
        self.startProxy()
        dumped = images("3b")
        self.dump(dumped)
        self.restore(dumped)
        stillOpen = [process.poll() is None for process in silent]
        print(f"attack 3: silent connections still open after the migration: {stillOpen}")
        self.assertNotIn("Unhandled", self.cache.log())

    def test_4_portScanBeforeTheProxy(self) -> None:
        """
        Port scans while a restore waits for a proxy that is not there yet:
        the read does not fail; it gets its image once the proxy delivers.
        """
        self.startPair(
            cacheArgs=["--allow-local-users"], proxyArgs=["--max-retry-delay", "0.5"], withCache=False, withProxy=False
        )
        self.proxy.start()  # before the cache: it takes the dump
        dumped = images("4")
        proxySocket = self.path("img-proxy.sock")
        pf.pushSnapshotId(proxySocket)
        for name, data in dumped.items():
            pf.writeImage(proxySocket, name, data)
        LocalImageClient(proxySocket, timeout=STEP).finishDump()
        waitForLog(self.proxy, r"dump finished: 5 images")
        assert self.proxy.process is not None
        self.proxy.process.send_signal(signal.SIGSTOP)  # it connects when we say so
        self.addCleanup(self.proxy.process.send_signal, signal.SIGCONT)
        self.cache.start()
        waiting = pf.Background(pf.readImage, self.path("img-cache.sock"), "core-1.img")
        waitForLog(self.cache, r"a restore waits for")
        self.assertEqual(attack("scan", f"127.0.0.1:{self.port}", "20")["sent"], 20)
        time.sleep(1.2)  # the C daemons' restore failed 1 s after a stray close
        # With the link key none of them even becomes a link.
        self.assertEqual(len(re.findall(r"TLS: refused a connection from 127.0.0.1:\d+: handshake failed", self.cache.log())), 20)
        self.assertEqual(len(re.findall(r"proxy connected from", self.cache.log())), 0)
        self.assertFalse(waiting.done, "the waiting read ended before the proxy came")
        self.proxy.process.send_signal(signal.SIGCONT)
        got = waiting.result()
        self.assertEqual(got, dumped["core-1.img"])
        print(f"attack 4: the waiting read got core-1.img after {time.monotonic() - waiting.started:.2f} s")
        waitForLog(self.cache, r"session 1 delivered")
        self.restore(dumped)
        self.assertNotIn("no session is delivered", self.cache.log())


class SocketAttackTests(AttackCase):
    """Attacks 5-7: on the daemons' UNIX sockets."""

    def test_socketsClosedToOtherUsers(self) -> None:
        """By default no other user may even connect to a daemon's socket."""
        self.startPair()
        for name in ("img-proxy.sock", "streamer-capture.sock", "proxy-control.sock",
                     "img-cache.sock", "streamer-serve.sock", "cache-control.sock"):
            report = attack("idle", self.path(name), "1")
            self.assertFalse(report["connected"], name)
            self.assertIn("PermissionError", report["error"])

    def test_5_streamJunk(self) -> None:
        """
        criu restore --stream's socket: a request for a missing file, then
        48 MiB of junk (random, or more requests), while its answer is
        pending and after: closed once read, memory and CPU bounded, the
        migration unharmed.
        """
        self.startPair(shared=True)
        dumped = images("5")
        self.dump(dumped, finish=False)
        pid = self.cache.process.pid  # type: ignore[union-attr]
        junk = ["junk", self.path("streamer-serve.sock"), wire.StreamRequest("missing.img").toBytes().hex(), "48"]
        before = (vm(pid, "VmRSS"), vm(pid, "VmHWM"), cpuSeconds(pid))
        pending = spawn(*junk, "random", "0.5")
        self.addCleanup(pending.kill)
        waitForLog(self.cache, r"a restore waits for session 1, whose dump is still arriving")
        time.sleep(2)  # the answer is pending: the junk waits in the socket, unread
        answered = time.monotonic()
        self.finishDump(dumped)
        out, _ = pending.communicate(timeout=60)
        self.assertJunkBounded("random, its answer pending 2 s", lastReport(out), before, answered)
        for kind in ("random", "repeat"):
            before = (vm(pid, "VmRSS"), vm(pid, "VmHWM"), cpuSeconds(pid))
            report = attack(*junk, kind)
            self.assertJunkBounded(f"{kind}, answered at once", report, before)
        self.assertEqual(len(re.findall(r"criu --stream session failed, closing its pipes: ", self.cache.log())), 3)
        self.assertNotIn("Unhandled", self.cache.log())
        self.restore(dumped)

    def assertJunkBounded(
        self, what: str, report: dict[str, Any], before: tuple[int, int, float], since: float | None = None
    ) -> None:
        """Closed within 2 s of the answer (or of connecting), less than 16 MiB more memory, 2 s of CPU."""
        pid = self.cache.process.pid  # type: ignore[union-attr]
        rss, peak, cpu = before
        self.assertTrue(report["closed"], report)
        closing = report["seconds"] if since is None else report["closedAt"] - since
        grown, peakGrown = (vm(pid, "VmRSS") - rss) / MiB, (vm(pid, "VmHWM") - peak) / MiB
        spent = cpuSeconds(pid) - cpu
        figures = (
            f"attack 5 ({what}): {report['sent'] / MiB:.2f} of 48 MiB taken, closed after"
            f" {closing:.3f} s; RSS {rss / MiB:.1f} MiB"
            f" +{grown:.1f}, peak +{peakGrown:.1f}; CPU {spent:.2f} s"
        )
        print(figures)
        self.assertLess(closing, 2.0, figures)
        self.assertLess(report["sent"], 4 * MiB, figures)
        self.assertLess(max(grown, peakGrown), 16, figures)
        self.assertLess(spent, 2.0, figures)

    def test_6_descriptorFlood(self) -> None:
        """5,000 descriptors on one connection to img-proxy.sock, then img-cache.sock, during a migration."""
        self.startPair(shared=True)
        dumped = images("6")
        self.dump(dumped, finish=False)
        for daemon, name in ((self.proxy, "img-proxy.sock"), (self.cache, "img-cache.sock")):
            pid = daemon.process.pid  # type: ignore[union-attr]
            before = len(descriptors(pid))
            sampler = Sampler(pid)
            report = attack("fds", self.path(name), "5000")
            peak = sampler.stop()
            pf.waitUntil(self, lambda: len(descriptors(pid)) <= before, f"{daemon.kind} closed every descriptor")
            figures = (
                f"attack 6 ({name}): {report['sent']} of 5000 descriptors taken, closed after"
                f" {report['seconds']} s; daemon's descriptors {before}, at most {peak} during, "
                f"{len(descriptors(pid))} after"
            )
            print(figures)
            self.assertTrue(report["closed"], report)
            self.assertLess(report["seconds"], 2.0, figures)
            self.assertLessEqual(peak, before + 4, figures)
            # One line for the connection, not one per descriptor.
            refused = re.findall(r"bad request from criu, closing its connection: (.*)", daemon.log())
            self.assertEqual(refused, ["more than one file descriptor passed"], figures)
        self.finishDump(dumped)
        self.restore(dumped)

    def test_7_controlCharactersInNames(self) -> None:
        """
        Image names and snapshot ids with ESC or a newline, on every
        protocol: refused at the edge with a logged error; no log, no
        C{twisted-criu ls} output and no pulled file name holds a raw
        control character.
        """
        # --plain-link: a link peer reaches the header parser (with the link
        # key only a key holder could).
        self.startPair(cacheArgs=["--plain-link"], proxyArgs=["--plain-link"], shared=True)
        dumped = images("7")
        self.dump(dumped, finish=False)
        escape, newline = "core\x1b[2J\x1b]0;pwned\x07-1.img", "x.img\n" + FORGED
        hostile = [
            ("img-proxy.sock", wire.LocalRequest(escape, SNAP, wire.O_WRONLY).toBytes()),
            ("img-proxy.sock", wire.LocalRequest(newline, SNAP, wire.O_WRONLY).toBytes()),
            ("img-proxy.sock", wire.LocalRequest("core-2.img", "snap\x1b[31m\n" + FORGED, wire.O_WRONLY).toBytes()),
            ("img-cache.sock", wire.LocalRequest(escape, SNAP, wire.O_RDONLY).toBytes()),
            ("streamer-serve.sock", wire.StreamRequest(newline).toBytes()),
        ]
        for name, frame in hostile:
            self.assertRefusedAtOnce(attack("send", self.path(name), frame.hex(), "5"))
        # On the link: a peer past the owner check (root here, as a remote proxy would be).
        header = wire.RemoteHeader(newline, SNAP, 1, 8, None, wire.LINK_EXTENSION_VERSION, session="evil")
        frames = (header.toBytes() + b"EVILBYTE").hex()
        self.assertRefusedAtOnce(attack("send", f"127.0.0.1:{self.port}", frames, "5", user=[]))
        refusals = (
            r"(?:bad request from criu, closing its connection|criu --stream session failed, closing its pipes"
            r"|bad frame from the proxy, dropping the link): (?:image name|snapshot id) with a control character '"
        )
        waitForLog(self.proxy, refusals, 3)
        waitForLog(self.cache, refusals, 3)
        self.finishDump(dumped)
        pulled = self.base / "pulled"
        listings = [twistedCriu("ls", "-l", "--from", str(d)) for d in (self.src, self.dst)]
        listings.append(twistedCriu("pull", "--from", str(self.dst), str(pulled)))
        self.restore(dumped)
        for text in [*listings, *(d.log() + Path(f"{d.logPath()}.out").read_text() for d in (self.proxy, self.cache))]:
            self.assertIsNone(re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", text), text[-2000:])
            self.assertNotIn("\n" + FORGED, text)
        self.assertEqual(sorted(os.listdir(pulled)), sorted(dumped))

    def test_7_controlSocket(self) -> None:
        """
        The control API: a 64 MiB body is refused at its headers, a chunked
        one is never spooled to a file, a silent connection is closed after
        --client-timeout.
        """
        self.startPair(cacheArgs=["--client-timeout", "2"], proxyArgs=["--client-timeout", "2"], shared=True)
        control = self.path("cache-control.sock")
        head = b"POST /hook/post-restore HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (64 * MiB)
        report = attack("junk", control, head.hex(), "64", "random")
        print(f"attack 7 (64 MiB control body): {report['sent'] / MiB:.2f} MiB taken, closed"
              f" after {report['seconds']} s")
        self.assertTrue(report["closed"], report)
        self.assertLess(report["sent"], 4 * MiB, report)
        waitForLog(self.cache, r"control request with a body of 67108864 bytes \(at most 4096\) dropped")

        pid = self.cache.process.pid  # type: ignore[union-attr]
        files = set(path for path in descriptors(pid).values() if path.startswith("/"))
        chunked = b"POST /hook/post-restore HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        held = spawn(
            "held", control, (chunked + b"c00\r\n" + b"x" * 0xC00 + b"\r\n").hex(),
            (b"1000\r\n" + b"x" * 0x1000 + b"\r\n").hex(), "5",
        )
        self.addCleanup(held.kill)
        assert held.stdin is not None and held.stdout is not None
        self.assertEqual(held.stdout.readline(), "held\n")
        time.sleep(0.5)  # the daemon has read the first 3 KiB of the body
        spooled = set(path for path in descriptors(pid).values() if path.startswith("/")) - files
        self.assertEqual(spooled, set(), "a control request body went to a file")
        held.stdin.write("go\n")
        held.stdin.close()
        report = lastReport(held.stdout.read())
        held.wait(10)
        self.assertRefusedAtOnce(report, within=5)
        waitForLog(self.cache, r"control request with a body of 7168 bytes \(at most 4096\) dropped")

        quiet = [spawn("idle", self.path(name), "30") for name in ("proxy-control.sock", "cache-control.sock")]
        for process in quiet:
            self.addCleanup(process.kill)
            out, _ = process.communicate(timeout=60)
            report = lastReport(out)
            print(f"attack 7 (silent control connection): closed after {report['seconds']} s")
            self.assertTrue(report["closed"], report)
            self.assertTrue(1.5 <= report["seconds"] <= 5, report)
        dumped = images("7c")
        self.dump(dumped)
        self.restore(dumped)

    def test_7_writesToTheCache(self) -> None:
        """Writes to img-cache.sock (a pipe, or inline to parent) do not touch the delivered images."""
        self.startPair(shared=True)
        dumped = images("7w")
        self.dump(dumped)
        cacheSocket = self.path("img-cache.sock")
        write = wire.LocalRequest("core-1.img", SNAP, wire.O_WRONLY).toBytes()
        self.assertTrue(attack("write", cacheSocket, write.hex(), b"EVILBYTE".hex())["connected"])
        parent = wire.LocalRequest(wire.PARENT_IMAGE, "", wire.O_APPEND).toBytes() + wire.encodeSnapshotId("evil")
        attack("send", cacheSocket, parent.hex(), "0.5")
        goesNowhere = r"criu writes (core-1\.img|parent) to the cache: the cache serves restores, "
        goesNowhere += r"the write goes nowhere"
        waitForLog(self.cache, goesNowhere, 2)
        self.restore(dumped)

