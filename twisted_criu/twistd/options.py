# -*- test-case-name: tests.test_twistd -*-
"""Command-line options shared by C{twistd criu-proxy} and C{twistd criu-cache}."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

from twisted.application.internet import backoffPolicy
from twisted.internet.endpoints import clientFromString, quoteStringArgument, serverFromString
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage

from twisted_criu.flow.ratelimit import RateLimitedEndpoint, TokenBucket, describeRate
from twisted_criu.link import tls
from twisted_criu.link.key import LinkKey, LinkKeyError, defaultKeyPath, loadKey
from twisted_criu.link.tls import TLSClientEndpoint, clientConnectionCreator
from twisted_criu.storage.spill import SpillStore
from twisted_criu.twistd.endpointstrings import endpointHost, endpointType
from twisted_criu.twistd.listening import ListenOption, OptionEndpoint, checkEndpointString
from twisted_criu.twistd.parsers import (
    defaultMemoryLimit,
    parseFd,
    parseMode,
    parseNumber,
    parsePort,
    parseRate,
    parseSeconds,
    parseSize,
    parseVariant,
)
from twisted_criu.twistd.startup import (
    checkTwistdPidfile,
    exitOnUsageError,
    reportStartupFailures,
    synopsis,
)

log = Logger()

#: The port CRIU's remote-images daemons used.
DEFAULT_PORT = 9996

#: Seconds a peer has to complete the link's TLS handshake (a few round trips).
HANDSHAKE_DEADLINE = 10.0

#: The longest path a UNIX socket can be bound to (sun_path, less its NUL).
MAX_SOCKET_PATH = 107


def unixEndpoint(path: str, mode: str = "600") -> str:
    """A C{unix:} server endpoint string for C{path}, safely quoted."""
    return f"unix:{quoteStringArgument(path)}:mode={mode}"


def daemonArguments(reactor: Any, options: DaemonOptions, holdPipes: bool = False) -> dict[str, Any]:
    """
    The keyword arguments both daemons' services take from the options they
    share: the store (keeping what criu splices in its pipes if
    C{holdPipes}), the criu-facing endpoints' settings, timeouts, C{--keep}.
    """
    streamLocal: IStreamServerEndpoint | None = None
    if options["stream-local"] is not None:
        streamLocal = options.listenEndpoint(reactor, "stream-local")
    return {
        "store": SpillStore(options["memory-limit"], options["spill-dir"], reactor.callFromThread, holdPipes),
        "readVariant": options["read-variant"],
        "linkTimeout": options["timeout"],
        "clientTimeout": options["client-timeout"],
        "streamLocal": streamLocal,
        "keep": options["keep"],
        "progressInterval": options["progress-interval"],
    }


class LinkTLSOptions(usage.Options):
    """
    How the proxy -> cache link is secured: by default TLS authenticated by
    the link key file both ends hold; C{--tls} for certificates from a PKI
    (CRIU's page-server spellings); C{--plain-link} for CRIU's C daemons.
    """

    #: Whether a missing key file is generated (the daemons) or an error (push).
    createsLinkKey = True

    optFlags: list[list[Any]] = [
        ["plain-link", None, "Plain TCP on the link, neither authenticated nor encrypted, as CRIU's C daemons speak it (give it to both ends; it logs a warning: limit who may connect with --allow-from)."],
        ["tls", None, "Mutual TLS with certificates from your PKI on the link, instead of the link key (give it to both ends)."],
        ["tls-no-cn-verify", None, "Proxy: do not check that the cache's certificate names the host dialled (its CA is still checked). The cache never checks names."],
    ]
    optParameters: list[list[Any]] = [
        ["link-key", None, None, "The key file both ends of the link hold (0600; copy it from one host to the other): only a peer holding it can open the link, which is encrypted and tamper-proof (TLS 1.3). A daemon generates it if absent (push never does). [default: $TWISTED_CRIU_LINK_KEY, else /etc/twisted-criu/link.key for root, ~/.config/twisted-criu/link.key for others]"],
        ["tls-cacert", None, None, f"With --tls: CA certificate(s), PEM, the other end's certificate must chain to [default: {tls.DEFAULT_CACERT}]."],
        ["tls-cert", None, None, f"With --tls: this end's certificate, PEM, optionally followed by intermediates [default: {tls.DEFAULT_CERT}]."],
        ["tls-key", None, None, f"With --tls: the unencrypted PEM private key of --tls-cert [default: {tls.DEFAULT_KEY}]."],
    ]

    #: The TLS options, and CRIU's default for each file.
    _tlsFiles = (
        ("tls-cacert", tls.DEFAULT_CACERT),
        ("tls-cert", tls.DEFAULT_CERT),
        ("tls-key", tls.DEFAULT_KEY),
    )

    def loadTLS(self) -> None:
        """
        Read what secures the link now (a bad file is a usage error):
        C{tls-credentials} with --tls, C{link-key} (a L{LinkKey}) by default.
        """
        self["tls-credentials"] = None
        if self["plain-link"] and self["tls"]:
            raise usage.UsageError("--plain-link and --tls: give one (the link is either plain or TLS)")
        if self["link-key"] is not None and (self["plain-link"] or self["tls"]):
            other = "--plain-link" if self["plain-link"] else "--tls"
            raise usage.UsageError(f"--link-key secures the default link: it does not go with {other}")
        if not self["tls"]:
            stray = [f"--{name}" for name, _ in self._tlsFiles if self[name] is not None]
            if self["tls-no-cn-verify"]:
                stray.append("--tls-no-cn-verify")
            if stray:
                raise usage.UsageError(
                    f"{stray[0]} needs --tls (without --tls the link is secured by the link key)"
                )
            if not self["plain-link"]:
                self._loadLinkKey()
            return
        defaulted = set()
        for name, default in self._tlsFiles:
            if self[name] is None:
                self[name] = default
                defaulted.add(name)
        try:
            self["tls-credentials"] = tls.loadCredentials(
                self["tls-cacert"], self["tls-cert"], self["tls-key"]
            )
        except tls.TLSSetupError as e:
            message = str(e)
            for name in defaulted:
                if message.startswith(f"--{name} "):
                    message += f" (CRIU's default path; give --{name} FILE)"
            raise usage.UsageError(message) from None

    def _loadLinkKey(self) -> None:
        path = self["link-key"] or defaultKeyPath()
        try:
            self["link-key"] = loadKey(path, create=self.createsLinkKey)
        except LinkKeyError as e:
            raise usage.UsageError(f"{e} (or --plain-link for CRIU's C daemons)") from None

    def linkKey(self) -> LinkKey | None:
        """The link key, unless the link is plain or uses --tls."""
        key = self["link-key"]
        return key if isinstance(key, LinkKey) else None

    def logLinkSecurity(self, peer: str) -> None:
        """Say at start how the link is secured (a warning if it is not)."""
        key = self.linkKey()
        if key is not None:
            if key.created:
                log.warn(
                    "generated a new link key at {path} (fingerprint {fingerprint}): copy it"
                    " (0600) to the {peer}'s host unless that is this host",
                    path=key.path,
                    fingerprint=key.fingerprint,
                    peer=peer,
                )
            log.info(
                "link: TLS 1.3 authenticated by the {key}; the {peer} must hold the same key",
                key=key.describe(),
                peer=peer,
            )
        elif self["plain-link"]:
            log.warn(
                "--plain-link: the link is neither authenticated nor encrypted; anyone who can"
                " reach it can read the images or send images a restore would run. Use it only"
                " for CRIU's C daemons, on a trusted network, with --allow-from"
            )

    def refuseDoubleTLS(self, option: str, kinds: tuple[str, ...], example: str) -> None:
        """--tls wraps the link endpoint itself: it must be a plain stream."""
        if self["tls"] and endpointType(self[option]) in kinds:
            raise usage.UsageError(
                f"--tls puts TLS around --{option} itself: give it a plain stream endpoint"
                f" (such as {example}), not {self[option].split(':', 1)[0]}:"
            )


#: C{--rate-limit}, of the proxy and of push.
RATE_LIMIT_OPTION: list[Any] = [
    "rate-limit",
    None,
    None,
    "Never put more than RATE bytes per second on the link (counted after TLS), so that a"
    " migration does not starve other traffic: e.g. 300M. k, M, G are powers of 1000;"
    " Ki, Mi, Gi powers of 1024; optionally followed by B/s or /s. Bursts are at most"
    " 1/20 s of it (64 KiB or more). [default: no limit]",
    parseRate,
]


def linkRateLimit(reactor: Any, options: usage.Options) -> TokenBucket | None:
    """The token bucket C{--rate-limit} asks for, said in the log; L{None} without it."""
    rate = options["rate-limit"]
    if rate is None:
        return None
    bucket = TokenBucket(reactor, rate)
    log.info(
        "link rate limited to {rate} (--rate-limit), in bursts of at most {burst} bytes",
        rate=describeRate(rate),
        burst=bucket.burst,
        rateLimit=rate,
    )
    return bucket


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
    reactor: Any, options: LinkTLSOptions, maxRetryDelay: float, rateLimit: TokenBucket | None = None
) -> tuple[IStreamClientEndpoint, Callable[[int], float], str]:
    """
    The endpoint of the cache (with TLS around it if asked, and C{rateLimit}
    under TLS), the retry policy for it, and its description for the log.
    """
    cache: IStreamClientEndpoint = clientFromString(reactor, options["connect"])
    if rateLimit is not None:
        cache = RateLimitedEndpoint(cache, rateLimit)
    retryPolicy = backoffPolicy(maxDelay=maxRetryDelay)
    description = options["connect"]
    key = options.linkKey()
    if key is not None:
        creator: Any = key.clientCreator()
        description += " (link key)"
    elif options["tls"]:
        hostname = options["tls-hostname"]
        credentials = options["tls-credentials"]
        creator = clientConnectionCreator(credentials, hostname)
        description += " (TLS)"
        log.info(
            "TLS to the cache: {credentials}; the cache's certificate must name {name}",
            credentials=credentials.describe(),
            name=hostname or "anything (--tls-no-cn-verify)",
        )
    else:
        return cache, retryPolicy, description
    handshakeTimeout = min(options["timeout"], HANDSHAKE_DEADLINE)
    secured = TLSClientEndpoint(reactor, cache, creator, handshakeTimeout, options["connect"])
    return secured, secured.backoff(retryPolicy), description
    return cache, retryPolicy, description


class _NamedCoerceParameter(usage.CoerceParameter):
    """Names the option whose value it cannot read: C{--port abc: not a port number}."""

    def dispatch(self, parameterName: str, value: str | None) -> None:
        if value is None:
            raise usage.UsageError(f"--{parameterName} needs a value")
        try:
            self.options.opts[parameterName] = self.coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{parameterName} {value}: {e}") from None


class DaemonOptions(LinkTLSOptions):
    """
    Flags both daemons share; subclasses add their link option.  Run as a
    twistd subcommand, a usage error is two lines and exit status 2, and a
    failure to start one line and exit status 1 (L{startup}).

    @ivar listenOptions: how the operator chose each endpoint the daemon
        listens on (L{ListenOption}), by option name, for its errors.
    """

    socketName = ""
    streamSocketName = ""
    controlSocketName = ""

    optFlags = [
        ["once", None, "Serve one migration session, then exit."],
        ["keep", None, "Keep the images of completed sessions (list, pull and drop them with the twisted-criu command) instead of dropping them."],
        ["debug", None, "Show the Python traceback of a failure to start, instead of one line (twistd's own --debug also does)."],
    ]
    optParameters = [
        ["images-dir", "D", ".", "The directory criu is given with -D; criu's sockets are created there."],
        ["port", None, DEFAULT_PORT, "TCP port of the proxy -> cache link.", parsePort],
        ["local", None, None, "Endpoint criu --remote connects to (default: unix socket in --images-dir)."],
        ["stream-local", None, None, "Endpoint criu --stream connects to (default: unix socket in --images-dir; 'none' to disable)."],
        ["memory-limit", None, None, "Image bytes held in memory (all images together) before spilling to disk, e.g. 512M [default: a quarter of RAM].", parseSize],
        ["spill-dir", None, None, "An existing, writable directory where images past --memory-limit are spilled, with direct I/O where the filesystem allows it [default: the system temp dir]."],
        ["read-variant", None, "auto", "How criu expects read bytes: auto, pipe (criu-dev 2020) or inline (2015 seed).", parseVariant],
        ["timeout", None, 60.0, "Seconds the proxy -> cache link may stall inside an image, or stay down after losing one, before it is dropped (waiting restores then get ENOENT).", parseSeconds],
        ["client-timeout", None, 60.0, "Seconds a criu connection may take to send its request before it is closed.", parseSeconds],
        ["socket-mode", None, "600", "Permissions of the UNIX sockets created in --images-dir (criu's, and the control socket).", parseMode],
        ["control", None, None, "Endpoint of the control API used by the twisted-criu command (default: unix socket in --images-dir; 'none' to disable)."],
        ["metrics", None, None, "Serve Prometheus metrics on this endpoint, e.g. tcp:9101:interface=127.0.0.1 [default: off]."],
        ["status-fd", None, None, "Write one byte to this file descriptor and close it once the daemon is ready (as CRIU's daemons do).", parseFd],
        ["pidfile", None, None, "Write the daemon's pid to this file once it is ready; removed when it stops (as CRIU's --pidfile)."],
        ["log-json", None, None, "Also write every log event as a JSON line to this file ('-' for standard output)."],
        ["progress-interval", None, 10.0, "Seconds between progress lines for images that take longer than that (0: none).", parseNumber],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name, handler in self._dispatch.items():
            if isinstance(handler, usage.CoerceParameter):
                self._dispatch[name] = _NamedCoerceParameter(self, handler.coerce)
        self.listenOptions: dict[str, ListenOption] = {}

    def parseOptions(self, options: list[str] | None = None) -> None:
        if self.parent is None:  # not under twistd: the caller sees UsageError
            super().parseOptions(options)
            return
        if "--debug" not in (options or []) and not self.parent.get("debug"):
            reportStartupFailures(self)
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            exitOnUsageError(self, e)
        checkTwistdPidfile(self.parent)

    def getSynopsis(self) -> str:
        if self.parent is None:
            return super().getSynopsis()
        return synopsis(self)

    def postOptions(self) -> None:
        if self["memory-limit"] is None:
            self["memory-limit"] = defaultMemoryLimit()
        if isinstance(self["read-variant"], str):  # the default is not coerced
            self["read-variant"] = parseVariant(self["read-variant"])
        self["socket-mode"] = parseMode(self["socket-mode"])  # the default is not coerced
        for option, name in (
            ("local", self.socketName),
            ("stream-local", self.streamSocketName),
            ("control", self.controlSocketName),
        ):
            if self[option] is None:
                self[option] = unixEndpoint(self._socketPath(option, name), self["socket-mode"])
                directory = f"-D {self['images-dir']}"
                self.listenOptions[option] = ListenOption(directory, directory, "-D")
            elif option == "local" or self[option] != "none":
                self.givenEndpoint(option)
        for option in ("stream-local", "control"):
            if self[option] == "none":
                self[option] = None
        if self["metrics"] is not None:
            self.givenEndpoint("metrics")
        self["spill-dir"] = checkSpillDir(self["spill-dir"])
        self.loadTLS()

    def givenEndpoint(self, option: str) -> None:
        """C{--option} was given an endpoint string to listen on: check it."""
        checkEndpointString(option, self[option])
        self.listenOptions[option] = ListenOption.given(option, self[option])

    def listenEndpoint(self, reactor: Any, option: str) -> IStreamServerEndpoint:
        """The endpoint of C{--option}: a failure to listen on it names the option."""
        return OptionEndpoint(serverFromString(reactor, self[option]), self.listenOptions[option])

    def _socketPath(self, option: str, name: str) -> str:
        """C{name} in the images directory, if a UNIX socket can be bound there."""
        path = os.path.join(self._imagesDir(), name)
        size = len(os.fsencode(path))
        if size > MAX_SOCKET_PATH:
            raise usage.UsageError(
                f"the socket path {path} is {size} bytes, longer than a UNIX socket allows"
                f" ({MAX_SOCKET_PATH}): use a shorter --images-dir (criu needs it too), or give --{option}"
            )
        return path

    def _imagesDir(self) -> str:
        directory = os.path.abspath(self["images-dir"])
        if not os.path.isdir(directory):
            raise usage.UsageError(
                f"-D {self['images-dir']}: the directory does not exist; create it"
                " (criu is given the same -D)"
            )
        self["images-dir"] = directory
        return directory


def checkSpillDir(value: str | None) -> str:
    """
    The spill directory, made absolute: it must exist and this daemon must
    be able to create files in it (a typo or an unmounted disk must not
    send spilled images to the root filesystem).
    """
    directory = os.path.abspath(value) if value is not None else tempfile.gettempdir()
    named = f"--spill-dir {value}" if value is not None else f"the temp dir {directory} (--spill-dir)"
    if not os.path.isdir(directory):
        raise usage.UsageError(
            f"{named}: no such directory; create it (on the disk meant for spilled images) or give another"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".twisted-criu-probe-", dir=directory))
    except OSError as e:
        raise usage.UsageError(
            f"{named}: cannot create files there ({e.strerror}); give a directory this daemon can write"
        ) from None
    return directory
