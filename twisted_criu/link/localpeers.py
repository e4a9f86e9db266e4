# -*- test-case-name: tests.test_allow -*-
"""
Which user opened a loopback TCP connection: the owner of the peer's
socket, read from the kernel's C{/proc/net/tcp} tables.  On one host, any
local user can connect to the cache's port; this tells root's proxy from
them.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def _parse(field: str) -> tuple[Address, int]:
    """C{"0100007F:EE18"} -> (127.0.0.1, 60952): each 32-bit word is in host (little-endian) order."""
    host, port = field.split(":")
    raw = bytes.fromhex(host)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, int(port, 16)


def _normal(host: str) -> Address:
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def socketOwner(host: str, port: int, tables: Iterable[str] = _TABLES) -> int | None:
    """The uid that owns the TCP socket bound to C{host}:C{port} in this namespace, if any."""
    wanted = (_normal(host), port)
    for table in tables:
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 7 and _parse(fields[1]) == wanted:
                return int(fields[7])
    return None


class LocalOwnerCheck:
    """
    Refuses a loopback peer whose socket is not owned by one of C{uids}
    (by default root and the daemon's own user); remote peers pass.
    """

    def __init__(self, uids: Iterable[int] | None = None, tables: Iterable[str] = _TABLES) -> None:
        self.uids = set(uids) if uids is not None else {0, os.geteuid()}
        self._tables = tuple(tables)

    def refusal(self, address: Any) -> str | None:
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        if not isinstance(host, str) or not isinstance(port, int):
            return None
        try:
            if not _normal(host).is_loopback:
                return None
        except ValueError:
            return None
        owner = socketOwner(host, port, self._tables)
        if owner is None:
            return "a loopback peer whose socket is gone"
        if owner not in self.uids:
            allowed = ", ".join(str(uid) for uid in sorted(self.uids))
            return f"a loopback peer of uid {owner}, not of uid {allowed} (--allow-local-users lifts this)"
        return None
