# -*- test-case-name: tests.test_startup,tests.test_twistd -*-
"""Reading the daemons' option values: ports, sizes, durations, modes."""

from __future__ import annotations

import os
import re

from twisted.python import usage

from twisted_criu.criu.images import ReadVariant


def parseCompress(value: str) -> str:
    """A C{--compress} mode (auto, zstd, none), checked."""
    from twisted_criu.flow.compress import parseMode

    return parseMode(value).value


def parsePort(value: str) -> int:
    """A TCP port number, 1 to 65535."""
    try:
        port = int(value)
    except ValueError:
        raise ValueError("not a port number (1 to 65535)") from None
    if not 0 < port < 65536:
        raise ValueError("out of range (1 to 65535)")
    return port


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parseSize(value: str) -> int:
    """C{"512M"} -> 536870912; suffixes K, M, G, T (powers of 1024)."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    number = text[: len(text) - len(unit)]
    try:
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise ValueError("not a size (try 512M or 2G)") from None
    if size < 0:
        raise ValueError("a negative size")
    return size


def defaultMemoryLimit() -> int:
    """A quarter of the machine's memory."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        pages = 4 << 30
    return max(64 << 20, pages // 4)


def parseSeconds(value: str) -> float:
    """A number of seconds greater than 0."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError("not a positive number of seconds (e.g. 60)")
    return seconds


def parseNumber(value: str) -> float:
    """A number of seconds, 0 or more."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number >= 0:
        raise ValueError("not a number of seconds (e.g. 10, or 0)")
    return number


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parseDuration(value: str) -> float:
    """Seconds from C{90}, C{90s}, C{30m}, C{1h} or C{2d}; C{0} means forever."""
    text = value.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:]) if text else None
    try:
        seconds = float(text[:-1] if unit else text) * (unit or 1.0)
    except ValueError:
        raise ValueError("not a duration (e.g. 90, 30m, 1h)") from None
    if seconds < 0 or seconds != seconds:
        raise ValueError("not a duration (e.g. 90, 30m, 1h)")
    return seconds


def parseVariant(value: str) -> ReadVariant:
    """A L{ReadVariant} by its name."""
    try:
        return ReadVariant(value)
    except ValueError:
        choices = ", ".join(v.value for v in ReadVariant)
        raise usage.UsageError(f"--read-variant must be one of {choices}") from None


def parseMode(value: str) -> str:
    """An octal permission mode for UNIX sockets, e.g. C{600} or C{0660}."""
    try:
        mode = int(value, 8)
    except ValueError:
        raise ValueError("not an octal mode (try 600)") from None
    if not 0 <= mode <= 0o777:
        raise ValueError("mode out of range (try 600)")
    if mode & 0o007:
        raise ValueError("this mode lets every local user talk to the daemon; give 600 or 660")
    return f"{mode:o}"


def parseFd(value: str) -> int:
    """A file descriptor number."""
    try:
        fd = int(value)
    except ValueError:
        fd = -1
    if fd < 0:
        raise ValueError("not a file descriptor number")
    return fd


_RATE = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)(?P<unit>[kKMGT]i?)?(?:B/s|/s)?")
_RATE_UNITS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}

#: The lowest --rate-limit (a bare number is bytes per second: C{300} is a slip).
MIN_RATE = 1000


def parseRate(value: str) -> float:
    """
    Bytes per second: C{300M} -> 3e8.  k, M, G, T are powers of 1000; Ki,
    Mi, Gi, Ti powers of 1024; optionally followed by C{B/s} or C{/s}.
    """
    text = value.strip()
    match = _RATE.fullmatch(text)
    if match is None:
        bits = " (bytes, not bits: 1 Gbit/s is 125M)" if text.endswith(("b/s", "bit", "bps")) else ""
        raise ValueError(f"not a rate in bytes per second (try 300M, 1.5G, 64Mi or 50MB/s){bits}")
    unit = match["unit"] or ""
    if unit.endswith("i"):
        scale = 1024 ** ("KMGT".index(unit[0].upper()) + 1)
    else:
        scale = _RATE_UNITS[unit]
    rate = float(match["number"]) * scale
    if not rate > 0:
        raise ValueError("a rate limit must be above 0")
    if rate < MIN_RATE:
        raise ValueError(f"below the lowest rate, 1k (bytes per second: did you mean {match['number']}M?)")
    return rate
