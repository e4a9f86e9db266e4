"""
bench/datapaths (python -m bench.datapaths), so that it does not rot: every path once at a tiny
size with the bytes checked at both ends (what arrived and what was kept),
and its command line refusing sizes it cannot use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ["a", "a2", "b", "c", "d", "e", "f", "f2", "g", "h", "h2", "k", "i", "j"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.datapaths", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


class DataPathsTests(SynchronousTestCase):
    def test_everyPathDelivers(self) -> None:
        """
        Each path moves 3 MiB + 8 KiB (criu's 1 MiB pipe filled three
        times, and a piece that does not fill a MiB) with the CRC-32s of
        what arrived and what it kept checked, and reports its figures.
        """
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "result.json")
            done = run("--size", str(3 * 1024 * 1024 + 8192), "--runs", "1", "--verify",
                       "--affinity", "shared", "--json", out)
            self.assertEqual(done.returncode, 0, done.stderr)
            with open(out) as f:
                medians = json.load(f)["medians"]["shared"]
        self.assertEqual(sorted(medians), sorted(PATHS))
        for kind, m in medians.items():
            self.assertGreater(m["GBps"], 0, kind)
        self.assertGreaterEqual(medians["c"]["hold_pipes"], 1)
        self.assertIn("setsockopt(TCP_ULP, 'tls')", done.stdout)
        self.assertIn("AES-128-GCM alone", done.stdout)

    def test_badSizes(self) -> None:
        """Sizes that are not a positive whole number of pages are refused with a one-line reason."""
        for size, why in [("0", "positive multiple"), ("1000", "positive multiple"),
                          ("banana", "not a size"), ("-4K", "negative")]:
            done = run(f"--size={size}", "--paths", "b")
            self.assertEqual(done.returncode, 2, size)
            self.assertIn(why, done.stderr, size)
            self.assertEqual(done.stdout, "", size)

    def test_badPaths(self) -> None:
        """An unknown path is refused, naming the known ones."""
        done = run("--paths", "b,z", "--size", "64K")
        self.assertEqual(done.returncode, 2)
        self.assertIn("unknown path(s) z", done.stderr)
