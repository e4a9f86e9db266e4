# -*- test-case-name: tests.test_startup,tests.slow.test_startup_errors -*-
"""
The daemons' endpoints as the operator gave them: endpoint strings checked
while parsing, hosts resolved at start, and a failure to listen said in one
line naming the option (a L{StartupError}).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu.daemons.systemd import keepSocketFile
from twisted_criu.twistd.endpointstrings import endpointHost, endpointType
from twisted_criu.twistd.startup import StartupError

log = Logger()

#: Examples of endpoint strings, by the option that takes them.
_EXAMPLES = {
    "listen": "tcp:9996:interface=10.0.0.2",
    "connect": "tcp:host=dst:port=9996",
    "metrics": "tcp:9101:interface=127.0.0.1",
}


def checkEndpointString(option: str, value: str, client: bool = False) -> None:
    """
    Parse C{value}, the endpoint string of C{--option}, as the daemon will:
    a L{usage.UsageError} says what is wrong with it.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import clientFromString, serverFromString

    parse = clientFromString if client else serverFromString
    example = _EXAMPLES.get(option, "unix:/run/criu/img.sock:mode=600")
    try:
        parse(reactor, value)
        return
    except IndexError as e:
        if endpointType(value) != "systemd":
            why = str(e)
        else:  # Twisted indexes the descriptors systemd passed (LISTEN_FDS)
            passed = os.environ.get("LISTEN_FDS", "0")
            raise usage.UsageError(
                f"--{option} {value}: systemd passed no socket at that index ({passed} passed):"
                " start the daemon from its socket unit (see twisted-criu's systemd docs)"
            ) from None
    except (ValueError, TypeError, KeyError, OSError) as e:
        why = str(e)
    if why.startswith("Unknown endpoint type"):
        why = f"unknown endpoint type {endpointType(value)!r}"
    else:
        why = f"not a {'client' if client else 'server'} endpoint ({why})"
    raise usage.UsageError(f"--{option} {value}: {why}; e.g. {example}")


@frozen
class ListenOption:
    """
    How the operator chose an endpoint a daemon listens on, for its errors.

    @ivar port: what to name when the address is taken (C{--port 9996}).
    @ivar address: what to name when the host is wrong (C{--address X}).
    @ivar change: the option to change to listen elsewhere.
    """

    port: str
    address: str
    change: str

    @classmethod
    def given(cls, option: str, value: str) -> ListenOption:
        """An endpoint given as C{--option value}."""
        named = f"--{option} {value}"
        return cls(named, named, f"--{option}")


def _where(error: CannotListenError) -> str:
    port = error.port
    if isinstance(port, bytes):
        return os.fsdecode(port)
    return f"{error.interface or '*'}:{port}"


def _lockHolder(path: Any) -> str:
    """C{" (pid N)"} for a UNIX socket whose lock Twisted's listener holds."""
    try:
        return f" (pid {int(os.readlink(os.fsencode(path) + b'.lock'))})"
    except (OSError, ValueError):
        return ""


def explainListenFailure(option: ListenOption, error: CannotListenError) -> str:
    """One line: which option, what went wrong, what to do."""
    where, why = _where(error), error.socketError
    if why == "Cannot acquire lock" or (
        isinstance(why, OSError) and why.errno == errno.EADDRINUSE and isinstance(error.port, bytes)
    ):
        fix = "give each daemon its own -D" if option.change == "-D" else f"give another {option.change}"
        return f"{option.port}: another process{_lockHolder(error.port)} serves {where} already: stop it, or {fix}"
    if isinstance(why, socket.gaierror):
        return (
            f"{option.address}: unknown host {error.interface!r} (cannot listen on {where}):"
            f" give a name or address of this host, or 0.0.0.0 for all"
        )
    if isinstance(why, OSError) and why.errno == errno.EADDRINUSE:
        return (
            f"{option.port}: {where} is in use already (another daemon?):"
            f" stop it, or give another {option.change}"
        )
    if isinstance(why, OSError) and why.errno == errno.EADDRNOTAVAIL:
        return (
            f"{option.address}: {error.interface} is not an address of this host (cannot listen on"
            f" {where}): give one of its addresses, or 0.0.0.0 for all"
        )
    reason = why.strerror if isinstance(why, OSError) and why.strerror else str(why)
    return f"{option.port}: cannot listen on {where}: {reason}"


@implementer(IStreamServerEndpoint)
class OptionEndpoint:
    """A server endpoint from an option: a failure to listen names the option."""

    def __init__(self, endpoint: IStreamServerEndpoint, option: ListenOption) -> None:
        # A UNIX socket inherited from systemd stays as systemd made it:
        # this wrapper would otherwise hide it from ObservedServerEndpoint.
        self._endpoint = keepSocketFile(endpoint)
        self.option = option

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        def failed(reason: Failure) -> Failure:
            if reason.check(CannotListenError):
                return Failure(StartupError(explainListenFailure(self.option, reason.value)))
            return reason

        d: Deferred[IListeningPort] = self._endpoint.listen(factory)
        return d.addErrback(failed)


#: getaddrinfo's answers that mean the name has no address, not "try later".
_UNKNOWN_HOST = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def checkHostResolves(named: str, description: str) -> None:
    """
    The host the client endpoint C{description} dials must have an address
    (a L{StartupError} otherwise, naming C{named}); a resolver that cannot
    answer now is only a warning (the link is retried).
    """
    host = endpointHost(description)
    if host is None:
        return
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno in _UNKNOWN_HOST:
            raise StartupError(
                f"{named}: unknown host {host!r}: check the name, or give the address"
            ) from None
        log.warn("cannot resolve {host} now ({why}); will retry", host=host, why=e.strerror)
