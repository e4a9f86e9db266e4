# -*- test-case-name: tests.test_allow -*-
"""Which peers may open a link to the cache: C{--allow-from}, and checks like it."""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol, Sequence, Union

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parseNetworks(text: str) -> list[Network]:
    """
    Networks from C{"10.0.0.2,192.168.1.0/24,::1"}: addresses or CIDR
    networks, comma separated.

    @raise ValueError: one of them is neither; the message names it.
    """
    networks: list[Network] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"not an address or network: {part!r} (e.g. 10.0.0.2 or 10.0.0.0/24)") from None
    if not networks:
        raise ValueError("no address given")
    return networks


class AddressFilter:
    """Allows the peers whose IP address is in one of C{networks}."""

    def __init__(self, networks: Sequence[Network]) -> None:
        self.networks = list(networks)

    def allows(self, address: Any) -> bool:
        """
        Is C{address} (a Twisted
        L{IPv4Address<twisted.internet.address.IPv4Address>} or
        L{IPv6Address<twisted.internet.address.IPv6Address>}) allowed?
        """
        host = getattr(address, "host", None)
        if not isinstance(host, str):
            return False
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def describe(self) -> str:
        return ", ".join(str(network) for network in self.networks)

    def refusal(self, address: Any) -> str | None:
        return None if self.allows(address) else f"not in --allow-from ({self.describe()})"


class PeerCheck(Protocol):
    """Says why a peer may not open a link, or L{None} if it may."""

    def refusal(self, address: Any) -> str | None:
        """Why the peer at C{address} is refused, or L{None}."""


class _FilteringFactory(Factory):
    """Hands the wrapped factory's own protocol to a peer every check lets in; refuses the others."""

    noisy = False
    log = Logger()

    def __init__(self, wrapped: IProtocolFactory, checks: Sequence[PeerCheck]) -> None:
        self.wrapped = wrapped
        self.checks = list(checks)

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def logPrefix(self) -> str:
        prefix = getattr(self.wrapped, "logPrefix", None)
        return str(prefix()) if callable(prefix) else type(self.wrapped).__name__

    def buildProtocol(self, addr: Any) -> Any:
        for check in self.checks:
            why = check.refusal(addr)
            if why is not None:
                self.log.warn(
                    "refused a link from {peer}: {why}",
                    peer=f"{getattr(addr, 'host', addr)}:{getattr(addr, 'port', '')}",
                    why=why,
                )
                return None  # the port closes the connection: nothing is read
        return self.wrapped.buildProtocol(addr)


@implementer(IStreamServerEndpoint)
class PeerCheckingEndpoint:
    """
    A server endpoint whose connections from peers one of C{checks} refuses
    are closed at once.  Wrap the plain endpoint (under any TLS), so a
    refused peer does not even get a handshake.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, checks: Sequence[PeerCheck]) -> None:
        self._endpoint = endpoint
        self.checks = list(checks)

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        listening: Deferred[IListeningPort] = self._endpoint.listen(_FilteringFactory(factory, self.checks))
        return listening
