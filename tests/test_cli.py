"""
The C{twisted-criu} command in this process: usage errors (one line naming
the option, then a pointer to C{--help}, status 2), the C{--timeout}
watchdog, how far a push got, and the progress bar.  The real command as a
subprocess, on a terminal and off one, is in C{tests.slow.test_cli_errors}
and C{tests.slow.test_cli_progress}.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from typing import Any

from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import cli
from twisted_criu.cli import bar as cliBar
from twisted_criu.cli.common import Watchdog
from twisted_criu.cli.push import _Headway, _tcpEndpoint


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class UsageTests(SynchronousTestCase):
    """main() with a wrong command line: two lines on stderr, status 2, no reactor."""

    def main(self, *argv: str) -> tuple[int, list[str]]:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        status = cli.main(list(argv))
        return status, err.getvalue().splitlines()

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, self.directory)

    def assertUsage(self, argv: tuple[str, ...], says: str, command: str = "") -> None:
        status, lines = self.main(*argv)
        name = f"twisted-criu {command}" if command else "twisted-criu"
        self.assertEqual(status, 2, lines)
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].startswith(f"{name}: "), lines)
        self.assertIn(says, lines[0])
        self.assertEqual(lines[1], f"({name} --help shows the options)")

    def test_noCommand(self) -> None:
        self.assertUsage((), "give a command: ls, pull, extract, drop or push")

    def test_unknownCommand(self) -> None:
        self.assertUsage(("lst",), "no command 'lst': give ls, pull, extract, drop or push")

    def test_unknownOption(self) -> None:
        self.assertUsage(("ls", "--form", "x"), "no option --form", "ls")

    def test_badValueNamesTheOption(self) -> None:
        """Not Python's "Parameter type enforcement failed: invalid literal for int()"."""
        self.assertUsage(
            ("push", self.directory, "--address", "h", "--port", "abc"),
            "--port: not a port number: 'abc'",
            "push",
        )
        self.assertUsage(("ls", "--timeout", "-1"), "--timeout: not a positive number of seconds: '-1'", "ls")

    def test_optionWithoutItsValue(self) -> None:
        """Options come in any order, but an option at the end still needs its value."""
        self.assertUsage(("pull", "DIR", "--session"), "--session needs a value", "pull")

    def test_arguments(self) -> None:
        self.assertUsage(("pull",), "give DIR: the directory to write the images to", "pull")
        self.assertUsage(("drop", "1", "2"), "unexpected argument '2' (it takes SESSION)", "drop")

    def test_unknownEndpointType(self) -> None:
        self.assertUsage(("ls", "--from", "bogus:xyz"), "--from bogus:xyz: Unknown endpoint type: 'bogus'", "ls")
        self.assertUsage(
            ("push", self.directory, "--to", "bogus:xyz"), "--to bogus:xyz: Unknown endpoint type", "push"
        )

    def test_help(self) -> None:
        """--help is no error; the command's own description, not the module's."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(self.main("pull", "--help")[0], 0)
        self.assertIn("ready for `criu restore -D DIR`", out.getvalue())
        self.assertNotIn("C{", out.getvalue())


class AddressTests(SynchronousTestCase):
    def test_endpoints(self) -> None:
        self.assertEqual(_tcpEndpoint("cache.example", 9996), "tcp:host=cache.example:port=9996")
        self.assertEqual(_tcpEndpoint("::1", 9996), r"tcp6:host=\:\:1:port=9996")


class WatchdogTests(SynchronousTestCase):
    def test_expiresWhenNothingMoves(self) -> None:
        clock = Clock()
        expired: list[float] = []
        dog = Watchdog(clock, 5.0, lambda: expired.append(clock.seconds()))
        dog.start()
        clock.advance(4)
        dog.moved()
        clock.advance(4)
        self.assertEqual(expired, [])
        clock.advance(1)
        self.assertEqual(expired, [9.0])

    def test_stopped(self) -> None:
        clock = Clock()
        dog = Watchdog(clock, 5.0, lambda: self.fail("expired"))
        dog.start()
        dog.stop()
        clock.advance(10)
        self.assertEqual(clock.getDelayedCalls(), [])


class _Sender:
    def __init__(self) -> None:
        self.progress = 0
        self.lost = False


class _Session:
    sender: Any = None


class HeadwayTests(SynchronousTestCase):
    """What counts as moving for push's --timeout."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.session = _Session()
        self.headway = _Headway(self.session, self.clock, timeout=10.0)

    def connect(self) -> _Sender:
        sender = _Sender()
        self.session.sender = sender
        return sender

    def test_bytesHandedOverMove(self) -> None:
        self.assertFalse(self.headway.check())  # no link yet
        sender = self.connect()
        self.assertFalse(self.headway.check())
        sender.progress = 100
        self.assertTrue(self.headway.check())
        self.assertFalse(self.headway.check())  # no more since

    def test_aLinkDroppedOverAndOverGetsNowhere(self) -> None:
        """
        A cache that accepts and drops the link: each new connection hands
        over the same first bytes again, which is no headway (push used to
        reconnect forever).
        """
        for _ in range(5):
            sender = self.connect()
            sender.progress = 64
            moved = self.headway.check()
            sender.lost = True
            self.headway.check()
            self.clock.advance(1)
        self.assertFalse(moved)
        self.assertEqual(self.headway.furthest, 64)

    def test_aLinkThatBrokeLateStartsOver(self) -> None:
        """A connection that lasted --timeout broke: the next one's bytes count again."""
        first = self.connect()
        self.headway.check()
        first.progress = 1000
        self.headway.check()
        self.clock.advance(30)
        first.lost = True
        second = self.connect()
        second.progress = 10
        self.assertTrue(self.headway.check())


