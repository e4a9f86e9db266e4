# -*- test-case-name: tests.test_storage -*-
"""Direct I/O to spill files: aligned staging buffers written by background threads."""

from __future__ import annotations

import mmap
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

from twisted.internet.defer import Deferred

_T = TypeVar("_T")


#: Direct I/O alignment of buffers, offsets and lengths (a page covers every
#: logical block size Linux filesystems use).
BLOCK = mmap.PAGESIZE

#: Bytes staged between direct writes to a spill file, or read at once.
STAGE_SIZE = 1 << 20


def _writeAll(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _roundUp(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


#: What holds a segment's bytes (see L{_Segment.kind}).
MEMORY, DISK, HELD = 0, 1, 2


class _Segment:
    """
    A run of an image's bytes in one file: a memfd (memory), a spill file,
    or a pipe holding them as criu handed them over (a hold, see
    L{heldpipes<twisted_criu.storage.spill.heldpipes>}; its write end open
    until it is sealed).
    """

    def __init__(self, fd: int, path: str | None, writeFd: int | None = None) -> None:
        self.fd = fd
        self.path = path  # None for a memfd or a hold
        self.size = 0
        self.held = writeFd is not None
        self.writeFd = -1 if writeFd is None else writeFd

    @property
    def onDisk(self) -> bool:
        return self.path is not None

    @property
    def kind(self) -> int:
        return DISK if self.path is not None else HELD if self.held else MEMORY

    @property
    def filling(self) -> bool:
        """Is this a hold that takes more bytes (not sealed yet)?"""
        return self.writeFd >= 0

    def seal(self) -> None:
        """A hold takes no more bytes (its readers may copy it now)."""
        writeFd, self.writeFd = self.writeFd, -1
        if writeFd >= 0:
            os.close(writeFd)


def _pwriteAll(fd: int, data: mmap.mmap | memoryview, offset: int) -> None:
    written = os.pwrite(fd, data, offset)
    if written < len(data):
        view = memoryview(data)
        while written < len(view):
            written += os.pwrite(fd, view[written:], offset + written)
        view.release()


def _closeBuffers(buffers: list[mmap.mmap]) -> None:
    for buffer in buffers:
        try:
            buffer.close()
        except BufferError:  # a view is still referenced: the GC unmaps it
            pass


class _DiskIO:
    """
    Runs spill-file reads and writes on a few threads (the calls release
    the GIL), so the reactor fills or drains one buffer while the disk
    works on another.  After L{shutdown}, calls run inline.

    @ivar callFromThread: runs a callable in the reactor thread (as
        L{IReactorFromThreads.callFromThread
        <twisted.internet.interfaces.IReactorFromThreads.callFromThread>}
        does), or L{None} without a reactor: then nothing is told when a
        write ends, and a writer that falls behind waits for its disk
        instead.
    """

    def __init__(self, callFromThread: Callable[[Callable[[], None]], None] | None = None) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self.callFromThread = callFromThread

    def submit(self, call: Callable[..., _T], *args: object) -> Future[_T]:
        if not self._closed:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(4, thread_name_prefix="twisted-criu-spill")
            try:
                return self._pool.submit(call, *args)
            except RuntimeError:  # shut down meanwhile
                pass
        done: Future[_T] = Future()
        try:
            done.set_result(call(*args))
        except BaseException as e:
            done.set_exception(e)
        return done

    def shutdown(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


class _StagedFile:
    """
    Appends to a spill file in whole aligned blocks: bytes gather in a
    page-aligned buffer, and each full one goes at once to the store's I/O
    threads, written at its own offset while the reactor fills the next.
    The reactor never waits for the disk unless L{MAX_QUEUED} buffers are
    in flight (a caller ignoring L{whenCaughtUp}, or no reactor to tell).
    L{finish} writes the padded last block and cuts the file to its true
    size.
    """

    #: Buffers in flight from which on the file is behind: its feeder
    #: should pause...
    BEHIND = 4

    #: ...until no more than this many are left.
    CAUGHT_UP = 1

    #: Buffers in flight at most; one more makes the reactor wait.
    MAX_QUEUED = 8

    def __init__(self, segment: _Segment, io: _DiskIO, written: Callable[[], None]) -> None:
        self._segment = segment
        self._io = io
        self._written = written
        self._free: list[mmap.mmap] = []
        self._buffer: mmap.mmap | None = mmap.mmap(-1, STAGE_SIZE)
        self._view = memoryview(self._buffer)
        self._filled = 0
        #: Full buffers in file order, each with its write.
        self._queued: deque[tuple[mmap.mmap, Future[None]]] = deque()
        self._submitted = 0  # bytes handed to the I/O threads (whole buffers)
        self._durable = 0  # bytes written, from the start of the file
        self._failure: OSError | None = None
        self._caughtUp: Deferred[None] | None = None

    def append(self, data: memoryview) -> None:
        self._raiseFailure()
        while data:
            n = min(len(data), STAGE_SIZE - self._filled)
            self._view[self._filled : self._filled + n] = data[:n]
            self._filled += n
            data = data[n:]
            if self._filled == STAGE_SIZE:
                self._flush()

    def readFrom(self, fd: int, count: int) -> int:
        """Read up to C{count} bytes from C{fd} (a pipe) into the file."""
        self._raiseFailure()
        room = min(count, STAGE_SIZE - self._filled)
        n = os.readv(fd, [self._view[self._filled : self._filled + room]])
        self._filled += n
        if self._filled == STAGE_SIZE:
            self._flush()
        return n

    @property
    def durable(self) -> int:
        """Bytes from the start of the file already written (whole buffers)."""
        self._reap()
        return self._durable

    def whenCaughtUp(self) -> Deferred[None] | None:
        """L{None} if the disk keeps up; else fires once it has caught up."""
        self._reap()
        if self._caughtUp is None and (len(self._queued) < self.BEHIND or self._io.callFromThread is None):
            return None
        if self._caughtUp is None:
            self._caughtUp = Deferred()
        return self._caughtUp

    def _raiseFailure(self) -> None:
        self._reap()
        if self._failure is not None:
            raise self._failure

    def _reap(self) -> None:
        """Account for the writes that ended, in file order (in the reactor thread)."""
        queued = self._queued
        while queued and queued[0][1].done():
            buffer, writing = queued.popleft()
            self._free.append(buffer)
            failure = writing.exception()
            if failure is not None and self._failure is None:
                self._failure = failure if isinstance(failure, OSError) else OSError(str(failure))
            if self._failure is None:
                self._durable += STAGE_SIZE
        if self._caughtUp is not None and (len(queued) <= self.CAUGHT_UP or self._failure is not None):
            caughtUp, self._caughtUp = self._caughtUp, None
            caughtUp.callback(None)

    def _writeEnded(self) -> None:
        if self._buffer is None:  # closed meanwhile
            return
        self._reap()
        self._written()

    def _flush(self) -> None:
        """Send the full buffer to the I/O threads and fill another one."""
        buffer = self._buffer
        assert buffer is not None
        self._view.release()  # the thread gets the mmap itself: no view outlives the write
        writing = self._io.submit(_pwriteAll, self._segment.fd, buffer, self._submitted)
        self._queued.append((buffer, writing))
        self._submitted += STAGE_SIZE
        self._filled = 0
        callFromThread = self._io.callFromThread
        if callFromThread is not None:
            writing.add_done_callback(lambda _: callFromThread(self._writeEnded))
        while len(self._queued) >= self.MAX_QUEUED:
            self._queued[0][1].exception()  # wait for the disk (a failure is raised next)
            self._reap()
        self._buffer = self._free.pop() if self._free else mmap.mmap(-1, STAGE_SIZE)
        self._view = memoryview(self._buffer)

    def finish(self) -> None:
        """Write what is staged; the file then holds exactly the bytes given."""
        for _, writing in list(self._queued):
            writing.exception()
        self._raiseFailure()
        if self._filled:
            padded = _roundUp(self._filled)
            self._view[self._filled : padded] = bytes(padded - self._filled)
            _pwriteAll(self._segment.fd, self._view[:padded], self._submitted)
            self._durable = self._submitted + self._filled
            os.ftruncate(self._segment.fd, self._durable)
            self._filled = 0
        self.close()

    def close(self) -> None:
        """Release the buffers (after the writes in flight: the fd outlives them)."""
        for _, writing in self._queued:
            writing.exception()
        self._view.release()
        buffers = [*self._free, *(buffer for buffer, _ in self._queued)]
        if self._buffer is not None:
            buffers.append(self._buffer)
        self._free, self._buffer = [], None
        self._queued.clear()
        _closeBuffers(buffers)
        caughtUp, self._caughtUp = self._caughtUp, None
        if caughtUp is not None:
            caughtUp.callback(None)
