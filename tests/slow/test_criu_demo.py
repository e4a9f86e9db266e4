"""
The real demo: C{python -m twisted_criu.testing.demo} migrates a real
process with a real criu (C{TWISTED_CRIU_CRIU}, which C{admin/test} sets
from C{admin/get-criu}; needs root) through real daemons, shows it running
again with its memory intact and the downtime, and cleans up: no process
left, no work directory left.  Like C{tests.slow.test_criu}, it fails, not
skips, without a working criu: C{admin/test --no-real-criu} leaves it out.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from twisted_criu.testing.realcriu import findCriu
from twisted_criu.testing.workload import processesWhere


def workloads(under: str) -> list[int]:
    """The pids of live processes running a workload script under C{under}."""
    prefix = os.fsencode(under)
    return processesWhere(
        lambda argv: any(arg.startswith(prefix) and arg.endswith(b"workload.py") for arg in argv)
    )


class RealDemoTests(SynchronousTestCase):
    """The demo the README's first command runs, where criu can run."""

    def test_migratesARealProcess(self) -> None:
        tmp = tempfile.mkdtemp(prefix="tcriu-demo-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        env = dict(os.environ, TMPDIR=tmp, TWISTED_CRIU_CRIU=findCriu())
        result = subprocess.run(
            [sys.executable, "-m", "twisted_criu.testing.demo", "--size", "16", "--timeout", "120"],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
        out = result.stdout
        describe = f"exit {result.returncode}\n--- stdout ---\n{out}\n--- stderr ---\n{result.stderr}"
        self.assertEqual(result.returncode, 0, describe)

        self.assertIn("migration demo: a real process, moved by criu ", out)
        self.assertIn("(from TWISTED_CRIU_CRIU; criu check passed)", out)
        started = re.search(r"^  process   pid (\d+): workload\.py holds 16\.0 MiB .*\(sha256 ([0-9a-f]{16})\)", out, re.M)
        assert started is not None, describe
        pid, digest = started.groups()
        self.assertIn(f"criu dump --stream -t {pid} -D ", out)
        self.assertIn("--action-script twisted-criu-hook  ->  criu-proxy", out)
        self.assertRegex(out, r"  hook      post-dump: the cache holds all \d+ images")
        self.assertIn("  hook      post-resume: restore of session 1 confirmed to the cache", out)
        self.assertRegex(out, rf"pid {pid} is gone \(it had counted to \d+\)")
        self.assertIn(f"running: pid {pid} again (state ", out)
        self.assertRegex(out, r"  counts    [\d, ]+ \| [\d, ]+ \(dump \| restore; 1 to \d+, no gap, no repeat\)")
        self.assertRegex(out, rf"  memory    sha256 {digest} on all \d+ lines, before and after: intact")
        downtime = re.search(r"^  downtime  (\d+\.\d\d) s from the start of criu dump", out, re.M)
        assert downtime is not None, describe
        self.assertGreater(float(downtime.group(1)), 0)
        self.assertIn("criu-cache exited 0 by itself", out)
        self.assertIn("criu-proxy exited 0 by itself", out)
        self.assertIn(f"stopped the restored process (pid {pid})", out)
        self.assertIn(f"\nOK: pid {pid} (16.0 MiB of memory) went criu dump --stream", out)

        # Cleaned up: the restored process is gone, and so is the work directory.
        self.assertEqual(workloads(tmp), [])
        self.assertEqual(os.listdir(tmp), [])
