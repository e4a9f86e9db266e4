"""
C{admin/bench-downtime} with a tiny workload, so that the real-workload
downtime benchmark keeps working: a real redis-server (installed with
apt-get if missing), a real criu (C{TWISTED_CRIU_CRIU}, which C{admin/test}
sets from C{admin/get-criu}; needs root), real daemons, a namespace with a
shaped loopback.  Like C{tests.slow.test_criu}, it fails, not skips,
without a working criu: C{admin/test --no-real-criu} leaves it out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from bench.downtime import migrate
from bench.downtime.netns import Namespace
from bench.downtime.redis import RedisServer
from bench.downtime.tools import ROOT, ensurePackages
from twisted_criu.testing.realcriu import findCriu
from twisted_criu.testing.workload import processesWhere

COMMAND = str(ROOT / "admin" / "bench-downtime")


def leftovers(pid: int, output: str) -> list[str]:
    """What the run of pid C{pid} that printed C{output} left behind: its namespace, work directory, redis servers."""
    found = []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    if f"tcriu-{pid}" in namespaces:
        found.append(f"namespace tcriu-{pid}")
    match = re.search(r"work dir (/dev/shm/tcriu-downtime-\S+)", output)
    if match is None:
        return [f"no work dir in the output:\n{output}"]
    workDir = match.group(1)
    if os.path.exists(workDir):
        found.append(workDir)
    found += [f"pid {p}" for p in processesWhere(lambda argv: any(workDir.encode() in a for a in argv))]
    return found


class BenchDowntimeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="tcriu-downtime-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.env = dict(os.environ, TWISTED_CRIU_CRIU=findCriu())
        ensurePackages(lambda text: None)

    def test_smallRun(self) -> None:
        """Unshaped and 1gbit, baseline and none: a table per rate and a JSON document whose every run checked out."""
        path = os.path.join(self.tmp, "result.json")
        argv = [COMMAND, "--size", "16M", "--runs", "1", "--rates", "none,1gbit", "--modes", "baseline,none",
                "--json", path, "--timeout", "60"]
        started = time.monotonic()
        process = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = process.communicate(timeout=180)
        self.assertEqual(process.returncode, 0, out)
        self.assertLess(time.monotonic() - started, 90, "the tiny run must stay quick")
        self.assertIn("== rate none: unshaped loopback", out)
        self.assertIn("== rate 1gbit: tc qdisc tbf rate 1gbit burst 1mb latency 100ms", out)
        self.assertRegex(out, r"compressibility: a \d+ MiB sample of its resident memory packs [\d.]+x with zstd -1")
        self.assertEqual(len(re.findall(r"^  baseline +\d+\.\d\d +\d+\.\d\d ", out, re.M)), 2, out)
        self.assertIn("target (1gbit): auto <= 0.5 x baseline", out)

        document = json.loads(Path(path).read_text())
        data = document["config"]["data"]
        self.assertGreater(data["used_memory"], 16 << 20)
        self.assertTrue(1.5 < data["zstd1_ratio"] < 4, data["zstd1_ratio"])
        self.assertEqual(set(document["rates"]), {"none", "1gbit"})
        for rate, outcome in document["rates"].items():
            [run] = outcome["runs"]
            self.assertEqual(set(run), {"baseline", "none"})
            for mode, figures in run.items():
                self.assertEqual(figures["digest"], data["digest"])
                self.assertGreater(figures["downtime_s"], 0)
                # Every byte of the process's memory crossed the link at least once.
                self.assertGreater(figures["wire_bytes"], 16 << 20, (rate, mode))
                if rate == "none":
                    self.assertIsNone(figures["qdisc_bytes"])
                else:
                    # The shaping qdisc saw the same packets (give or take the link's last messages).
                    self.assertLess(abs(figures["qdisc_bytes"] - figures["wire_bytes"]), 64 << 10, figures)
            self.assertEqual(set(run["baseline"]["cpu_s"]), {"sender", "receiver"})
            self.assertEqual(set(run["none"]["cpu_s"]), {"proxy", "cache"})
            self.assertGreater(run["none"]["cpu_s"]["cache"], 0)
            summary = outcome["summary"]
            self.assertEqual(summary["baseline"]["x_baseline"], 1.0)
            self.assertAlmostEqual(
                summary["none"]["x_baseline"], run["none"]["downtime_s"] / run["baseline"]["downtime_s"]
            )
        self.assertEqual(leftovers(process.pid, out), [])

    def test_interruptCleansUp(self) -> None:
        """SIGTERM in the middle of a migration: exit 130, no namespace, work directory or redis left."""
        process = subprocess.Popen(
            [COMMAND, "--size", "16M", "--runs", "3", "--rates", "1gbit", "--modes", "none"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "run 1/3 none" in line:
                break
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
        self.assertEqual(process.returncode, 130, "".join(lines) + rest)
        self.assertIn("interrupted; cleaning up", rest)
        self.assertEqual(leftovers(process.pid, "".join(lines) + rest), [])

    def test_digestMismatchFails(self) -> None:
        """A restored redis whose data differ fails the migration loudly."""

        class Counterless(Namespace):
            def wireBytes(self) -> int:
                return 0

            def qdiscBytes(self) -> int | None:
                return None

        directory = Path(self.tmp)
        server = RedisServer(shutil.which("redis-server") or "redis-server", directory)
        self.addCleanup(server.kill)
        server.ready()
        tools = migrate.Tools(criu="criu", redis="redis-server", hook=directory, timeout=10)
        run = migrate.Run(tools, Counterless("unused"), directory, server)
        run.startClock()
        client = server.client()
        digest = client.digest()
        client.call("SET", "late", "write")
        client.close()
        error = self.assertRaises(migrate.MigrationFailed, run.finish, digest)
        self.assertIn(f"not the data set's {digest}: data lost", str(error))
