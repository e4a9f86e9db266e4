"""
What an operator sees of spilling past C{--memory-limit}: the log says when
it starts and when it stops (once each, not per image), and the control
API's listing (C{twisted-criu ls}) and the metrics say how many bytes are
in memory and how many on disk.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import socketDirectory
from tests.test_control import _NoSessions
from twisted_criu.daemons.control import controlSite
from twisted_criu.daemons.metrics import DaemonCollector, ErrorCounter
from twisted_criu.daemons.sessions import viewOf
from twisted_criu.interfaces import IStoredImage
from twisted_criu.keys import ImageKey
from twisted_criu.storage.spill import SpillStore
from twisted_criu.twistd import cache_tap
from twisted_criu.views import StoreView


def stored(store: SpillStore, size: int) -> IStoredImage:
    writer = store.newWriter()
    writer.write(b"x" * size)
    return writer.commit()


class SpillLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.store = SpillStore(100, self.mktemp())
        self.addCleanup(self.store.close)

    def spillEvents(self) -> list[dict[str, Any]]:
        return [e for e in self.events if "spilling" in e.get("log_format", "")]

    def test_startsAndStopsOnce(self) -> None:
        """One line when the first byte spills, one when the last spilled image goes."""
        inMemory = stored(self.store, 60)
        self.assertEqual(self.spillEvents(), [])
        first = stored(self.store, 200)
        second = stored(self.store, 300)
        [start] = self.spillEvents()
        self.assertTrue(start["log_format"].startswith("spilling to disk past --memory-limit"))
        self.assertEqual((start["inMemory"], start["memoryLimit"]), (60, 100))
        self.assertEqual(start["path"], self.store.directory)
        first.release()
        self.assertEqual(len(self.spillEvents()), 1)  # the second is still on disk
        second.release()
        [_, stop] = self.spillEvents()
        self.assertTrue(stop["log_format"].startswith("stopped spilling:"))
        self.assertEqual((stop["peakOnDisk"], stop["inMemory"]), (500, 60))
        stored(self.store, 200)
        self.assertEqual(len(self.spillEvents()), 3)  # spilling again
        self.assertEqual(self.spillEvents()[2]["log_format"], start["log_format"])
        inMemory.release()

    def test_abortedSpillStops(self) -> None:
        writer = self.store.newWriter()
        writer.write(b"x" * 500)
        writer.abort()
        self.assertEqual(
            [e["log_format"].split(":")[0] for e in self.spillEvents()],
            ["spilling to disk past --memory-limit {limit} ({memory} in memory)", "stopped spilling"],
        )


class _Registry:
    def __init__(self, images: dict[ImageKey, IStoredImage]) -> None:
        self.images = images

    def keys(self) -> list[ImageKey]:
        return list(self.images)

    def get(self, key: ImageKey) -> IStoredImage | None:
        return self.images.get(key)

    def snapshotIds(self) -> list[str]:
        return sorted({key[0] for key in self.images})


class _Session:
    id = "1"
    started = 0.0

    def __init__(self, registry: _Registry) -> None:
        self.registry = registry


class ListingTests(SynchronousTestCase):
    """The control API's listing, which C{twisted-criu ls} shows."""

    def test_sessionSpilledBytes(self) -> None:
        store = SpillStore(100, self.mktemp())
        self.addCleanup(store.close)
        images: dict[ImageKey, IStoredImage] = {
            ("s", "small.img"): stored(store, 50),
            ("s", "pages-1.img"): stored(store, 250),
        }
        view = viewOf(_Session(_Registry(images)), "delivered", current=True)  # type: ignore[arg-type]
        described = view.toJSON(withImages=True)
        self.assertEqual((described["bytes"], described["spilled_bytes"]), (300, 250))
        self.assertEqual(
            {i["name"]: i["spilled"] for i in described["images"]}, {"small.img": 0, "pages-1.img": 250}
        )

    def test_storeInListing(self) -> None:
        class Control(_NoSessions):
            def storeView(self) -> StoreView:
                return StoreView(10, 20, 100)

        protocol: Any = controlSite(Control(), timeout=5, reactor=Clock()).buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /sessions HTTP/1.1\r\nHost: x\r\n\r\n")
        body = json.loads(transport.value().split(b"\r\n\r\n", 1)[1])
        self.assertEqual(
            body["store"], {"memory_bytes": 10, "spilled_bytes": 20, "memory_limit_bytes": 100}
        )


class DaemonStoreTests(SynchronousTestCase):
    """A daemon built as twistd builds it reports its store in both places."""

    def test_storeViewAndMetrics(self) -> None:
        spill = self.mktemp()
        os.mkdir(spill)
        options = cache_tap.Options()
        options.parseOptions(
            ["-D", socketDirectory(self), "--memory-limit", "1K", "--spill-dir", spill, "--control", "none"]
        )
        daemon: Any = cache_tap.makeService(options)
        self.addCleanup(daemon.store.close)
        image = stored(daemon.store, 5000)
        self.addCleanup(image.release)
        view = daemon.storeView()
        self.assertEqual((view.memoryBytes, view.spilledBytes, view.memoryLimit), (0, 5000, 1024))
        samples = {
            sample.name: sample.value
            for family in DaemonCollector(daemon, ErrorCounter()).collect()
            for sample in family.samples
        }
        self.assertEqual(samples["twisted_criu_spill_bytes"], 5000)
        self.assertEqual(samples["twisted_criu_memory_bytes"], 0)
        self.assertEqual(samples["twisted_criu_memory_limit_bytes"], 1024)
