"""The Prometheus endpoint (C{--metrics}), scraped after a real migration."""

from __future__ import annotations

import os
import socket
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.web.client import Agent, readBody

from twisted_criu.daemons.endpoints import ObservedServerEndpoint
from twisted_criu.daemons.metrics import MetricsService

from .helpers import MigrationCase, inThread, waitFor


class MetricsTests(MigrationCase):
    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        yield super().setUp()
        assert self.m.cache and self.m.proxy
        self.endpoints = {}
        for name, daemon in (("cache", self.m.cache), ("proxy", self.m.proxy)):
            endpoint = ObservedServerEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
            service = MetricsService(daemon, endpoint)
            service.startService()
            self.addCleanup(service.stopService)
            port = yield endpoint.whenListening()
            self.endpoints[name] = port.getHost().port

    @inlineCallbacks
    def scrape(self, daemon: str) -> Any:
        response = yield Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{self.endpoints[daemon]}/metrics".encode()
        )
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=")
        )
        text = (yield readBody(response)).decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    @inlineCallbacks
    def test_migrationCounted(self) -> Any:
        m = self.m
        assert m.cache and m.proxy
        pages = os.urandom(3 << 20)
        delivered = m.proxy.whenSessionDone()

        def dump() -> None:
            m.dump.pushSnapshotId("snap1")
            m.dump.write("snap1", "pages-1.img", pages)
            m.dump.write("snap1", "core-1.img", b"core")
            m.dump.finishDump()

        yield inThread(dump)
        yield delivered
        proxy = yield self.scrape("proxy")
        self.assertEqual(proxy['twisted_criu_info{role=proxy,version=0.1.0}'], 1)
        self.assertEqual(proxy["twisted_criu_images_total{direction=from_criu}"], 3)
        self.assertEqual(proxy["twisted_criu_images_total{direction=to_cache}"], 3)
        self.assertEqual(proxy["twisted_criu_image_bytes_total{direction=to_cache}"], len(pages) + 4 + 11)
        self.assertEqual(proxy["twisted_criu_sessions_completed_total"], 1)
        self.assertEqual(proxy["twisted_criu_stored_bytes"], len(pages) + 4 + 11)

        def restore() -> None:
            m.restore.read("snap1", "pages-1.img")
            m.restore.read("snap1", "memfd.img")  # ENOENT
            m.restore.finishRestore()

        cacheDone = m.cache.whenSessionDone()
        yield inThread(restore)
        yield cacheDone
        cache = yield self.scrape("cache")
        self.assertEqual(cache["twisted_criu_images_total{direction=from_proxy}"], 3)
        self.assertEqual(cache["twisted_criu_images_total{direction=to_criu}"], 1)
        self.assertEqual(cache["twisted_criu_image_bytes_total{direction=to_criu}"], len(pages))
        self.assertEqual(cache["twisted_criu_not_found_total"], 1)
        self.assertEqual(cache["twisted_criu_sessions_completed_total"], 1)
        self.assertEqual(cache["twisted_criu_stored_bytes"], 0)  # dropped when the restore ended
        self.assertEqual(cache["twisted_criu_memory_bytes"], 0)
        self.assertEqual(cache["twisted_criu_errors_total"], 0)

    @inlineCallbacks
    def test_errorsAndWaitsCounted(self) -> Any:
        m = self.m
        assert m.cache

        def hostile() -> bytes:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(m.restore.path)
                s.sendall(b"\xff\xff\xff\xff")  # a 4 GiB request frame
                return s.recv(10)

        self.assertEqual((yield inThread(hostile)), b"")
        yield inThread(m.dump.write, "snap1", "late.img", b"late")
        read = inThread(m.restore.read, "snap1", "late.img")

        yield waitFor(lambda: m.cache.readsWaiting == 1)  # type: ignore[union-attr]
        cache = yield self.scrape("cache")
        self.assertEqual(cache["twisted_criu_reads_waiting"], 1)
        self.assertEqual(cache["twisted_criu_read_waits_total"], 1)
        self.assertEqual(cache["twisted_criu_errors_total"], 1)
        yield inThread(m.dump.finishDump)
        self.assertEqual((yield read), b"late")
