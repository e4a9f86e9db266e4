"""Tests for the twistd plugins' options and service construction."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import socketDirectory
from twisted_criu.criu.images import ReadVariant
from twisted_criu.daemons.cache import ImageCacheService
from twisted_criu.daemons.proxy import ImageProxyService
from twisted_criu.twistd import cache_tap, proxy_tap


class ProxyOptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        directory = socketDirectory(self)
        options = proxy_tap.Options()
        options.parseOptions(["-D", directory])
        path = os.path.abspath(directory)
        self.assertEqual(options["local"], f"unix:{path}/img-proxy.sock:mode=600")
        self.assertEqual(options["connect"], "tcp:host=localhost:port=9996")
        self.assertIs(options["read-variant"], ReadVariant.AUTO)
        self.assertFalse(options["once"])

    def test_criuSpellings(self) -> None:
        directory = socketDirectory(self)
        options = proxy_tap.Options()
        options.parseOptions(["--images-dir", directory, "--address", "dst", "--port", "1234", "--once"])
        self.assertEqual(options["connect"], "tcp:host=dst:port=1234")
        self.assertTrue(options["once"])

    def test_endpointOverrides(self) -> None:
        options = proxy_tap.Options()
        options.parseOptions(
            ["--local", "unix:/tmp/criu-img-path.sock:mode=600", "--connect", "tcp:host=h:port=1"]
        )
        self.assertEqual(options["local"], "unix:/tmp/criu-img-path.sock:mode=600")
        self.assertEqual(options["connect"], "tcp:host=h:port=1")

    def test_missingDirectory(self) -> None:
        with self.assertRaises(usage.UsageError) as e:
            proxy_tap.Options().parseOptions(["-D", "/nonexistent/dir"])
        self.assertIn("does not exist", str(e.exception))

    def test_socketPathTooLong(self) -> None:
        """A -D too deep for a UNIX socket is refused up front, naming the way out."""
        directory = os.path.join(self.mktemp(), "d" * 120)
        os.makedirs(directory)
        with self.assertRaises(usage.UsageError) as e:
            proxy_tap.Options().parseOptions(["-D", directory])
        self.assertIn("longer than a UNIX socket allows", str(e.exception))
        self.assertIn("--local", str(e.exception))
        options = proxy_tap.Options()
        options.parseOptions(
            ["-D", directory, "--local", "unix:/tmp/x.sock", "--stream-local", "none", "--control", "none"]
        )
        self.assertEqual(options["local"], "unix:/tmp/x.sock")

    def test_badPort(self) -> None:
        self.assertRaises(usage.UsageError, proxy_tap.Options().parseOptions, ["--port", "70000"])
        self.assertRaises(usage.UsageError, proxy_tap.Options().parseOptions, ["--port", "x"])

    def test_badVariant(self) -> None:
        with self.assertRaises(usage.UsageError) as e:
            proxy_tap.Options().parseOptions(["--read-variant", "carrier-pigeon"])
        self.assertIn("auto, pipe, inline", str(e.exception))

    def test_pathIsQuoted(self) -> None:
        """A -D with colons still makes a valid endpoint string."""
        directory = os.path.join(socketDirectory(self), "a:b")
        os.makedirs(directory)
        options = proxy_tap.Options()
        options.parseOptions(["-D", directory])
        self.assertIn("a\\:b/img-proxy.sock", options["local"])

    def test_makeService(self) -> None:
        directory = socketDirectory(self)
        options = proxy_tap.Options()
        options.parseOptions(["-D", directory, "--read-variant", "pipe"])
        service = proxy_tap.makeService(options)
        self.assertIsInstance(service, ImageProxyService)
        self.assertIs(service.readVariant, ReadVariant.PIPE)  # type: ignore[attr-defined]


class CacheOptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        directory = socketDirectory(self)
        options = cache_tap.Options()
        options.parseOptions(["-D", directory])
        path = os.path.abspath(directory)
        self.assertEqual(options["local"], f"unix:{path}/img-cache.sock:mode=600")
        self.assertEqual(options["listen"], "tcp:9996:interface=127.0.0.1")

    def test_address(self) -> None:
        options = cache_tap.Options()
        options.parseOptions(["--local", "unix:x", "--address", "0.0.0.0", "--port", "7"])
        self.assertEqual(options["listen"], "tcp:7:interface=0.0.0.0")

    def test_listenOverride(self) -> None:
        options = cache_tap.Options()
        options.parseOptions(["--local", "unix:x", "--listen", "tcp6:9996:interface=\\:\\:1"])
        self.assertEqual(options["listen"], "tcp6:9996:interface=\\:\\:1")

    def test_makeService(self) -> None:
        options = cache_tap.Options()
        options.parseOptions(["--local", "unix:x", "--once"])
        self.assertIsInstance(cache_tap.makeService(options), ImageCacheService)

    def test_resumeGrace(self) -> None:
        """--resume-grace: 60 s by default; durations; 0 keeps nothing."""
        for argv, seconds in (([], 60.0), (["--resume-grace", "5m"], 300.0), (["--resume-grace", "0"], 0.0)):
            options = cache_tap.Options()
            options.parseOptions(["--local", "unix:x", *argv])
            service = cache_tap.makeService(options)
            assert isinstance(service, ImageCacheService)
            self.assertEqual(service.partials.grace, seconds, argv)
        self.assertRaises(usage.UsageError, cache_tap.Options().parseOptions, ["--local", "unix:x", "--resume-grace", "soon"])


class OperationsOptionsTests(SynchronousTestCase):
    """The options both daemons share for operators."""

    def parse(self, *argv: str, tap: ModuleType = cache_tap) -> Any:
        """C{tap.Options} parsed from C{argv}: C{cache_tap}'s or C{proxy_tap}'s."""
        directory = socketDirectory(self)
        options = tap.Options()
        options.parseOptions(["-D", directory, *argv])
        return options

    def test_defaults(self) -> None:
        options = self.parse()
        path = options["images-dir"]
        self.assertEqual(options["control"], f"unix:{path}/cache-control.sock:mode=600")
        proxy = self.parse(tap=proxy_tap)
        self.assertEqual(
            proxy["control"], f"unix:{proxy['images-dir']}/proxy-control.sock:mode=600"
        )
        self.assertEqual(
            (options["metrics"], options["status-fd"], options["pidfile"], options["log-json"]),
            (None, None, None, None),
        )
        self.assertFalse(options["keep"])
        self.assertFalse(proxy["checksum"])
        self.assertEqual(options["progress-interval"], 10.0)

    def test_socketMode(self) -> None:
        options = self.parse("--socket-mode", "0660")
        for option in ("local", "stream-local", "control"):
            self.assertTrue(options[option].endswith(":mode=660"), options[option])
        for bad in ("666", "rw", "1777"):
            with self.assertRaises(usage.UsageError, msg=bad):
                self.parse("--socket-mode", bad)

    def test_controlOff(self) -> None:
        self.assertIsNone(self.parse("--control", "none")["control"])

    def test_flags(self) -> None:
        options = self.parse(
            "--keep", "--metrics", "tcp:9101:interface=127.0.0.1", "--status-fd", "5",
            "--pidfile", "/run/x.pid", "--log-json", "-", "--progress-interval", "0",
        )
        self.assertTrue(options["keep"])
        self.assertEqual(options["status-fd"], 5)
        self.assertEqual(options["progress-interval"], 0.0)
        self.assertTrue(self.parse("--checksum", tap=proxy_tap)["checksum"])
        with self.assertRaises(usage.UsageError):
            self.parse("--status-fd", "-1")
        with self.assertRaises(usage.UsageError):
            self.parse("--progress-interval", "-1")

    def test_servicesGetThem(self) -> None:
        options = self.parse("--keep", "--progress-interval", "3", "--metrics", "tcp:0")
        service = cache_tap.makeService(options)
        self.assertTrue(service.keep)  # type: ignore[attr-defined]
        self.assertEqual(service.activity.interval, 3.0)  # type: ignore[attr-defined]
        names = sorted(type(child).__name__ for child in service)  # type: ignore[attr-defined]
        self.assertIn("MetricsService", names)
        self.assertIn("_ReadinessService", names)
        proxy = proxy_tap.makeService(self.parse("--checksum", "--control", "none", tap=proxy_tap))
        self.assertTrue(proxy.checksum)  # type: ignore[attr-defined]
