# -*- test-case-name: tests.test_chains -*-
"""C{twisted-criu push}: send an on-disk dump to a criu-cache, as a criu-proxy would."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.python import usage

from twisted_criu import wire
from twisted_criu.cli.common import AnyOrderOptions, CommandError
from twisted_criu.progress import formatBytes
from twisted_criu.twistd.options import LinkTLSOptions


class PushOptions(AnyOrderOptions, LinkTLSOptions):
    createsLinkKey = False  # push uses the cache host's key, copied here
    synopsis = "DIR (--address HOST [--port PORT] | --to ENDPOINT) [options]"
    description = (
        "Send the images of an on-disk dump (the *.img files that `criu dump -D DIR` "
        "wrote) to a criu-cache, as a criu-proxy would. Without --snapshot-id they "
        "are served to `criu restore --stream`; with it, to `criu restore --remote "
        "-D SNAPSHOT_ID`."
    )

    optParameters: list[list[Any]] = [
        ["address", "a", None, "Host of the criu-cache."],
        ["port", "p", 9996, "TCP port of the criu-cache.", int],
        ["to", None, None, "Client endpoint of the cache (instead of --address/--port)."],
        ["snapshot-id", None, None, "Push as this snapshot id (criu restore --remote -D SNAPSHOT_ID)."],
        ["timeout", None, 60.0, "Give up when nothing moved for this many seconds.", float],
    ]
    optFlags: list[list[Any]] = [
        ["checksum", None, "Send each image's SHA-256 (a twisted-criu cache checks it)."],
    ]

    def parseArgs(self, directory: str) -> None:  # type: ignore[override]
        self["directory"] = directory

    def postOptions(self) -> None:
        from twisted_criu.twistd.options import checkCacheEndpoint

        if (self["to"] is None) == (self["address"] is None):
            raise usage.UsageError("give --address HOST (and --port) or --to ENDPOINT")
        self["connect"] = self["to"] or f"tcp:host={self['address']}:port={self['port']}"
        if not os.path.isdir(self["directory"]):
            raise usage.UsageError(f"{self['directory']} is not a directory")
        self.loadTLS()
        checkCacheEndpoint(self)


def imageFiles(directory: str) -> list[str]:
    """The image files of a dump directory, in a stable order."""
    names = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".img") and os.path.isfile(path) and not os.path.islink(path):
            names.append(name)
    return names


@defer.inlineCallbacks
def push(reactor: Any, options: PushOptions, out: Any) -> Any:
    from twisted_criu.daemons.proxysession import ProxySession
    from twisted_criu.progress import Activity
    from twisted_criu.storage.files import FileImage
    from twisted_criu.twistd.options import cacheEndpoint

    directory = options["directory"]
    names = imageFiles(directory)
    if not names:
        raise CommandError(f"no *.img files in {directory}")
    cache, retryPolicy, description = cacheEndpoint(reactor, options, 5.0)
    activity = Activity(reactor, interval=10.0)
    session = ProxySession(
        reactor, cache, retryPolicy, options["timeout"], options["checksum"], "push", activity
    )
    delivered: Deferred[Any] = Deferred()
    session.onDelivered = delivered.callback
    snapshotId = options["snapshot-id"] or ""
    registry = session.registry
    session.start()
    activity.startReporting()
    if options["snapshot-id"] is not None:
        from twisted_criu.storage.memory import MemoryStore

        writer = MemoryStore().newWriter()
        writer.write(wire.encodeSnapshotId(snapshotId))
        registry.publish(("", wire.PARENT_IMAGE), writer.commit())
    total = 0
    for name in names:
        image = FileImage(os.path.join(directory, name))
        total += image.size
        registry.publish((snapshotId, name), image)
    registry.close()
    out.write(f"pushing {len(names)} images ({formatBytes(total)}) from {directory} to {description}\n")

    # Give up when nothing moves (the cache is unreachable, or stalled).
    lastMoved = [-1, reactor.seconds()]

    def watch() -> None:
        moved = sum(activity.bytes.values()) + activity.bytesInFlight + sum(activity.images.values())
        now = reactor.seconds()
        if moved != lastMoved[0]:
            lastMoved[:] = [moved, now]
        elif now - lastMoved[1] >= options["timeout"] and not delivered.called:
            delivered.errback(
                CommandError(f"nothing moved for {options['timeout']:g} s: is the cache at {description} up?")
            )

    watcher = task.LoopingCall(watch)
    watcher.start(1.0)
    started = reactor.seconds()
    try:
        summary = yield delivered
    finally:
        watcher.stop()
        activity.stopReporting()
        yield session.stop()
    seconds = reactor.seconds() - started
    confirmed = "sent (a C cache does not confirm)" if session.over else "confirmed by the cache"
    out.write(
        f"pushed {summary.images} images, {formatBytes(summary.bytes)} in {seconds:.2f} s; {confirmed}\n"
    )
