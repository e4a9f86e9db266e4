# -*- test-case-name: tests.test_twistd -*-
"""C{twistd criu-cache}: the restore-side daemon."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage

from twisted_criu.daemons.cache import ImageCacheService
from twisted_criu.daemons.extras import finishDaemon
from twisted_criu.link.allow import AddressFilter, PeerCheck, PeerCheckingEndpoint, parseNetworks
from twisted_criu.link.localpeers import LocalOwnerCheck
from twisted_criu.link.tls import TLSServerEndpoint, serverConnectionCreator
from twisted_criu.twistd.listening import ListenOption
from twisted_criu.twistd.options import HANDSHAKE_DEADLINE, DaemonOptions, daemonArguments
from twisted_criu.twistd.parsers import parseDuration


class Options(DaemonOptions):
    synopsis = "[options]"
    longdesc = (
        "Receive checkpoint images from a criu-proxy and serve them to "
        "`criu restore --stream -D DIR` (released CRIU, 3.15 and later) on "
        "DIR/streamer-serve.sock, and to `criu restore --remote -D DIR` "
        "(criu-dev's remote images) on DIR/img-cache.sock."
    )
    streamSocketName = "streamer-serve.sock"
    socketName = "img-cache.sock"
    controlSocketName = "cache-control.sock"
    optFlags = [
        ["allow-local-users", None, "Accept a link from a loopback peer owned by any user (default: only root and the cache's own user, so no other local user can send images)."],
    ]
    optParameters = [
        ["address", None, "127.0.0.1", "Interface to listen on for the proxy (use 0.0.0.0 or the host's address for a real migration)."],
        ["listen", None, None, "Server endpoint for the proxy (overrides --address/--port), e.g. tcp:9996:interface=10.0.0.2."],
        ["allow-from", None, None, "Only these addresses or networks may open a link, e.g. 10.0.0.1 or 10.0.0.0/24 (comma separated) [default: any]."],
        ["retain", None, "1h", "How long a delivered session waits for its restore, or a restore for its confirmation, before its images are dropped: 90, 30m, 1h (0: forever).", parseDuration],
        ["resume-grace", None, "60", "How long the part of an image received before its link broke is kept for its proxy to come back and send the rest (0: never kept): 60, 5m.", parseDuration],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if isinstance(self["retain"], str):  # the default is not coerced
            self["retain"] = parseDuration(self["retain"])
        if isinstance(self["resume-grace"], str):
            self["resume-grace"] = parseDuration(self["resume-grace"])
        if self["allow-from"] is not None:
            try:
                self["allow-from"] = AddressFilter(parseNetworks(self["allow-from"]))
            except ValueError as e:
                raise usage.UsageError(f"--allow-from: {e}") from None
        if self["listen"] is None:
            address = quoteStringArgument(self["address"])
            self["listen"] = f"tcp:{self['port']}:interface={address}"
            self.listenOptions["listen"] = ListenOption(
                f"--port {self['port']}", f"--address {self['address']}", "--port"
            )
        self.refuseDoubleTLS("listen", ("ssl",), "tcp:9996:interface=10.0.0.2")
        if "listen" not in self.listenOptions:
            self.givenEndpoint("listen")


log = Logger()


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    listen: IStreamServerEndpoint = options.listenEndpoint(reactor, "listen")
    checks: list[PeerCheck] = []
    if options["allow-from"] is not None:
        checks.append(options["allow-from"])
        log.info("links only from {allowed} (--allow-from)", allowed=options["allow-from"].describe())
    if not options["allow-local-users"]:
        checks.append(LocalOwnerCheck())
    if checks:
        listen = PeerCheckingEndpoint(listen, checks)  # under TLS: no handshake for them
    handshakeTimeout = min(options["timeout"], HANDSHAKE_DEADLINE)
    key = options.linkKey()
    if key is not None:
        listen = TLSServerEndpoint(reactor, listen, key.serverCreator(), handshakeTimeout)
    elif options["tls"]:
        credentials = options["tls-credentials"]
        listen = TLSServerEndpoint(
            reactor, listen, serverConnectionCreator(credentials), handshakeTimeout
        )
        log.info("TLS for the proxy: {credentials}", credentials=credentials.describe())
    options.logLinkSecurity("proxy")
    service = ImageCacheService(
        reactor,
        options.listenEndpoint(reactor, "local"),
        listen,
        retain=options["retain"],
        resumeGrace=options["resume-grace"],
        **daemonArguments(reactor, options),
    )
    return finishDaemon(reactor, service, options)
