# -*- test-case-name: tests.test_twistd -*-
"""C{twistd criu-proxy}: the dump-side daemon."""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.internet import backoffPolicy
from twisted.application.service import IService
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from twisted_criu.daemons.extras import finishDaemon
from twisted_criu.daemons.proxy import ImageProxyService
from twisted_criu.link.tls import TLSClientEndpoint, clientConnectionCreator
from twisted_criu.twistd.endpointstrings import endpointHost
from twisted_criu.twistd.options import DaemonOptions, LinkTLSOptions, daemonArguments


class Options(DaemonOptions):
    synopsis = "[options]"
    longdesc = (
        "Receive checkpoint images from `criu dump --remote -D DIR` on "
        "DIR/img-proxy.sock and forward them to a criu-cache: to a twisted-criu "
        "cache while criu writes them (cut through), to CRIU's C cache once complete."
    )
    streamSocketName = "streamer-capture.sock"
    socketName = "img-proxy.sock"
    controlSocketName = "proxy-control.sock"
    optFlags = [
        ["checksum", None, "Send each image's SHA-256 with it; a twisted-criu cache checks it before serving the image (CRIU's C cache ignores it). Implies --store-and-forward."],
        ["store-and-forward", None, "Forward each image only once criu has written all of it, as CRIU's own proxy does [default: a twisted-criu cache gets images while criu writes them]."],
    ]
    optParameters = [
        ["address", None, "localhost", "Host of the criu-cache."],
        ["connect", None, None, "Client endpoint of the cache (overrides --address/--port), e.g. tcp:host=dst:port=9996."],
        ["max-retry-delay", None, 10.0, "Longest wait between attempts to reach the cache, in seconds.", float],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if self["connect"] is None:
            self["connect"] = f"tcp:host={self['address']}:port={self['port']}"
        checkCacheEndpoint(self)


log = Logger()


def checkCacheEndpoint(options: LinkTLSOptions) -> None:
    """
    After C{--connect} is known: refuse TLS inside TLS, and note the name
    the cache's certificate must carry (the host dialled).
    """
    options.refuseDoubleTLS("connect", ("ssl", "tls"), "tcp:host=dst:port=9996")
    options["tls-hostname"] = None
    if options["tls"] and not options["tls-no-cn-verify"]:
        options["tls-hostname"] = endpointHost(options["connect"]) or options["address"]


def cacheEndpoint(
    reactor: Any, options: LinkTLSOptions, maxRetryDelay: float
) -> tuple[IStreamClientEndpoint, Callable[[int], float], str]:
    """
    The endpoint of the cache (with TLS around it if asked), the retry
    policy for it, and its description for the log.
    """
    cache: IStreamClientEndpoint = clientFromString(reactor, options["connect"])
    retryPolicy = backoffPolicy(maxDelay=maxRetryDelay)
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
    return cache, retryPolicy, description


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    cache, retryPolicy, description = cacheEndpoint(reactor, options, options["max-retry-delay"])
    service = ImageProxyService(
        reactor,
        serverFromString(reactor, options["local"]),
        cache,
        retryPolicy=retryPolicy,
        cacheDescription=description,
        checksum=options["checksum"],
        cutThrough=not options["store-and-forward"],
        **daemonArguments(reactor, options),
    )
    return finishDaemon(reactor, service, options)
