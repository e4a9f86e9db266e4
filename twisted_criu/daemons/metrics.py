# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics of a daemon (C{--metrics ENDPOINT}), in the text format
of C{prometheus_client}: the daemon's counters are read at scrape time by
a custom collector, in the reactor thread.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.web import resource, server
from zope.interface import implementer

from twisted_criu import __version__
from twisted_criu.daemons.endpoints import listenWhileRunning
from twisted_criu.progress import Direction

#: Label values for L{Direction}.
_DIRECTIONS = {
    Direction.FROM_CRIU: "from_criu",
    Direction.TO_CACHE: "to_cache",
    Direction.FROM_PROXY: "from_proxy",
    Direction.TO_CRIU: "to_criu",
}


@implementer(ILogObserver)
class ErrorCounter:
    """Counts error-level log events of twisted-criu's own code."""

    def __init__(self) -> None:
        self.errors = 0

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        namespace = str(event.get("log_namespace", ""))
        if level is not None and level >= LogLevel.error and namespace.startswith("twisted_criu"):
            self.errors += 1


class DaemonCollector(Collector):
    """Reads a proxy's or a cache's state when Prometheus scrapes."""

    def __init__(self, daemon: Any, errors: ErrorCounter) -> None:
        self.daemon = daemon
        self.errorCounter = errors

    def collect(self) -> Iterator[Metric]:
        daemon = self.daemon
        activity = daemon.activity
        info = GaugeMetricFamily(
            "twisted_criu_info", "This daemon: its role and version.", labels=["role", "version"]
        )
        info.add_metric([daemon.role, __version__], 1)
        yield info

        images = CounterMetricFamily(
            "twisted_criu_images", "Images moved, by direction.", labels=["direction"]
        )
        data = CounterMetricFamily(
            "twisted_criu_image_bytes", "Image bytes moved, by direction.", labels=["direction"]
        )
        abandoned = CounterMetricFamily(
            "twisted_criu_images_abandoned",
            "Images whose transfer broke off (never served as complete), by direction.",
            labels=["direction"],
        )
        active = GaugeMetricFamily(
            "twisted_criu_transfers_active", "Images moving now, by direction.", labels=["direction"]
        )
        moving = {d: 0 for d in _DIRECTIONS}
        for transfer in activity.active:
            moving[transfer.direction] += 1
        for direction, label in _DIRECTIONS.items():
            images.add_metric([label], activity.images[direction])
            data.add_metric([label], activity.bytes[direction])
            abandoned.add_metric([label], activity.abandoned[direction])
            active.add_metric([label], moving[direction])
        yield from (images, data, abandoned, active)
        linkRaw = CounterMetricFamily(
            "twisted_criu_link_raw_bytes",
            "Image bytes that crossed the link, before compression, by direction.",
            labels=["direction"],
        )
        linkWire = CounterMetricFamily(
            "twisted_criu_link_wire_bytes",
            "Bytes those images took on the link (compressed or raw chunks), by direction.",
            labels=["direction"],
        )
        for direction in (Direction.TO_CACHE, Direction.FROM_PROXY):
            linkRaw.add_metric([_DIRECTIONS[direction]], activity.linkRawBytes[direction])
            linkWire.add_metric([_DIRECTIONS[direction]], activity.wireBytes[direction])
        yield from (linkRaw, linkWire)
        yield GaugeMetricFamily(
            "twisted_criu_bytes_in_flight",
            "Bytes of the images moving now that have moved so far.",
            value=activity.bytesInFlight,
        )
        yield CounterMetricFamily(
            "twisted_criu_read_waits",
            "Reads that had to wait for their image to arrive.",
            value=activity.waitedReads,
        )
        yield CounterMetricFamily(
            "twisted_criu_not_found",
            "Reads answered ENOENT (criu asks for many images that never exist).",
            value=activity.notFound,
        )
        yield CounterMetricFamily(
            "twisted_criu_errors",
            "Errors logged by twisted-criu (bad input, lost links, store failures).",
            value=self.errorCounter.errors,
        )
        yield CounterMetricFamily(
            "twisted_criu_sessions_completed",
            "Migrations completed (proxy: dumps delivered; cache: restores finished).",
            value=daemon.sessionsCompleted,
        )

        sessions = daemon.listSessions()
        counts = GaugeMetricFamily(
            "twisted_criu_sessions", "Sessions held, current or kept.", labels=["state"]
        )
        counts.add_metric(["current"], sum(1 for s in sessions if s.current))
        counts.add_metric(["kept"], sum(1 for s in sessions if s.kept))
        yield counts
        yield GaugeMetricFamily(
            "twisted_criu_stored_bytes",
            "Bytes of the complete images held.",
            value=sum(s.bytes for s in sessions),
        )
        yield GaugeMetricFamily(
            "twisted_criu_reads_waiting",
            "Reads waiting now for an image to arrive.",
            value=daemon.readsWaiting,
        )
        link = daemon.linkView()
        if link is not None:
            yield GaugeMetricFamily(
                "twisted_criu_link_rate_limit_bytes_per_second",
                "The link's --rate-limit.",
                value=link.rateLimit,
            )
            yield GaugeMetricFamily(
                "twisted_criu_link_rate_bytes_per_second",
                "Bytes per second the link's sockets took over the last few seconds (after TLS).",
                value=link.achievedRate,
            )
            yield CounterMetricFamily(
                "twisted_criu_link_sent_bytes",
                "Bytes the link's sockets took under the rate limit (after TLS).",
                value=link.sentBytes,
            )
        store = daemon.storeView()
        for name, value, text in (
            ("memory_bytes", store.memoryBytes, "Image bytes the store holds in memory."),
            ("spill_bytes", store.spilledBytes, "Image bytes the store has spilled to disk."),
            ("memory_limit_bytes", store.memoryLimit, "The store's memory budget (--memory-limit)."),
        ):
            if value is not None:
                yield GaugeMetricFamily(f"twisted_criu_{name}", text, value=value)


class MetricsResource(resource.Resource):
    """The Prometheus text format, rendered in the reactor thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class MetricsService(MultiService):
    """
    Serves a daemon's metrics on C{endpoint} (C{/metrics}, or C{/}) while
    it runs, counting twisted-criu's error log events meanwhile.
    """

    def __init__(self, daemon: Any, endpoint: IStreamServerEndpoint) -> None:
        super().__init__()
        self.errors = ErrorCounter()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(daemon, self.errors))
        self.endpoint = listenWhileRunning(self, endpoint, self.site())

    def startService(self) -> None:
        globalLogPublisher.addObserver(self.errors)
        super().startService()

    def stopService(self) -> Deferred[None]:
        globalLogPublisher.removeObserver(self.errors)
        d: Deferred[None] = super().stopService()
        return d

    def site(self) -> server.Site:
        root = resource.Resource()
        root.putChild(b"metrics", MetricsResource(self.registry))
        root.putChild(b"", MetricsResource(self.registry))
        site = server.Site(root)
        site.noisy = False
        return site
