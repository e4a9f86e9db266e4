# -*- test-case-name: tests.test_compress -*-
"""
Compression on the link (link extension version 4): the C{--compress}
modes, the codec (zstd level -1: see docs/link.md for why not lz4), and
the proxy's compressing threads.
"""

from __future__ import annotations

import os
import threading
import time
from enum import Enum

import zstandard
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from twisted_criu import wire
from twisted_criu.flow.compresspolicy import CHUNK as CHUNK, CompressionPolicy
from twisted_criu.flow.sparecores import SpareCores

#: zstd's level: -1, the first of the fast levels: on redis's pages 1.35x the
#: speed of level 1 (310 against 230 MB/s a core here) at nearly its ratio
#: (2.38x against 2.45x); see docs/link.md.
LEVEL = -1
#: C{auto} sends smaller stored images as they are (a thread hop costs more).
SMALL_IMAGE = 1 << 16

assert CHUNK <= wire.MAX_CHUNK


class Mode(Enum):
    """C{--compress}: what a proxy does with the images it forwards."""

    AUTO = "auto"
    NONE = "none"
    ZSTD = "zstd"


def parseMode(text: str) -> Mode:
    """A C{--compress} value; L{ValueError} for an unknown one."""
    try:
        return Mode(text.strip().lower())
    except ValueError:
        names = "|".join(m.value for m in Mode)
        raise ValueError(f"--compress takes {names}, not {text!r}") from None


_local = threading.local()


def compressChunk(data: bytes) -> tuple[bytes, float]:
    """
    One zstd frame of C{data} (its size and a checksum written in the
    frame), and the seconds it took (wall clock: on a busy machine, what a
    thread really delivers).  Runs in any thread: zstd releases the GIL.
    """
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True)
    started = time.perf_counter()
    frame: bytes = compressor.compress(data)
    return frame, time.perf_counter() - started


def parallelCompressors(threads: int, cores: int) -> int:
    """
    How many of the C{threads} compress at once, as C{auto} counts them:
    one core stays with the reactor (criu's pipes, TLS, the link) and criu
    itself, so on 2 cores the two threads share one (measured: counting
    two, auto compressed where raw was faster, 10 Gbit/s and unshaped).
    """
    return max(1, min(threads, cores - 1))


class LinkCompression:
    """
    A proxy's compression: its mode, the policy that C{auto} follows
    (shared by all its links, so what it learned survives a reconnect),
    and the threads that compress, started and stopped with the proxy.
    """

    def __init__(self, mode: Mode, clock: IReactorTime, threads: int | None = None) -> None:
        self.mode = mode
        self.threads = threads if threads is not None else max(1, min(2, os.cpu_count() or 1))
        self.policy = CompressionPolicy(clock, parallelCompressors(self.threads, os.cpu_count() or 1), SpareCores())
        self._pool: ThreadPool | None = None
        self._reactor = clock

    @property
    def codec(self) -> wire.Codec:
        return wire.Codec.NONE if self.mode is Mode.NONE else wire.Codec.ZSTD

    def compressNext(self, ahead: bool = False) -> bool:
        """
        Compress the next chunk of an image that is being compressed?
        C{ahead}: criu has written several chunks more than it has sent.
        """
        return self.mode is Mode.ZSTD or self.policy.compressNext(ahead)

    def chunked(self, peerVersion: int, size: int | None) -> bool:
        """
        Send the next image (of C{size} bytes, L{None} while criu writes
        it) as compressed chunks to a cache of C{peerVersion}?
        """
        if self.mode is Mode.NONE or peerVersion < 4:
            return False
        if self.mode is Mode.ZSTD:
            return True
        return (size is None or size >= SMALL_IMAGE) and not self.policy.plainImage()

    def compress(self, data: bytes) -> Deferred[tuple[bytes, float]]:
        """Compress C{data} in one of the threads."""
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPool(1, self.threads, "twisted-criu-compress")
            pool.start()
            # However the proxy ends, its threads must not keep the process alive.
            trigger = getattr(self._reactor, "addSystemEventTrigger", None)
            if trigger is not None:
                trigger("during", "shutdown", self.stop)
        return deferToThreadPool(self._reactor, pool, compressChunk, data)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Stop the threads (after the compressions under way)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
