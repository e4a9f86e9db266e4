"""criu's pipes are enlarged to 1 MiB when they reach us (fewer round trips per byte)."""

from __future__ import annotations

import fcntl
import os

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu.flow import pipes

_F_GETPIPE_SZ = 1032


class _FakeReactor(Clock):
    """Enough of a reactor for a descriptor that is added and removed."""

    def addReader(self, reader: object) -> None: ...
    def removeReader(self, reader: object) -> None: ...
    def addWriter(self, writer: object) -> None: ...
    def removeWriter(self, writer: object) -> None: ...


class PipeSizeTests(SynchronousTestCase):
    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.assertEqual(fcntl.fcntl(r, _F_GETPIPE_SZ), 65536)
        return r, w

    def test_enlarge(self) -> None:
        r, w = self.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.assertEqual(pipes.enlargePipe(r), pipes.PIPE_SIZE)
        self.assertEqual(fcntl.fcntl(r, _F_GETPIPE_SZ), 1 << 20)
        self.assertEqual(pipes.enlargePipe(r, 1 << 16), 1 << 20)  # never shrunk

    def test_notAPipe(self) -> None:
        """Whatever the system refuses, the pipe is used as it is."""
        fd = os.open("/dev/null", os.O_RDONLY)
        self.addCleanup(os.close, fd)
        self.assertEqual(pipes.enlargePipe(fd), 0)

    def test_readerAndWriter(self) -> None:
        """Both ends we take from criu are enlarged: capture (reader) and restore (writer)."""
        reactor = _FakeReactor()
        ended: list[Failure] = []
        r, w = self.pipe()
        self.addCleanup(os.close, w)
        reader = pipes.PipeReader(reactor, r, lambda data: None, ended.append)  # type: ignore[arg-type]
        self.assertEqual(fcntl.fcntl(w, _F_GETPIPE_SZ), 1 << 20)
        reader.stopProducing()
        r2, w2 = self.pipe()
        self.addCleanup(os.close, r2)
        writer = pipes.PipeWriter(reactor, w2, ended.append)  # type: ignore[arg-type]
        self.assertEqual(fcntl.fcntl(r2, _F_GETPIPE_SZ), 1 << 20)
        writer.connectionLost(Failure(Exception("done")))

