# -*- test-case-name: tests.test_taps -*-
"""Command-line options shared by C{twistd criu-proxy} and C{twistd criu-cache}."""

from __future__ import annotations

import os

from twisted.internet.endpoints import quoteStringArgument
from twisted.python import usage

from twisted_criu.variants import ReadVariant

#: The port CRIU's remote-images daemons used.
DEFAULT_PORT = 9996


def parsePort(value: str) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return port


def parseVariant(value: str) -> ReadVariant:
    try:
        return ReadVariant(value)
    except ValueError:
        choices = ", ".join(v.value for v in ReadVariant)
        raise usage.UsageError(f"--read-variant must be one of {choices}") from None


def unixEndpoint(path: str, mode: str = "600") -> str:
    """A C{unix:} server endpoint string for C{path}, safely quoted."""
    return f"unix:{quoteStringArgument(path)}:mode={mode}"


class DaemonOptions(usage.Options):
    """Flags both daemons share; subclasses add their link option."""

    socketName = ""
    streamSocketName = ""

    optFlags = [
        ["once", None, "Serve one migration session, then exit."],
    ]
    optParameters = [
        ["images-dir", "D", ".", "The directory criu is given with -D; the criu socket is created there."],
        ["port", None, DEFAULT_PORT, "TCP port of the proxy -> cache link.", parsePort],
        ["local", None, None, "Endpoint criu --remote connects to (default: unix socket in --images-dir)."],
        ["stream-local", None, None, "Endpoint criu --stream connects to (default: unix socket in --images-dir; 'none' to disable)."],
        ["read-variant", None, "auto", "How criu expects read bytes: auto, pipe (criu-dev 2020) or inline (2015 seed).", parseVariant],
    ]

    def postOptions(self) -> None:
        if isinstance(self["read-variant"], str):  # the default is not coerced
            self["read-variant"] = parseVariant(self["read-variant"])
        for option, name in (("local", self.socketName), ("stream-local", self.streamSocketName)):
            if self[option] is None:
                self[option] = unixEndpoint(os.path.join(self._imagesDir(), name))
        if self["stream-local"] == "none":
            self["stream-local"] = None

    def _imagesDir(self) -> str:
        directory = os.path.abspath(self["images-dir"])
        if not os.path.isdir(directory):
            raise usage.UsageError(f"images directory {directory} does not exist")
        self["images-dir"] = directory
        return directory
