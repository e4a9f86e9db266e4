# -*- test-case-name: tests.test_taps -*-
"""C{twistd criu-proxy}: the dump-side daemon."""

from __future__ import annotations

from twisted.application.internet import backoffPolicy
from twisted.application.service import IService
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from twisted_criu.options import DaemonOptions, makeStore, streamEndpoint
from twisted_criu.proxy import ImageProxyService
from twisted_criu.tls import TLSClientEndpoint, clientConnectionCreator, endpointHost


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
        self._refuseDoubleTLS("connect", ("ssl", "tls"), "tcp:host=dst:port=9996")
        # The name the cache's certificate must carry: the host dialled.
        self["tls-hostname"] = None
        if self["tls"] and not self["tls-no-cn-verify"]:
            self["tls-hostname"] = endpointHost(self["connect"]) or self["address"]


log = Logger()


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    cache: IStreamClientEndpoint = clientFromString(reactor, options["connect"])
    retryPolicy = backoffPolicy(maxDelay=options["max-retry-delay"])
    description = options["connect"]
    if options["tls"]:
        hostname = options["tls-hostname"]
        credentials = options["tls-credentials"]
        secured = TLSClientEndpoint(
            reactor,
            cache,
            clientConnectionCreator(credentials, hostname),
            handshakeTimeout=options["timeout"],
            description=description,
        )
        cache, retryPolicy = secured, secured.backoff(retryPolicy)
        description += " (TLS)"
        log.info(
            "TLS to the cache: {credentials}; the cache's certificate must name {name}",
            credentials=credentials.describe(),
            name=hostname or "anything (--tls-no-cn-verify)",
        )
    service = ImageProxyService(
        reactor,
        serverFromString(reactor, options["local"]),
        cache,
        store=makeStore(options),
        readVariant=options["read-variant"],
        linkTimeout=options["timeout"],
        clientTimeout=options["client-timeout"],
        streamLocal=streamEndpoint(reactor, options),
        retryPolicy=retryPolicy,
        cacheDescription=description,
    )
    if options["once"]:
        service.whenSessionDone().addCallback(lambda _: reactor.stop())
    return service
