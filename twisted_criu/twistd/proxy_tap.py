# -*- test-case-name: tests.test_twistd -*-
"""C{twistd criu-proxy}: the dump-side daemon."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.internet.endpoints import quoteStringArgument

from twisted_criu.daemons.extras import finishDaemon
from twisted_criu.daemons.proxy import ImageProxyService
from twisted_criu.flow.compress import parseMode
from twisted_criu.storage.spill import heldpipes
from twisted_criu.twistd.listening import checkEndpointString, checkHostResolves
from twisted_criu.twistd.options import (
    RATE_LIMIT_OPTION,
    DaemonOptions,
    cacheEndpoint,
    checkCacheEndpoint,
    daemonArguments,
    linkRateLimit,
)
from twisted_criu.twistd.parsers import parseCompress, parseSeconds


class Options(DaemonOptions):
    synopsis = "[options]"
    longdesc = (
        "Receive checkpoint images from `criu dump --stream -D DIR` (released "
        "CRIU, 3.15 and later) on DIR/streamer-capture.sock, or from "
        "`criu dump --remote -D DIR` (criu-dev's remote images) on "
        "DIR/img-proxy.sock, and forward them to a criu-cache: to a twisted-criu "
        "cache while criu writes them (cut through), to CRIU's C cache once complete."
    )
    #: How the operator named the cache (C{--address X} or C{--connect E}).
    cacheNamed = ""
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
        ["max-retry-delay", None, 10.0, "Longest wait between attempts to reach the cache, in seconds.", parseSeconds],
        RATE_LIMIT_OPTION,
        ["compress", None, "auto", "Compress images on the link to a twisted-criu cache: auto (when that gets them across sooner, judged chunk by chunk), zstd (always) or none.", parseCompress],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        given = self["connect"] is not None
        if given:
            self.cacheNamed = f"--connect {self['connect']}"
        else:
            address = quoteStringArgument(self["address"])
            self["connect"] = f"tcp:host={address}:port={self['port']}"
            self.cacheNamed = f"--address {self['address']}"
        checkCacheEndpoint(self)
        if given:
            checkEndpointString("connect", self["connect"], client=True)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    checkHostResolves(options.cacheNamed, options["connect"])
    rateLimit = linkRateLimit(reactor, options)
    cache, retryPolicy, description = cacheEndpoint(reactor, options, options["max-retry-delay"], rateLimit)
    options.logLinkSecurity("cache")
    service = ImageProxyService(
        reactor,
        options.listenEndpoint(reactor, "local"),
        cache,
        retryPolicy=retryPolicy,
        cacheDescription=description,
        checksum=options["checksum"],
        cutThrough=not options["store-and-forward"],
        rateLimit=rateLimit,
        compress=parseMode(options["compress"]),
        # criu's pages stay in pipes as it spliced them (no copy into memory files)
        **daemonArguments(reactor, options, holdPipes=heldpipes.available()),
    )
    return finishDaemon(reactor, service, options)
