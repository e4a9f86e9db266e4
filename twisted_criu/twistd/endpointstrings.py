# -*- test-case-name: tests.test_tls -*-
"""Reading Twisted endpoint strings: their type and the host a client one dials."""

from __future__ import annotations


def _splitDescription(description: str) -> list[str]:
    """Split an endpoint string on unescaped colons, as Twisted does."""
    parts, current, chars = [], [], iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def endpointType(description: str) -> str:
    """C{"tcp"} for C{"tcp:host=h:port=1"}."""
    return _splitDescription(description)[0].strip().lower()


def endpointHost(description: str) -> str | None:
    """
    The host a client endpoint string dials: its C{host=} argument, or the
    first argument of C{tcp:HOST:PORT}; L{None} if it has none (C{unix:}).
    """
    kind, *arguments = _splitDescription(description)
    positional: list[str] = []
    for argument in arguments:
        name, equals, value = argument.partition("=")
        if equals and name == "host":
            return value or None
        if not equals:
            positional.append(argument)
    if kind.strip().lower() in ("tcp", "tcp6") and positional:
        return positional[0] or None
    return None
