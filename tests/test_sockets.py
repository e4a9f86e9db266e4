"""Local socket safety: stale sockets are replaced, live ones are not stolen."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from twisted_criu.daemons.cache import ImageCacheService
from twisted_criu.testing.criu import LocalImageClient
from twisted_criu.twistd.options import unixEndpoint


class SocketSafetyTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tcs-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "img-cache.sock")

    def cache(self) -> ImageCacheService:
        service = ImageCacheService(
            reactor,
            serverFromString(reactor, unixEndpoint(self.path)),
            serverFromString(reactor, "tcp:0:interface=127.0.0.1"),
            restoreGrace=0,  # nothing to restore: ENOENT at once
        )
        return service

    @inlineCallbacks
    def test_staleSocketReplaced(self) -> Any:
        """A socket left by a dead daemon does not stop a new one."""
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.path)
        stale.close()  # the file stays, nobody listens
        os.symlink("999999999", self.path + ".lock")  # a dead daemon's lock
        service = self.cache()
        service.startService()
        self.addCleanup(service.stopService)
        yield service.localEndpoint.whenListening()
        client = LocalImageClient(self.path, timeout=5)
        self.assertIsNone((yield deferToThreadRead(client)))
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    @inlineCallbacks
    def test_liveSocketNotStolen(self) -> Any:
        first = self.cache()
        first.startService()
        self.addCleanup(first.stopService)
        yield first.localEndpoint.whenListening()
        second = self.cache()
        self.assertRaises(CannotListenError, second.startService)
        # the first daemon still answers on its socket
        client = LocalImageClient(self.path, timeout=5)
        self.assertIsNone((yield deferToThreadRead(client)))


def deferToThreadRead(client: LocalImageClient) -> Any:
    return deferToThread(client.read, "s", "missing.img")
