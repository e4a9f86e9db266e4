# -*- test-case-name: tests.test_cli_errors,tests.test_chains -*-
"""
C{twisted-criu}: the operator's command::

    twisted-criu ls   [--from WHERE] [-l]              sessions and images a daemon holds
    twisted-criu pull [--from WHERE] [--session ID] DIR  write a session to DIR for criu restore -D DIR
    twisted-criu drop [--from WHERE] ID                drop a session's images
    twisted-criu push DIR --address HOST [--port P]     send an on-disk dump to a criu-cache

WHERE is a daemon's control endpoint: its images directory (the control
socket is found there), the socket's path, or a Twisted endpoint string.

Every failure is one line on standard error (two for a usage error, the
second pointing at C{--help}), with exit status 2 for a usage error and 1
for anything else; C{--debug} adds tracebacks and the library's log.

This package is the command line (L{Options}, L{main}); the commands are in
L{twisted_criu.cli.control} (C{ls}, C{drop}, C{pull}, over
L{twisted_criu.cli.client}) and L{twisted_criu.cli.push} (watching its link
with L{twisted_criu.cli.linkwatch} and L{twisted_criu.cli.reach}), their
progress bar in L{twisted_criu.cli.bar}, and what they share in
L{twisted_criu.cli.common}.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any, Callable, Sequence

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.error import ReactorNotRunning
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import provider

from twisted_criu.cli.bar import AroundBars, wantsBar
from twisted_criu.cli.client import CONTROL_SOCKETS, ControlClient, controlEndpoint
from twisted_criu.cli.common import AnyOrderOptions, CommandError
from twisted_criu.cli.control import DropOptions, LsOptions, PullOptions, drop, ls, pull
from twisted_criu.cli.push import PushOptions, imageFiles, push

__all__ = [
    "CONTROL_SOCKETS",
    "CommandError",
    "ControlClient",
    "DropOptions",
    "LsOptions",
    "Options",
    "PullOptions",
    "PushOptions",
    "controlEndpoint",
    "drop",
    "imageFiles",
    "ls",
    "main",
    "pull",
    "push",
]

#: The commands, for messages.
_NAMES = "ls, pull, extract, drop or push"


class Options(usage.Options):
    synopsis = "twisted-criu [--debug] COMMAND [options]"
    longdesc = (
        "List, pull and drop the images a criu-proxy or a criu-cache holds, and push "
        "an on-disk dump to a criu-cache. --from takes a daemon's images directory, its "
        "control socket, or a Twisted endpoint string. `twisted-criu COMMAND --help` "
        "for each command."
    )
    optFlags = [["debug", None, "Show tracebacks and the library's log (for bug reports)."]]
    subCommands = [
        ["ls", None, LsOptions, "List the sessions and images a daemon holds."],
        ["pull", None, PullOptions, "Write a session's images to a directory (criu restore -D DIR)."],
        ["extract", None, PullOptions, "The same as pull."],
        ["drop", None, DropOptions, "Drop a session's images."],
        ["push", None, PushOptions, "Send an on-disk dump to a criu-cache."],
    ]

    opt_version = AnyOrderOptions.opt_version

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError(f"give a command: {_NAMES}")

    @property
    def debug(self) -> bool:
        sub = getattr(self, "subOptions", None)
        return bool(self["debug"] or (sub is not None and sub.get("debug")))


_COMMANDS: dict[str, Callable[..., Deferred[Any]]] = {
    "ls": ls,
    "pull": pull,
    "extract": pull,
    "drop": drop,
    "push": push,
}


def _usageError(options: Options, error: usage.UsageError) -> int:
    """Say what is wrong with the command line (and where the options are): status 2."""
    message = str(error)
    command = getattr(options, "subCommand", None)
    if message.startswith("Unknown command: "):
        unknown = message[len("Unknown command: ") :]
        message = f"no command {unknown!r}: give {_NAMES}"
    name = f"twisted-criu {command}" if command else "twisted-criu"
    sys.stderr.write(f"{name}: {message}\n({name} --help shows the options)\n")
    return 2


@provider(ILogObserver)
def _discard(event: dict[str, Any]) -> None:
    """The library's log, without --debug: the command says what matters."""


def _describe(reason: Failure) -> str:
    """An unexpected failure, in one line."""
    value = reason.value
    if isinstance(value, OSError) and value.strerror:
        where = f"{value.filename}: " if value.filename else ""
        return f"{where}{value.strerror}"
    return f"unexpected error: {reason.type.__name__}: {reason.getErrorMessage()} (--debug shows the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    options = Options()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        return _usageError(options, e)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    assert options.subCommand is not None
    return _run(options)


def _run(options: Options) -> int:
    """Run the chosen command on the reactor; its exit status."""
    from twisted.internet import reactor

    assert options.subCommand is not None
    name = f"twisted-criu {options.subCommand}"
    command = _COMMANDS[options.subCommand]
    barStream = sys.stderr if wantsBar(sys.stderr) else None
    if options.debug:
        # The library's log, around the progress bar.
        globalLogBeginner.beginLoggingTo(
            [
                FilteringLogObserver(
                    textFileLogObserver(AroundBars(sys.stderr)),  # type: ignore[arg-type]
                    [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
                )
            ],
            redirectStandardIO=False,
        )
    else:
        # The command reports what went wrong itself, in one line.
        globalLogBeginner.beginLoggingTo([_discard], redirectStandardIO=False)
    status = [0]
    running: list[Deferred[Any]] = []
    interrupted = [False]

    def finished(result: object) -> None:
        if isinstance(result, Failure):
            if interrupted[0] and result.check(CancelledError):
                message = "interrupted"
            elif result.check(CommandError):
                message = result.getErrorMessage()
            else:
                message = _describe(result)
                if options.debug:
                    traceback.print_exception(result.type, result.value, result.getTracebackObject())
            sys.stderr.write(f"{name}: {message}\n")
            status[0] = 1
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping (a signal)

    def start() -> None:
        d = maybeDeferred(command, reactor, options.subOptions, sys.stdout, barStream)
        running.append(d)
        d.addBoth(finished)

    def beforeShutdown() -> Deferred[None] | None:
        """A signal stops the reactor: let the command clean up first."""
        if not running or running[0].called:
            return None
        interrupted[0] = True
        d = running[0]
        waiting: Deferred[None] = Deferred()
        d.addBoth(lambda result: waiting.callback(None))
        d.cancel()
        return waiting

    reactor.addSystemEventTrigger("before", "shutdown", beforeShutdown)
    reactor.callWhenRunning(start)
    reactor.run()
    sys.stdout.flush()
    return status[0]
