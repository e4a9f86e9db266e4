"""
How the daemons fail to start (L{twisted_criu.twistd.startup},
L{twisted_criu.twistd.listening}): option errors name the option, a usage
error under twistd is two lines and exit status 2, a failure to listen
names the option that chose the address, and what ends the program is one
line.  The real daemons are started with each mistake in
L{tests.slow.test_startup_errors}.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import sys
import tempfile
from typing import Any

from twisted.internet.defer import fail
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.helpers import socketDirectory
from twisted_criu.twistd import cache_tap, proxy_tap
from twisted_criu.twistd.listening import (
    ListenOption,
    OptionEndpoint,
    checkHostResolves,
    explainListenFailure,
)
from twisted_criu.twistd.options import checkSpillDir
from twisted_criu.twistd.startup import StartupError


class OptionErrorTests(SynchronousTestCase):
    """A value that cannot be read names its option, then says what is wrong."""

    def error(self, *argv: str, tap: Any = cache_tap) -> str:
        with self.assertRaises(usage.UsageError) as e:
            tap.Options().parseOptions(["-D", socketDirectory(self), *argv])
        return str(e.exception)

    def test_coercedValues(self) -> None:
        self.assertEqual(self.error("--port", "abc"), "--port abc: not a port number (1 to 65535)")
        self.assertEqual(self.error("--port", "0"), "--port 0: out of range (1 to 65535)")
        self.assertEqual(self.error("--memory-limit", "lots"), "--memory-limit lots: not a size (try 512M or 2G)")
        self.assertEqual(
            self.error("--timeout", "soon"), "--timeout soon: not a positive number of seconds (e.g. 60)"
        )
        self.assertEqual(
            self.error("--progress-interval", "-1"),
            "--progress-interval -1: not a number of seconds (e.g. 10, or 0)",
        )
        self.assertEqual(
            self.error("--max-retry-delay", "x", tap=proxy_tap),
            "--max-retry-delay x: not a positive number of seconds (e.g. 60)",
        )

    def test_endpointStrings(self) -> None:
        """Endpoint strings are parsed with the options, not when the daemon starts."""
        self.assertTrue(
            self.error("--listen", "tcp:notaport").startswith(
                "--listen tcp:notaport: not a server endpoint ("
            )
        )
        self.assertEqual(
            self.error("--connect", "bogus:xyz", tap=proxy_tap),
            "--connect bogus:xyz: unknown endpoint type 'bogus'; e.g. tcp:host=dst:port=9996",
        )
        self.assertEqual(
            self.error("--metrics", "nope:1"),
            "--metrics nope:1: unknown endpoint type 'nope'; e.g. tcp:9101:interface=127.0.0.1",
        )
        self.assertTrue(self.error("--control", "unix").startswith("--control unix: not a server endpoint"))

    def test_systemdSocketNotPassed(self) -> None:
        """A systemd: endpoint outside socket activation says so, not "list index out of range"."""
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_PID")})
        self.assertEqual(
            self.error("--listen", "systemd:domain=UNIX:index=0"),
            "--listen systemd:domain=UNIX:index=0: systemd passed no socket at that index (0 passed):"
            " start the daemon from its socket unit (see twisted-criu's systemd docs)",
        )

    def test_missingImagesDirectory(self) -> None:
        with self.assertRaises(usage.UsageError) as e:
            proxy_tap.Options().parseOptions(["-D", "/nonexistent/images"])
        self.assertEqual(
            str(e.exception),
            "-D /nonexistent/images: the directory does not exist; create it (criu is given the same -D)",
        )

    def test_addressesQuoted(self) -> None:
        """An IPv6 --address makes a valid endpoint string (its colons escaped)."""
        cache = cache_tap.Options()
        cache.parseOptions(["-D", socketDirectory(self), "--address", "::1"])
        self.assertEqual(cache["listen"], "tcp:9996:interface=\\:\\:1")
        proxy = proxy_tap.Options()
        proxy.parseOptions(["-D", socketDirectory(self), "--address", "::1"])
        self.assertEqual(proxy["connect"], "tcp:host=\\:\\:1:port=9996")


class SpillDirTests(SynchronousTestCase):
    """--spill-dir must exist and take files: it is never created."""

    def test_missing(self) -> None:
        missing = os.path.join(self.mktemp(), "spill")
        with self.assertRaises(usage.UsageError) as e:
            checkSpillDir(missing)
        self.assertTrue(str(e.exception).startswith(f"--spill-dir {missing}: no such directory;"))
        self.assertFalse(os.path.exists(missing))

    def test_notADirectory(self) -> None:
        path = self.mktemp()
        with open(path, "w"):
            pass
        self.assertRaises(usage.UsageError, checkSpillDir, path)

    def test_notWritable(self) -> None:
        """A directory it cannot create files in (as a read-only filesystem)."""

        def refuse(**kwargs: Any) -> str:
            raise OSError(errno.EROFS, "Read-only file system")

        self.patch(tempfile, "mkdtemp", refuse)
        with self.assertRaises(usage.UsageError) as e:
            checkSpillDir("/")
        self.assertEqual(
            str(e.exception),
            "--spill-dir /: cannot create files there (Read-only file system);"
            " give a directory this daemon can write",
        )

    def test_existing(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.assertEqual(checkSpillDir(directory), os.path.abspath(directory))
        self.assertEqual(os.listdir(directory), [])  # the probe is gone
        self.assertEqual(checkSpillDir(None), tempfile.gettempdir())

    def test_option(self) -> None:
        with self.assertRaises(usage.UsageError):
            cache_tap.Options().parseOptions(
                ["-D", socketDirectory(self), "--spill-dir", os.path.join(self.mktemp(), "x")]
            )


@implementer(IStreamServerEndpoint)
class _Failing:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def listen(self, factory: Any) -> Any:
        return fail(self.error)


class ListenFailureTests(SynchronousTestCase):
    """A failure to listen names the option that chose the address."""

    link = ListenOption("--port 9996", "--address 10.0.0.9", "--port")

    def test_portInUse(self) -> None:
        error = CannotListenError("127.0.0.1", 9996, OSError(errno.EADDRINUSE, "Address already in use"))
        self.assertEqual(
            explainListenFailure(self.link, error),
            "--port 9996: 127.0.0.1:9996 is in use already (another daemon?): stop it, or give another --port",
        )
        given = ListenOption.given("metrics", "tcp:9101")
        self.assertTrue(explainListenFailure(given, error).startswith("--metrics tcp:9101: 127.0.0.1:9996 is in use"))

    def test_addressOfAnotherHost(self) -> None:
        error = CannotListenError("10.0.0.9", 9996, OSError(errno.EADDRNOTAVAIL, "Cannot assign"))
        self.assertTrue(
            explainListenFailure(self.link, error).startswith(
                "--address 10.0.0.9: 10.0.0.9 is not an address of this host"
            )
        )

    def test_unknownHost(self) -> None:
        error = CannotListenError("nosuch", 9996, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        self.assertTrue(
            explainListenFailure(self.link, error).startswith("--address 10.0.0.9: unknown host 'nosuch'")
        )

    def test_socketServedAlready(self) -> None:
        """Twisted's lock on a UNIX socket: its holder's pid is named."""
        directory = socketDirectory(self)
        path = os.path.join(directory, "img-cache.sock")
        os.symlink("4242", path + ".lock")
        error = CannotListenError(None, path.encode(), "Cannot acquire lock")
        option = ListenOption(f"-D {directory}", f"-D {directory}", "-D")
        self.assertEqual(
            explainListenFailure(option, error),
            f"-D {directory}: another process (pid 4242) serves {path} already: stop it,"
            " or give each daemon its own -D",
        )

    def test_otherErrors(self) -> None:
        error = CannotListenError("127.0.0.1", 80, OSError(errno.EACCES, "Permission denied"))
        self.assertEqual(
            explainListenFailure(self.link, error), "--port 9996: cannot listen on 127.0.0.1:80: Permission denied"
        )

    def test_endpoint(self) -> None:
        """L{OptionEndpoint} turns a L{CannotListenError} into a L{StartupError}."""
        error = CannotListenError("127.0.0.1", 9996, OSError(errno.EADDRINUSE, "Address already in use"))
        failure = self.failureResultOf(OptionEndpoint(_Failing(error), self.link).listen(Factory()))
        self.assertIsInstance(failure.value, StartupError)
        self.assertIn("--port 9996: 127.0.0.1:9996 is in use already", str(failure.value))
        other = self.failureResultOf(OptionEndpoint(_Failing(ValueError("x")), self.link).listen(Factory()))
        self.assertIsInstance(other.value, ValueError)


class HostTests(SynchronousTestCase):
    """The proxy's cache host must resolve at start, unless the resolver cannot say."""

    def resolver(self, code: int) -> None:
        def getaddrinfo(*args: Any, **kwargs: Any) -> Any:
            raise socket.gaierror(code, "no")

        self.patch(socket, "getaddrinfo", getaddrinfo)

    def test_unknown(self) -> None:
        self.resolver(socket.EAI_NONAME)
        with self.assertRaises(StartupError) as e:
            checkHostResolves("--address nosuch", "tcp:host=nosuch:port=9996")
        self.assertEqual(str(e.exception), "--address nosuch: unknown host 'nosuch': check the name, or give the address")

    def test_resolverDown(self) -> None:
        """A temporary failure is retried with the link, not a reason to stop."""
        self.resolver(socket.EAI_AGAIN)
        checkHostResolves("--address later", "tcp:host=later:port=9996")

    def test_addressesAndSockets(self) -> None:
        self.resolver(socket.EAI_NONAME)
        checkHostResolves("--address 10.0.0.1", "tcp:host=10.0.0.1:port=9996")
        checkHostResolves("--connect unix:/x", "unix:/x")


