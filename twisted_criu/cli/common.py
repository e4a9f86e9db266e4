# -*- test-case-name: tests.test_cli_errors,tests.test_chains -*-
"""
What every C{twisted-criu} command shares: its error, its options (in any
order, with errors that name the option), and the watchdog behind
C{--timeout}.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python import usage

from twisted_criu import __version__


class CommandError(Exception):
    """The command failed; the message says why (no traceback)."""


def _describeCoercion(coerce: Callable[[str], Any], value: str, error: ValueError) -> str:
    """Why C{value} is no good, in words (Python's own are for programmers)."""
    if coerce is int:
        return f"not a whole number: {value!r}"
    if coerce is float:
        return f"not a number: {value!r}"
    return str(error)


class _NamedCoerceParameter(usage.CoerceParameter):
    """A parameter whose bad value is reported as C{--name VALUE: why}."""

    def dispatch(self, parameterName: str, value: str) -> None:
        if value is None:
            raise usage.UsageError(f"--{parameterName} needs a value")
        try:
            coerced = self.coerce(value)
        except ValueError as e:
            raise usage.UsageError(
                f"--{parameterName}: {_describeCoercion(self.coerce, value, e)}"
            ) from None
        self.options.opts[parameterName] = coerced


def positiveSeconds(value: str) -> float:
    """A C{--timeout}: a positive number of seconds."""
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"not a number of seconds: {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"not a positive number of seconds: {value!r}")
    return seconds


def tcpPort(value: str) -> int:
    """A TCP port number, 1 to 65535."""
    try:
        port = int(value)
    except ValueError:
        raise ValueError(f"not a port number: {value!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range (1 to 65535)")
    return port


class AnyOrderOptions(usage.Options):
    """
    Options and arguments in any order (C{push DIR --address HOST}); a bad
    value is a usage error that names its option.

    @cvar arguments: the positional arguments: for each, the key it is
        stored under, its name in the synopsis (C{"DIR"}) and what it is
        (for the error when it is missing).
    """

    arguments: Sequence[tuple[str, str, str]] = ()

    optFlags = [["debug", None, "Show tracebacks and the library's log (for bug reports)."]]

    def __init__(self) -> None:
        super().__init__()
        for name, handler in list(self._dispatch.items()):
            if isinstance(handler, usage.CoerceParameter):
                self._dispatch[name] = _NamedCoerceParameter(self, handler.coerce)

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"twisted-criu {__version__}")
        sys.exit(0)

    def parseArgs(self, *args: str) -> None:
        """Store C{args} under the names of L{arguments}, or say what is missing."""
        wanted = self.arguments
        if len(args) < len(wanted):
            _, name, what = wanted[len(args)]
            raise usage.UsageError(f"give {name}: {what}")
        if len(args) > len(wanted):
            extra = " ".join(args[len(wanted) :])
            expected = " ".join(name for _, name, _ in wanted) or "no arguments"
            raise usage.UsageError(f"unexpected argument {extra!r} (it takes {expected})")
        for (key, _, _), value in zip(wanted, args):
            self[key] = value

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        args = list(sys.argv[1:] if options is None else options)
        takesValue = {f"--{name[:-1]}" for name in self.longOpt if name.endswith("=")}
        short = self.shortOpt
        takesValue |= {f"-{c}" for i, c in enumerate(short) if c != ":" and short[i + 1 : i + 2] == ":"}
        flags: list[str] = []
        positional: list[str] = []
        while args:
            arg = args.pop(0)
            if arg == "--":
                positional += args
                break
            if arg.startswith("-") and arg != "-":
                flags.append(arg)
                if arg in takesValue:
                    if not args:
                        raise usage.UsageError(f"{arg} needs a value")
                    flags.append(args.pop(0))
            else:
                positional.append(arg)
        try:
            super().parseOptions(flags + positional)
        except usage.UsageError as e:
            raise usage.UsageError(_plainGetoptError(str(e))) from None


def _plainGetoptError(message: str) -> str:
    """getopt's and usage's wordings, as the rest of the command words things."""
    if message.startswith("option ") and message.endswith(" not recognized"):
        return f"no option {message[len('option '):-len(' not recognized')]}"
    if message.startswith("option ") and message.endswith(" requires argument"):
        return f"{message[len('option '):-len(' requires argument')]} needs a value"
    if message.startswith("No such option '"):
        return f"no option --{message[len('No such option ') + 1:-1]}"
    return message


class Watchdog:
    """
    Calls C{expired} once nothing moved for C{timeout} seconds: each
    L{moved} puts it off again.
    """

    def __init__(self, clock: IReactorTime, timeout: float, expired: Callable[[], None]) -> None:
        self.timeout = timeout
        self._clock = clock
        self._expired = expired
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        self._call = self._clock.callLater(self.timeout, self._expire)

    def moved(self) -> None:
        call = self._call
        if call is not None and call.active():
            call.reset(self.timeout)

    def stop(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _expire(self) -> None:
        self._call = None
        self._expired()
