"""
The real C{twisted-criu push} and C{pull}, run as a user would: on a
terminal (a pseudo-terminal from C{pty.openpty()} as standard error) they
draw a progress bar, and into a pipe they stay quiet.  The cache runs in
this process on loopback, keeping its sessions for C{pull}.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.helpers import inThread
from tests.slow.test_cli_errors import REPO, commandEnvironment
from tests.test_cli_progress import IMAGES, KeepingCache


def onTerminal(argv: list[str]) -> tuple[int, str, str]:
    """Run C{twisted-criu ARGV...} with a terminal as stderr: status, stdout, what the terminal showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "twisted_criu.cli", *argv],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
        env=commandEnvironment(), cwd=REPO,
    )
    os.close(slave)
    shown = b""
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the command closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(master)
    out = process.stdout.read() if process.stdout else b""
    return process.wait(60), out.decode(), shown.decode("utf-8", "replace")


def offTerminal(argv: list[str]) -> tuple[int, str, str]:
    """The same with stderr a pipe."""
    done = subprocess.run(
        [sys.executable, "-m", "twisted_criu.cli", *argv],
        stdin=subprocess.DEVNULL, capture_output=True, env=commandEnvironment(), cwd=REPO, timeout=60,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


class TerminalTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.cache = KeepingCache()
        yield self.cache.start(self)
        self.dump = os.path.abspath(self.mktemp())
        self.cache.writeDump(self.dump)
        self.total = sum(map(len, IMAGES.values()))

    def pushArgs(self) -> list[str]:
        return ["push", self.dump, "--address", "127.0.0.1", "--port", str(self.cache.port), "--plain-link"]

    def assertBar(self, shown: str, label: str) -> None:
        total = f"{self.total / 1e6:.2f}MB"
        self.assertIn(f"{label}: 100%|", shown)
        self.assertIn(f"| {total}/{total} [", shown)
        self.assertRegex(shown, r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+ ?[kMG]?B/s\]")
        self.assertIn("\r", shown)  # redrawn in place

    @inlineCallbacks
    def test_barsOnATerminal(self) -> Any:
        status, out, shown = yield inThread(onTerminal, self.pushArgs())
        self.assertEqual(status, 0, shown)
        self.assertIn("pushed 3 images", out)
        self.assertBar(shown, "push")
        target = os.path.abspath(self.mktemp())
        status, out, shown = yield inThread(onTerminal, ["pull", target, "--from", self.cache.directory])
        self.assertEqual(status, 0, shown)
        self.assertIn("pulled session", out)
        self.assertBar(shown, "pull")
        with open(os.path.join(target, "pages-1.img"), "rb") as f:
            self.assertEqual(f.read(), IMAGES["pages-1.img"])

    @inlineCallbacks
    def test_quietOffATerminal(self) -> Any:
        status, out, err = yield inThread(offTerminal, self.pushArgs())
        self.assertEqual((status, err), (0, ""))
        self.assertIn("pushed 3 images", out)
        target = os.path.abspath(self.mktemp())
        status, out, err = yield inThread(offTerminal, ["pull", target, "--from", self.cache.directory])
        self.assertEqual((status, err), (0, ""))
        self.assertIn("pulled session", out)
