# -*- test-case-name: tests.test_taps -*-
"""C{twistd criu-proxy}: the dump-side daemon."""

from __future__ import annotations

from twisted.application.internet import backoffPolicy
from twisted.application.service import IService
from twisted.internet.endpoints import clientFromString, serverFromString

from twisted_criu.options import DaemonOptions, makeStore, streamEndpoint
from twisted_criu.proxy import ImageProxyService


class Options(DaemonOptions):
    synopsis = "[options]"
    longdesc = (
        "Receive checkpoint images from `criu dump --remote -D DIR` on "
        "DIR/img-proxy.sock and forward each, once complete, to a criu-cache."
    )
    streamSocketName = "streamer-capture.sock"
    socketName = "img-proxy.sock"
    optParameters = [
        ["address", None, "localhost", "Host of the criu-cache."],
        ["connect", None, None, "Client endpoint of the cache (overrides --address/--port), e.g. tcp:host=dst:port=9996."],
        ["max-retry-delay", None, 10.0, "Longest wait between attempts to reach the cache, in seconds.", float],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if self["connect"] is None:
            self["connect"] = f"tcp:host={self['address']}:port={self['port']}"


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    service = ImageProxyService(
        reactor,
        serverFromString(reactor, options["local"]),
        clientFromString(reactor, options["connect"]),
        store=makeStore(options),
        readVariant=options["read-variant"],
        linkTimeout=options["timeout"],
        clientTimeout=options["client-timeout"],
        streamLocal=streamEndpoint(reactor, options),
        retryPolicy=backoffPolicy(maxDelay=options["max-retry-delay"]),
        cacheDescription=options["connect"],
    )
    if options["once"]:
        service.whenSessionDone().addCallback(lambda _: reactor.stop())
    return service
