# -*- test-case-name: tests.test_chains -*-
"""
C{twisted-criu}: the operator's command::

    twisted-criu ls   [--from WHERE] [-l]              sessions and images a daemon holds
    twisted-criu pull [--from WHERE] [--session ID] DIR  write a session to DIR for criu restore -D DIR
    twisted-criu drop [--from WHERE] ID                drop a session's images
    twisted-criu push DIR --address HOST [--port P]     send an on-disk dump to a criu-cache

WHERE is a daemon's control endpoint: its images directory (the control
socket is found there), the socket's path, or a Twisted endpoint string.

This package is the command line (L{Options}, L{main}); the commands are in
L{twisted_criu.cli.control} (the control-API client; C{ls}, C{drop},
C{pull}) and L{twisted_criu.cli.push}, and what they share in
L{twisted_criu.cli.common}.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage

from twisted_criu.cli.common import AnyOrderOptions, CommandError
from twisted_criu.cli.control import (
    CONTROL_SOCKETS,
    ControlClient,
    DropOptions,
    LsOptions,
    PullOptions,
    controlEndpoint,
    drop,
    ls,
    pull,
)
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


class Options(usage.Options):
    synopsis = "twisted-criu"
    longdesc = (
        "List, pull and drop the images a criu-proxy or a criu-cache holds, and push "
        "an on-disk dump to a criu-cache. --from takes a daemon's images directory, its "
        "control socket, or a Twisted endpoint string. `twisted-criu COMMAND --help` "
        "for each command."
    )
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
            raise usage.UsageError("give a command: ls, pull, drop or push")


_COMMANDS: dict[str, Callable[[Any, Any, Any], Deferred[Any]]] = {
    "ls": ls,
    "pull": pull,
    "extract": pull,
    "drop": drop,
    "push": push,
}


def main(argv: Sequence[str] | None = None) -> int:
    options = Options()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        sys.stderr.write(f"{options}\ntwisted-criu: {e}\n")
        return 2
    assert options.subCommand is not None
    command = _COMMANDS[options.subCommand]
    # Warnings and errors of the library (e.g. "cannot reach the cache") on stderr.
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            )
        ],
        redirectStandardIO=False,
    )
    status = [0]

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        try:
            yield command(reactor, options.subOptions, sys.stdout)
        except CommandError as e:
            sys.stderr.write(f"twisted-criu {options.subCommand}: {e}\n")
            status[0] = 1

    try:
        task.react(run, [])
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return status[0]

