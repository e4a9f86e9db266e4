"""Tests for the twistd plugins' options and service construction."""

from __future__ import annotations

import os

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import cache_tap, proxy_tap
from twisted_criu.cache import ImageCacheService
from twisted_criu.proxy import ImageProxyService
from twisted_criu.variants import ReadVariant


class ProxyOptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        options = proxy_tap.Options()
        options.parseOptions(["-D", directory])
        path = os.path.abspath(directory)
        self.assertEqual(options["local"], f"unix:{path}/img-proxy.sock:mode=600")
        self.assertEqual(options["connect"], "tcp:host=localhost:port=9996")
        self.assertIs(options["read-variant"], ReadVariant.AUTO)
        self.assertFalse(options["once"])

    def test_criuSpellings(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
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

    def test_badPort(self) -> None:
        self.assertRaises(usage.UsageError, proxy_tap.Options().parseOptions, ["--port", "70000"])
        self.assertRaises(usage.UsageError, proxy_tap.Options().parseOptions, ["--port", "x"])

    def test_badVariant(self) -> None:
        with self.assertRaises(usage.UsageError) as e:
            proxy_tap.Options().parseOptions(["--read-variant", "carrier-pigeon"])
        self.assertIn("auto, pipe, inline", str(e.exception))

    def test_pathIsQuoted(self) -> None:
        """A -D with colons still makes a valid endpoint string."""
        directory = os.path.join(self.mktemp(), "a:b")
        os.makedirs(directory)
        options = proxy_tap.Options()
        options.parseOptions(["-D", directory])
        self.assertIn("a\\:b/img-proxy.sock", options["local"])

    def test_makeService(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        options = proxy_tap.Options()
        options.parseOptions(["-D", directory, "--read-variant", "pipe"])
        service = proxy_tap.makeService(options)
        self.assertIsInstance(service, ImageProxyService)
        self.assertIs(service.readVariant, ReadVariant.PIPE)  # type: ignore[attr-defined]


class CacheOptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
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
