# -*- test-case-name: tests.test_allow -*-
"""
Which user opened a TCP connection from this host: the owner of the
peer's socket, read from the kernel's C{/proc/net/tcp} tables.  On one
host, any local user can connect to the cache's port (on the loopback or
on any of the host's addresses); this tells root's proxy from them.
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


def socketOwners(host: str, port: int, tables: Iterable[str] = _TABLES) -> tuple[set[int], bool]:
    """
    Who owns the TCP sockets bound to C{host}:C{port} in this namespace:
    the uids of the live ones, and whether any closed one is there too.

    A closed socket (in TIME_WAIT, or orphaned by C{close()} while its
    bytes or FIN are still on their way) has no owner: the kernel lists it
    with inode 0 and uid 0, whoever opened it, so its uid is never taken.
    """
    wanted = (_normal(host), port)
    owners: set[int] = set()
    closed = False
    for table in tables:
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and _parse(fields[1]) == wanted:
                if fields[9] == "0":
                    closed = True
                else:
                    owners.add(int(fields[7]))
    return owners, closed


def socketOwner(host: str, port: int, tables: Iterable[str] = _TABLES) -> int | None:
    """The uid of the live TCP socket bound to C{host}:C{port} (L{None}: none, or not just one owner)."""
    owners, _ = socketOwners(host, port, tables)
    return next(iter(owners)) if len(owners) == 1 else None


class LocalOwnerCheck:
    """
    Refuses a peer on this host (a loopback peer, or one whose address and
    port a socket here is bound to) unless its socket is live and owned by
    one of C{uids} (by default root and the daemon's own user); remote
    peers pass.
    """

    def __init__(self, uids: Iterable[int] | None = None, tables: Iterable[str] = _TABLES) -> None:
        self.uids = set(uids) if uids is not None else {0, os.geteuid()}
        self._tables = tuple(tables)

    def refusal(self, address: Any) -> str | None:
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        if not isinstance(host, str) or not isinstance(port, int):
            return None
        try:
            loopback = _normal(host).is_loopback
        except ValueError:
            return None
        owners, closed = socketOwners(host, port, self._tables)
        if not owners:
            if closed:
                return "a local peer whose socket is already closed (its owner cannot be known)"
            return "a loopback peer whose socket is gone" if loopback else None
        strangers = sorted(owners - self.uids)
        if strangers:
            allowed = ", ".join(str(uid) for uid in sorted(self.uids))
            return (
                f"a {'loopback' if loopback else 'local'} peer of uid {', '.join(map(str, strangers))},"
                f" not of uid {allowed} (--allow-local-users lifts this)"
            )
        return None
