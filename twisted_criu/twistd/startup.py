# -*- test-case-name: tests.slow.test_startup_errors,tests.test_startup -*-
"""
How C{twistd criu-proxy} and C{twistd criu-cache} fail to start: one line
on standard error naming the option and what to do, exit status 2 for a
usage error and 1 for any other, no traceback unless C{--debug}.

twistd itself (L{twisted.application.app.run}) prints a subcommand's
L{usage.UsageError} after the whole option list, on standard output, and
exits 1; a failure after parsing (in C{makeService}, or listening in
C{privilegedStartService}) reaches the top of the program as a traceback,
by then on standard error redirected into the log.  So the daemons' options
(L{twisted_criu.twistd.options.DaemonOptions.parseOptions}) call
L{exitOnUsageError} themselves, and L{reportStartupFailures} replaces
L{sys.excepthook}, through which that traceback would be printed.
"""

from __future__ import annotations

import errno
import os
import sys
from types import TracebackType
from typing import NoReturn

from twisted.logger import Logger
from twisted.python import usage

log = Logger()


class StartupError(Exception):
    """
    The daemon cannot start.  The message is one line that names the
    option (or the file, or the address) and says what to do.
    """


def commandName(options: usage.Options) -> str:
    """C{"twistd criu-cache"}, as the operator typed it."""
    parent = options.parent
    subCommand = getattr(parent, "subCommand", None) or "criu-daemon"
    return f"twistd {subCommand}"


def synopsis(options: usage.Options) -> str:
    """The usage line of a daemon run as a twistd subcommand."""
    return f"Usage: twistd [twistd options] {commandName(options).split()[-1]} [options]"


def _writeError(text: str) -> None:
    """Write to the real standard error, whatever twistd made of C{sys.stderr}."""
    stream = sys.__stderr__
    if stream is not None:
        stream.write(text)
        stream.flush()


def exitOnUsageError(options: usage.Options, error: usage.UsageError) -> NoReturn:
    """The usage line and the error (not the whole help), then exit 2."""
    name = commandName(options)
    _writeError(f"{synopsis(options)} (see {name} --help)\n{name}: {error}\n")
    raise SystemExit(2)


def _logsToTerminal(twistdOptions: usage.Options | None) -> bool:
    """Whether twistd logs to standard output (C{-n} without C{--logfile})."""
    return twistdOptions is not None and (
        bool(twistdOptions.get("nodaemon"))
        and not twistdOptions.get("syslog")
        and twistdOptions.get("logfile") in (None, "", "-")
    )


def describeFailure(value: BaseException) -> str:
    """One line for a failure to start that nothing translated."""
    if isinstance(value, StartupError):
        return str(value)
    kind = type(value).__name__
    return f"cannot start: {kind}: {value} (run with --debug for the traceback)"


def reportStartupFailures(options: usage.Options) -> None:
    """
    From now on, an exception that ends the program is reported in one line
    on standard error (and in the log, unless that is the terminal), with
    exit status 1, instead of a traceback.
    """
    name = commandName(options)
    logged = not _logsToTerminal(options.parent)
    previous = sys.excepthook

    def excepthook(
        kind: type[BaseException], value: BaseException, traceback: TracebackType | None
    ) -> None:
        if not isinstance(value, Exception):
            previous(kind, value, traceback)
            return
        line = describeFailure(value)
        if logged:
            log.critical("{command}: {error}", command=name, error=line)
        _writeError(f"{name}: {line}\n")

    sys.excepthook = excepthook


def checkTwistdPidfile(twistdOptions: usage.Options | None) -> None:
    """
    twistd refuses to start when its C{--pidfile} (C{twistd.pid} in the
    working directory by default) names a live process, in five lines; say
    it in one, and what to do.
    """
    pidfile = twistdOptions.get("pidfile") if twistdOptions is not None else None
    if not pidfile:
        return
    try:
        with open(pidfile) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return  # none, or twistd's own one-line complaint
    try:
        os.kill(pid, 0)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return  # stale: twistd removes it
    raise StartupError(
        f"twistd --pidfile {pidfile}: another twistd (pid {pid}) started from this"
        " directory still runs: stop it, or give twistd --pidfile=OTHER.pid"
        " (--pidfile= for none) before the subcommand"
    )
