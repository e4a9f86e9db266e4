"""
A real migration with a real criu: C{criu dump --stream} through criu-proxy,
TCP on loopback, criu-cache, C{criu restore --stream}.

The criu binary comes from C{TWISTED_CRIU_CRIU} (C{admin/test} sets it from
C{admin/get-criu}) or from PATH.  criu needs root.  These tests fail, not
skip, when no working criu is available: C{admin/test --no-real-criu}
leaves the module out on a machine where criu cannot run.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.slow.migration import Criu, DaemonProcess, Workload, findCriu, waitUntil
from twisted_criu.testing.processes import freePort


class RealCriuStreamTests(SynchronousTestCase):
    """Stock CRIU migrates a process through twisted-criu."""

    def setUp(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="tcriu-"))
        self.addCleanup(shutil.rmtree, self.base, True)
        self.criu = Criu(findCriu(), self.base)
        self.addCleanup(self.criu.killAll)

    def _criu(self, action: str, directory: Path, *args: str) -> None:
        run = self.criu.start(action, directory, *args)
        if run.wait(120):
            raise AssertionError(f"criu {action} failed ({run.process.returncode}):\n{run.describe(60)}")

    def migrate(self, mebibytes: int) -> None:
        src, dst = self.base / "src", self.base / "dst"
        src.mkdir()
        dst.mkdir()
        workload = Workload(self.base / "wl", mebibytes)
        self.addCleanup(workload.kill)
        workload.start()
        workload.ready()

        port = str(freePort())
        cache = DaemonProcess("criu-cache", self.base, dst, ["--once", "--port", port])
        proxy = DaemonProcess("criu-proxy", self.base, src, ["--once", "--address", "127.0.0.1", "--port", port])
        for daemon in (cache, proxy):
            self.addCleanup(daemon.kill)
            daemon.start()

        self._criu("dump", src, "-t", str(workload.pid))
        workload.reap()  # its pid must be free for the restore
        before = workload.last()
        assert proxy.process is not None and cache.process is not None
        self.assertEqual(proxy.process.wait(60), 0, "the proxy did not finish its session")

        self._criu("restore", dst, "-d")
        self.assertEqual(cache.process.wait(60), 0, "the cache did not finish its session")
        waitUntil(lambda: workload.last() >= before + 3, 60, "the restored counter")
        # Same process, same pid, memory intact, one unbroken count.
        workload.checkRunsOnce()
        self.assertIn("session complete", cache.log())

    def test_smallProcess(self) -> None:
        self.migrate(8)

    def test_256MiBProcess(self) -> None:
        self.migrate(256)
