"""
Descriptors run out for real (issue 15, item 5): C{twistd criu-proxy} and
C{twistd criu-cache} started under a low C{ulimit -n} (soft and hard: they
cannot raise it), and more large images sent at once than their
descriptors can hold (each image over 64 KiB holds a memfd, each of
criu's connections a socket and a pipe).

Whichever daemon runs out (at accept, at a memfd, at a passed pipe), it
says so in one error line naming the limit; criu's writes fail, its
post-dump hook exits 1 (criu would resume the process), the session is
aborted on both daemons and nothing of it is served; no traceback, no
progress line for a dead transfer, every descriptor given back; and the
next, smaller dump goes through, every image read back byte-exact.
"""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

from tests.slow import test_process_failures as pf
from tests.slow.migration import sessions
from twisted_criu.hook import runHook
from twisted_criu.testing.processes import freePort

#: The low limit, soft and hard.
LIMIT = 64
#: Images sent at once, each larger than the pipe criu writes it into.
IMAGES = 60
SIZE = 2 * pf.MiB + 4096
#: What the error line says.
EXHAUSTED = rf"too many open files \(RLIMIT_NOFILE {LIMIT}\)"


def memfds(daemon: pf.Daemon) -> int:
    return sum(1 for target in daemon.fds().values() if target.startswith("/memfd:"))


class RunningOutTests(pf._DaemonTest):
    def runOut(self, proxyLimit: int | None, cacheLimit: int | None) -> None:
        base = pf.shortTempDir(self)
        port = freePort()
        args = ("--progress-interval", "1")
        cache = self.startCache(base, port, *args, fileLimit=cacheLimit, hardLimit=True)
        proxy = self.startProxy(base, port, *args, fileLimit=proxyLimit, hardLimit=True)
        low = proxy if proxyLimit is not None else cache
        pf.pushSnapshotId(proxy.socketPath)
        proxy.waitForLog(r"the cache speaks twisted-criu's link extension")

        # The dump: every image at once.
        def write(name: str, data: bytes) -> str:
            try:
                pf.writeImage(proxy.socketPath, name, data)
            except (OSError, TimeoutError) as e:
                return type(e).__name__
            return "ok"

        images = {f"pages-{i:02d}.img": pf.randomBytes(SIZE + i, ("fd", i)) for i in range(IMAGES)}
        writers = [pf.Background(write, name, data) for name, data in images.items()]
        outcomes = [writer.result(2 * pf.STEP) for writer in writers]
        self.assertNotIn("TimeoutError", outcomes)  # failed, not wedged
        if low is proxy:  # (criu's writes to the proxy end before the cache fails)
            self.assertNotEqual(set(outcomes) - {"ok"}, set(), "every write succeeded: no limit was hit")
        proxy.waitForLog(r"session 1 aborted")
        self.assertEqual(write("pages-late.img", images["pages-00.img"]), "BrokenPipeError")  # criu's next write

        # criu's post-dump hook fails: criu would resume the process.
        out = io.StringIO()
        status = runHook("post-dump", os.path.join(proxy.directory, "proxy-control.sock"), out)
        self.assertEqual(status, 1, out.getvalue())
        self.assertIn("was aborted", out.getvalue())
        pf.LocalImageClient(proxy.socketPath, timeout=pf.STEP).finishDump()
        cache.waitForLog(r"session 1 aborted: .*; it will never be restored")

        # One line says what ran out, where, and what to do.
        lines = [line for line in pf.errorLines(low.log()) if re.search(EXHAUSTED, line)]
        self.assertNotEqual(lines, [], low.log())
        self.assertTrue(all("ulimit -Hn" in line for line in lines), lines)
        for daemon in (proxy, cache):
            self.assertNotIn("Traceback", daemon.log())
            self.assertNotIn("Unhandled", daemon.log())

        # Nothing of the dump is served, nothing is left dumping.
        self.assertIsNone(pf.readImage(cache.socketPath, "pages-00.img"))
        for daemon in (proxy, cache):
            states = [s["state"] for s in sessions(Path(daemon.directory) / f"{daemon.kind[5:]}-control.sock")]
            self.assertEqual([s for s in states if s in ("dumping", "forwarding", "delivered")], [], states)
            pf.waitUntil(self, lambda: memfds(daemon) == 0, f"{daemon.kind} gave back every memfd")

        # No transfer of the dead session keeps reporting progress.
        time.sleep(2.5)
        for daemon in (proxy, cache):
            tail = daemon.log()[daemon.log().rindex("session 1 aborted") :]
            self.assertEqual(re.findall(r"progress: snap1/.*", tail), [])

        # The next, smaller dump goes through.
        pf.pushSnapshotId(proxy.socketPath, "snap2")
        second = {f"pages-{i}.img": pf.randomBytes(SIZE + i, ("second", i)) for i in range(4)}
        second.update({f"core-{i}.img": pf.randomBytes(1000 + i, ("core", i)) for i in range(20)})
        for name, data in second.items():
            pf.writeImage(proxy.socketPath, name, data, snapshotId="snap2")
        out = io.StringIO()
        status = runHook("post-dump", os.path.join(proxy.directory, "proxy-control.sock"), out)
        self.assertEqual(status, 0, out.getvalue())
        pf.LocalImageClient(proxy.socketPath, timeout=pf.STEP).finishDump()
        for name, data in second.items():
            self.assertEqual(pf.readImage(cache.socketPath, name, snapshotId="snap2"), data, name)
        restore = pf.LocalImageClient(cache.socketPath, timeout=pf.STEP)
        self.assertEqual(restore.snapshotIds(), ["snap2"])
        restore.finishRestore()
        cache.waitForLog(r"session complete: 25 images, \d+ bytes \(session 2 restored")

    def test_proxyRunsOut(self) -> None:
        self.runOut(proxyLimit=LIMIT, cacheLimit=None)

    def test_cacheRunsOut(self) -> None:
        self.runOut(proxyLimit=None, cacheLimit=LIMIT)