class TwistdTests(SynchronousTestCase):
    """The daemons' options as twistd parses them, as a subcommand."""

    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.stdout = io.StringIO()
        self.patch(sys, "__stderr__", self.stderr)
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "excepthook", sys.excepthook)
        self.directory = socketDirectory(self)

    def twistd(self, *argv: str) -> ServerOptions:
        config = ServerOptions()
        config.parseOptions(["-n", "--pidfile=", *argv])
        return config

    def test_usageError(self) -> None:
        """Two lines on stderr, exit status 2: not the option list."""
        with self.assertRaises(SystemExit) as e:
            self.twistd("criu-cache", "-D", self.directory, "--port", "abc")
        self.assertEqual(e.exception.code, 2)
        self.assertEqual(
            self.stderr.getvalue(),
            "Usage: twistd [twistd options] criu-cache [options] (see twistd criu-cache --help)\n"
            "twistd criu-cache: --port abc: not a port number (1 to 65535)\n",
        )
        self.assertEqual(self.stdout.getvalue(), "")

    def test_help(self) -> None:
        """--help names the subcommand and released CRIU's --stream."""
        for daemon in ("criu-proxy", "criu-cache"):
            with self.assertRaises(SystemExit):
                self.twistd(daemon, "--help")
            text = self.stdout.getvalue()
            self.assertTrue(text.startswith(f"Usage: twistd [twistd options] {daemon} [options]\n"))
            self.assertIn("--stream -D DIR` (released", text.replace("\n", " "))
            self.stdout.seek(0)
            self.stdout.truncate()

    def test_failureAfterParsing(self) -> None:
        """What ends the program after the options are read is one line."""
        self.twistd("criu-cache", "-D", self.directory)
        sys.excepthook(StartupError, StartupError("--port 1: taken"), None)
        sys.excepthook(RuntimeError, RuntimeError("boom"), None)
        self.assertEqual(
            self.stderr.getvalue(),
            "twistd criu-cache: --port 1: taken\n"
            "twistd criu-cache: cannot start: RuntimeError: boom (run with --debug for the traceback)\n",
        )

    def test_debug(self) -> None:
        """--debug (ours or twistd's) leaves the traceback."""
        hook = sys.excepthook
        self.twistd("criu-cache", "-D", self.directory, "--debug")
        self.assertIs(sys.excepthook, hook)
        # twistd's --debug also turns on post-mortem debugging for every
        # Failure in the process: in a test run that would stop at (Pdb).
        from twisted.python import failure

        self.patch(failure, "startDebugMode", lambda: None)
        config = ServerOptions()
        config.parseOptions(["--debug", "--pidfile=", "criu-proxy", "-D", self.directory])
        self.assertIs(sys.excepthook, hook)

    def test_twistdPidfile(self) -> None:
        """twistd's own pid file naming a live process: one line, before twistd's five."""
        pidfile = os.path.join(self.directory, "twistd.pid")
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
        config = ServerOptions()
        with self.assertRaises(StartupError) as e:
            config.parseOptions(["-n", f"--pidfile={pidfile}", "criu-proxy", "-D", self.directory])
        self.assertIn(f"another twistd (pid {os.getpid()}) started from this directory", str(e.exception))
        with open(pidfile, "w") as f:
            f.write("999999999\n")  # stale: twistd removes it
        config = ServerOptions()
        config.parseOptions(["-n", f"--pidfile={pidfile}", "criu-proxy", "-D", self.directory])
