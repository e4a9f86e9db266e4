# -*- test-case-name: tests.slow.test_demo -*-
"""What the demo prints, and how a run fails (L{DemoError}, L{Timeout})."""

from __future__ import annotations


class DemoError(Exception):
    """The demo failed; the message says why."""


class Timeout(BaseException):
    """The run took longer than C{--timeout} (raised by C{SIGALRM})."""


def say(message: str = "") -> None:
    """One line of the demo's output, at once."""
    print(message, flush=True)


def human(size: float) -> str:
    """C{size} bytes in B, KiB or MiB."""
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def rate(size: int, seconds: float) -> str:
    """C{size} bytes in C{seconds} as MB/s."""
    return f"{size / 1e6 / max(seconds, 1e-9):.1f} MB/s"
