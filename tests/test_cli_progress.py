"""
C{push} and C{pull} draw a progress bar on a terminal, and nothing when
there is none; in this process, with a stream that says it is a terminal
(the real command on a pseudo-terminal: C{tests.slow.test_cli_terminal}).
"""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import TestCase

from tests.helpers import Migration
from tests.test_cli import FakeTerminal
from twisted_criu import cli
from twisted_criu.daemons.control import controlSite
from twisted_criu.twistd.options import unixEndpoint

#: The dump pushed and pulled: 4 MiB and two small images.
IMAGES = {"pages-1.img": os.urandom(4 << 20), "core-1.img": b"core", "inventory.img": b"inventory"}


class KeepingCache:
    """An in-process cache that keeps sessions, with its control socket in its -D."""

    @inlineCallbacks
    def start(self, test: TestCase) -> Any:
        self.m = Migration(test)
        port = yield self.m.startCacheWith(keep=True)
        self.port = port.getHost().port
        assert self.m.cache is not None
        control = os.path.join(self.m.dst, "cache-control.sock")
        listening = yield serverFromString(reactor, unixEndpoint(control)).listen(controlSite(self.m.cache))
        test.addCleanup(listening.stopListening)
        self.directory = self.m.dst

    def writeDump(self, directory: str) -> None:
        os.makedirs(directory)
        for name, data in IMAGES.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)


class ProgressTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.cache = KeepingCache()
        yield self.cache.start(self)
        self.dump = self.mktemp()
        self.cache.writeDump(self.dump)

    @inlineCallbacks
    def push(self, barStream: Any) -> Any:
        options = cli.PushOptions()
        options.parseOptions([self.dump, "--address", "127.0.0.1", "--port", str(self.cache.port), "--plain-link"])
        out = io.StringIO()
        yield cli.push(reactor, options, out, barStream)
        return out.getvalue()

    @inlineCallbacks
    def pull(self, barStream: Any, *argv: str) -> Any:
        target = self.mktemp()
        options = cli.PullOptions()
        options.parseOptions([target, "--from", self.cache.directory, *argv])
        out = io.StringIO()
        yield cli.pull(reactor, options, out, barStream)
        for name, data in IMAGES.items():
            with open(os.path.join(target, name), "rb") as f:
                self.assertEqual(f.read(), data)
        return out.getvalue()

    @inlineCallbacks
    def test_barsOnATerminal(self) -> Any:
        total = sum(map(len, IMAGES.values()))
        shown = f"{total / 1e6:.2f}MB/{total / 1e6:.2f}MB"
        terminal = FakeTerminal()
        out = yield self.push(terminal)
        self.assertIn("pushed 3 images", out)
        self.assertIn(f"push: 100%|##########| {shown}", terminal.getvalue())
        self.assertRegex(terminal.getvalue(), r"B/s\]\n$")
        terminal = FakeTerminal()
        out = yield self.pull(terminal)
        self.assertIn("pulled session", out)
        self.assertIn(f"pull: 100%|##########| {shown}", terminal.getvalue())
        self.assertNotIn("pulled", terminal.getvalue())  # the command's own lines go to stdout

    @inlineCallbacks
    def test_noProgressFlag(self) -> Any:
        terminal = FakeTerminal()
        yield self.push(terminal)
        terminal = FakeTerminal()
        yield self.pull(terminal, "--no-progress")
        self.assertEqual(terminal.getvalue(), "")

    @inlineCallbacks
    def test_pullWhereNothingCanBeWritten(self) -> Any:
        """A directory that cannot be created is one line, not an OSError traceback."""
        yield self.push(None)
        options = cli.PullOptions()
        blocker = self.mktemp()
        open(blocker, "w").close()
        options.parseOptions([os.path.join(blocker, "sub"), "--from", self.cache.directory])
        with self.assertRaises(cli.CommandError) as e:
            yield cli.pull(reactor, options, io.StringIO())
        self.assertEqual(
            str(e.exception), f"cannot create the directory {os.path.join(blocker, 'sub')}: Not a directory"
        )
