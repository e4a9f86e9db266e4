# -*- test-case-name: tests.test_chains,tests.test_cli_errors,tests.test_cli_progress -*-
"""C{twisted-criu push}: send an on-disk dump to a criu-cache, as a criu-proxy would."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, quoteStringArgument
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.cli.bar import ProgressBar
from twisted_criu.cli.common import AnyOrderOptions, CommandError, Watchdog, positiveSeconds, tcpPort
from twisted_criu.cli.linkwatch import WatchedEndpoint
from twisted_criu.flow.ratelimit import describeRate
from twisted_criu.progress import formatBytes
from twisted_criu.twistd.options import RATE_LIMIT_OPTION, LinkTLSOptions
from twisted_criu.twistd.parsers import parseCompress


def _endpointError(option: str, value: str, error: ValueError) -> usage.UsageError:
    return usage.UsageError(
        f"{option} {value}: {error} (an endpoint such as tcp:host=HOST:port=9996)"
    )


class PushOptions(AnyOrderOptions, LinkTLSOptions):
    createsLinkKey = False  # push uses the cache host's key, copied here
    synopsis = "DIR (--address HOST [--port PORT] | --to ENDPOINT) [options]"
    longdesc = description = (
        "Send the images of an on-disk dump (the *.img files that `criu dump -D DIR` "
        "wrote) to a criu-cache, as a criu-proxy would. Without --snapshot-id they "
        "are served to `criu restore --stream`; with it, to `criu restore --remote "
        "-D SNAPSHOT_ID`. A progress bar is shown when standard error is a terminal."
    )
    arguments = (("directory", "DIR", "the dump's directory"),)

    optParameters: list[list[Any]] = [
        ["address", "a", None, "Host of the criu-cache."],
        ["port", "p", 9996, "TCP port of the criu-cache.", tcpPort],
        ["to", None, None, "Client endpoint of the cache (instead of --address/--port)."],
        ["snapshot-id", None, None, "Push as this snapshot id (criu restore --remote -D SNAPSHOT_ID)."],
        ["compress", None, "auto", "Compress images on the link: auto, zstd or none (see twistd criu-proxy --help).", parseCompress],
        ["timeout", None, 60.0, "Give up when the push got no further for this many seconds (the cache unreachable, stalled, or dropping the link).", positiveSeconds],
        RATE_LIMIT_OPTION,
    ]
    optFlags: list[list[Any]] = [
        ["checksum", None, "Send each image's SHA-256 (a twisted-criu cache checks it)."],
        ["no-progress", None, "No progress bar, even on a terminal."],
    ]

    def postOptions(self) -> None:
        from twisted.internet import reactor

        from twisted_criu.twistd.options import checkCacheEndpoint

        if self["to"] is not None and self["address"] is not None:
            raise usage.UsageError("give --address HOST (and --port) or --to ENDPOINT, not both")
        if self["to"] is None and self["address"] is None:
            raise usage.UsageError("give the cache: --address HOST (and --port) or --to ENDPOINT")
        if self["to"] is not None:
            self["connect"] = self["to"]
            option, value = "--to", self["to"]
        else:
            self["connect"] = _tcpEndpoint(self["address"], self["port"])
            option, value = "--address", self["address"]
        try:
            clientFromString(reactor, self["connect"])
        except ValueError as e:
            raise _endpointError(option, value, e) from None
        if not os.path.isdir(self["directory"]):
            raise usage.UsageError(f"{self['directory']} is not a directory (DIR: the dump's directory)")
        self.loadTLS()
        checkCacheEndpoint(self)


def _tcpEndpoint(address: str, port: int) -> str:
    """The endpoint string for C{--address}/C{--port} (an IPv6 literal too)."""
    kind = "tcp"
    try:
        if ipaddress.ip_address(address).version == 6:
            kind = "tcp6"
    except ValueError:
        pass
    return f"{kind}:host={quoteStringArgument(address)}:port={port}"


def imageFiles(directory: str) -> list[str]:
    """The image files of a dump directory, in a stable order."""
    names = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".img") and os.path.isfile(path) and not os.path.islink(path):
            names.append(name)
    return names


class _Headway:
    """
    How far a push got: the furthest any connection of the link got, in
    bytes handed over.  A connection going over old ground counts too when
    the one before it lasted C{timeout} seconds (a link that broke, not a
    cache that keeps dropping it).
    """

    def __init__(self, session: Any, clock: Any, timeout: float) -> None:
        self._session = session
        self._clock = clock
        self._timeout = timeout
        self._sender: Any = None
        self._since = 0.0
        self._last = 0
        self._trusted = False
        self.furthest = 0
        self.current = 0

    def check(self) -> bool:
        """Did the push get further since the last check?"""
        sender = self._session.sender
        if sender is None:
            return False
        now = self._clock.seconds()
        if sender is not self._sender:
            previous = self._sender
            self._trusted = previous is not None and now - self._since >= self._timeout
            self._sender, self._since, self._last = sender, now, 0
        self.current = progress = 0 if sender.lost else sender.progress
        moved = progress > self.furthest or (self._trusted and progress > self._last)
        self.furthest = max(self.furthest, progress)
        self._last = progress
        return moved


@implementer(ILogObserver)
class _Problems:
    """
    Remembers the library's last error (a stalled link, a bad frame, a TLS
    refusal after the handshake), for the final message.
    """

    def __init__(self, watch: WatchedEndpoint) -> None:
        self.watch = watch

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical):
            self.watch.problem = formatEvent(event)


def _stalled(watch: WatchedEndpoint, headway: _Headway, total: int, timeout: float) -> str:
    """Why the push got no further for C{timeout} seconds."""
    problem = f": {watch.problem}" if watch.problem else ""
    if not watch.connections:
        return f"cannot reach the cache at {watch.where} within {timeout:g} s{problem or ': no answer'}"
    if watch.drops:
        return (
            f"the cache at {watch.where} dropped the link {watch.drops} times and the push got"
            f" no further for {timeout:g} s{problem}"
        )
    return (
        f"nothing moved for {timeout:g} s ({formatBytes(headway.furthest)} of {formatBytes(total)}"
        f" handed over): is the cache at {watch.where} stalled?{problem}"
    )


@defer.inlineCallbacks
def push(reactor: Any, options: PushOptions, out: Any, barStream: Any = None) -> Any:
    """
    Push the dump, writing what happens to C{out} and, if C{barStream} is
    given, a progress bar to it.
    """
    from twisted_criu.daemons.proxysession import ProxySession
    from twisted_criu.flow.compress import LinkCompression, parseMode
    from twisted_criu.progress import Activity
    from twisted_criu.storage.files import FileImage
    from twisted_criu.twistd.options import cacheEndpoint, linkRateLimit

    directory = options["directory"]
    names = imageFiles(directory)
    if not names:
        raise CommandError(f"no *.img files in {directory} (DIR: the directory criu dump -D wrote)")
    rateLimit = linkRateLimit(reactor, options)
    cache, retryPolicy, description = cacheEndpoint(reactor, options, 5.0, rateLimit)
    security = "plain" if options["plain-link"] else "tls" if options["tls"] else "key"
    delivered: Deferred[Any] = Deferred()

    def fail(why: str) -> None:
        if not delivered.called:
            delivered.errback(CommandError(why))

    watch = WatchedEndpoint(
        reactor, cache, clientFromString(reactor, options["connect"]), options["connect"], security, fail
    )
    activity = Activity(reactor, interval=10.0)
    activity.linkLimit = rateLimit
    compression = LinkCompression(parseMode(options["compress"]), reactor)
    session = ProxySession(
        reactor, watch, retryPolicy, options["timeout"], options["checksum"], "push", activity,
        compression=compression,
    )
    session.onDelivered = delivered.callback
    session.onAborted = lambda why, dumping: fail(f"the push was aborted: {why}")
    watch.ending = lambda: session.over or delivered.called
    snapshotId = options["snapshot-id"] or ""
    registry = session.registry
    if options["snapshot-id"] is not None:
        from twisted_criu.storage.memory import MemoryStore

        writer = MemoryStore().newWriter()
        writer.write(wire.encodeSnapshotId(snapshotId))
        registry.publish(("", wire.PARENT_IMAGE), writer.commit())
    for name in names:
        registry.publish((snapshotId, name), FileImage(os.path.join(directory, name)))
    registry.close()
    total = registry.totalBytes
    limited = "" if rateLimit is None else f" at most {describeRate(rateLimit.rate)} (--rate-limit)"
    out.write(f"pushing {len(names)} images ({formatBytes(total)}) from {directory} to {description}{limited}\n")
    out.flush()

    problems = _Problems(watch)
    globalLogPublisher.addObserver(problems)
    bar = ProgressBar(total, "push", barStream, barStream is not None and not options["no-progress"])
    headway = _Headway(session, reactor, options["timeout"])

    def expired() -> None:
        watch.settled().addCallback(lambda _: fail(_stalled(watch, headway, total, options["timeout"])))

    watchdog = Watchdog(reactor, options["timeout"], expired)

    def look() -> None:
        if headway.check():
            watchdog.moved()
        bar.update(headway.current)

    looking = task.LoopingCall(look)
    started = reactor.seconds()
    session.start()
    watchdog.start()
    looking.start(0.2)
    try:
        summary = yield delivered
        bar.update(total)
    except BaseException as e:
        outcome: Any = e
    else:
        outcome = None
    looking.stop()
    watchdog.stop()
    bar.close()
    watch.stopping = True
    globalLogPublisher.removeObserver(problems)
    try:
        yield session.stop()
    except Exception:
        pass  # the outcome is known; a link that fails to close changes nothing
    compression.stop()
    if outcome is not None:
        raise outcome
    seconds = reactor.seconds() - started
    confirmed = "sent (a C cache does not confirm)" if session.over else "confirmed by the cache"
    out.write(
        f"pushed {summary.images} images, {formatBytes(summary.bytes)} in {seconds:.2f} s; {confirmed}\n"
    )