class ProgressBarTests(SynchronousTestCase):
    def test_onATerminal(self) -> None:
        """Bytes, a rate and the time left, ending at the total."""
        terminal = FakeTerminal()
        self.assertTrue(cliBar.wantsBar(terminal))
        progress = cliBar.ProgressBar(3_000_000, "push", terminal, True)
        progress.update(1_000_000)
        progress.update(500_000)  # a link that starts over
        progress.advance(2_500_000)
        progress.close()
        text = terminal.getvalue()
        self.assertIn("push: 100%|", text)
        self.assertIn("3.00MB/3.00MB", text)
        self.assertRegex(text, r"<\d\d:\d\d, .*B/s\]")

    def test_notATerminal(self) -> None:
        stream = io.StringIO()
        self.assertFalse(cliBar.wantsBar(stream))
        progress = cliBar.ProgressBar(100, "pull", stream, cliBar.wantsBar(stream))
        progress.update(50)
        progress.close()
        self.assertEqual(stream.getvalue(), "")

    def test_linesAroundTheBar(self) -> None:
        """A log line written while the bar is up is not glued to the bar."""
        terminal = FakeTerminal()
        progress = cliBar.ProgressBar(100, "push", terminal, True)
        progress.update(10)
        cliBar.AroundBars(terminal).write("a warning\n")
        progress.close()
        self.assertIn("\ra warning\n", terminal.getvalue())


class OptionsTests(SynchronousTestCase):
    def test_debugAnywhere(self) -> None:
        """--debug before or after the command."""
        for argv in (["--debug", "ls"], ["ls", "--debug"]):
            options = cli.Options()
            options.parseOptions(argv)
            self.assertTrue(options.debug)
        options = cli.Options()
        options.parseOptions(["ls"])
        self.assertFalse(options.debug)

    def test_pushNeedsOneDestination(self) -> None:
        options = cli.PushOptions()
        with self.assertRaises(usage.UsageError) as e:
            options.parseOptions([tempfile.gettempdir(), "--address", "h", "--to", "tcp:host=h:port=1"])
        self.assertIn("not both", str(e.exception))
