"""
Compression end to end: a proxy and a cache on loopback (real sockets,
real compressing threads), per C{--compress} mode, restoring byte-exact.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import inlineCallbacks

from twisted_criu.flow.compress import Mode
from twisted_criu.progress import Direction

from .helpers import MigrationCase, inThread

TEXT = b"".join(b"user:%07d,state=active,cart=[item-%d],token=%s\n" % (i, i % 7, os.urandom(4).hex().encode()) for i in range(120000))


class NoneTests(MigrationCase):
    """C{--compress none}: images as they were; the counters still count them."""

    mode = Mode.NONE

    def proxyArgs(self) -> dict[str, Any]:
        return {"compress": self.mode}

    @inlineCallbacks
    def test_restoresByteExact(self) -> Any:
        m = self.m
        assert m.cache and m.proxy
        proxyDone = m.proxy.whenSessionDone()
        images = {"pages-1.img": TEXT, "noise.img": os.urandom(3 << 20), "core-1.img": b"core", "empty.img": b""}

        def dump() -> None:
            m.dump.pushSnapshotId("snap1")
            m.dump.snapshotIds()
            for name, data in images.items():
                m.dump.write("snap1", name, data)
            m.dump.finishDump()

        yield inThread(dump)
        yield proxyDone

        def restore() -> dict[str, Any]:
            got = {name: m.restore.read("snap1", name) for name in images}
            m.restore.finishRestore()
            return got

        got = yield inThread(restore)
        self.assertEqual(got, images)
        sent = m.proxy.activity
        received = m.cache.activity
        raw = sent.linkRawBytes[Direction.TO_CACHE]
        onWire = sent.wireBytes[Direction.TO_CACHE]
        self.assertEqual(raw, received.linkRawBytes[Direction.FROM_PROXY])
        self.assertEqual(onWire, received.wireBytes[Direction.FROM_PROXY])
        self.assertGreaterEqual(raw, sum(map(len, images.values())))
        self.check(raw, onWire)

    def check(self, raw: int, onWire: int) -> None:
        self.assertEqual(onWire, raw)


class ZstdTests(NoneTests):
    mode = Mode.ZSTD

    def check(self, raw: int, onWire: int) -> None:
        # The text shrinks (to well under half), the noise does not.
        self.assertLess(onWire, raw - len(TEXT) // 2)


class AutoTests(NoneTests):
    mode = Mode.AUTO

    def check(self, raw: int, onWire: int) -> None:
        # Whatever it chose, never more than a few chunk words over the raw bytes.
        self.assertLessEqual(onWire, raw)
