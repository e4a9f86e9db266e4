# -*- test-case-name: tests.test_storage -*-
"""
Memory up to a budget shared by all images, then files on disk.

Each image keeps its first bytes in memory while the daemon-wide budget
allows, in a memfd (kernel memory: no page faults in the daemon, and pipes
splice into it without a copy through Python); once a write would exceed
the budget, that image's remaining bytes go to a private file, written and
read with direct I/O (C{O_DIRECT}) through one aligned staging buffer per
open run: on a VM, the page cache costs two to three CPU-seconds per GB
while direct I/O costs a tenth of that.  Spill files live in a directory of their own (mode 0700,
files 0600, random names never derived from image names) under the spill
directory; it is removed when the store closes, and a directory left by a
crashed daemon is removed by the next store that starts there.
"""

from __future__ import annotations

import fcntl
import ipaddress
import mmap
import os
import secrets
import shutil
import socket
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from twisted_criu.errors import SourceBusy
from twisted_criu.interfaces import (
    IGrowableWriter,
    IGrowingImage,
    IImageReader,
    IImageStore,
    IImageWriter,
    IPacedWriter,
    IStoredImage,
)

_T = TypeVar("_T")

_PREFIX = "twisted-criu-spill-"
_LOCK = ".lock"


#: Direct I/O alignment of buffers, offsets and lengths (a page covers every
#: logical block size Linux filesystems use).
BLOCK = mmap.PAGESIZE

#: Bytes staged between direct writes to a spill file, or read at once.
STAGE_SIZE = 1 << 20

#: Bytes of a memfd mapped at a time to write them into a loopback TCP
#: socket (see L{writesFromMapping}).
SOCKET_WINDOW = 32 << 20


def _writeAll(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _roundUp(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def openSpillFile(directory: str) -> tuple[int, str]:
    """
    A new private file (0600, random name) in C{directory}, for direct I/O
    where the filesystem allows it.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    path = os.path.join(directory, f"{secrets.token_hex(8)}.img")
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600), path
    except OSError:  # EINVAL: no direct I/O here (older tmpfs, some FUSE)
        return os.open(path, flags, 0o600), path


def removeStaleSpillDirs(parent: str) -> list[str]:
    """
    Remove spill directories under C{parent} whose daemon is gone (nobody
    holds their lock); returns the paths removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if not name.startswith(_PREFIX) or not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            fd = os.open(os.path.join(path, _LOCK), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # not ours, or being created right now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live daemon holds it
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class _Segment:
    """A run of an image's bytes in one file: a memfd (memory) or a spill file."""

    def __init__(self, fd: int, path: str | None) -> None:
        self.fd = fd
        self.path = path  # None for a memfd
        self.size = 0

    @property
    def onDisk(self) -> bool:
        return self.path is not None


def writesFromMapping(fd: int) -> bool:
    """
    Whether memfd bytes go into C{fd} cheaper by C{write} from a mapping
    than by C{sendfile}: only into TCP to this host.  There, C{sendfile}'s
    one-page fragments cost the sender twice the CPU and the receiver 2.5
    times (both ends run on this host).  Into a pipe or a UNIX socket
    C{sendfile} is as cheap or cheaper, and to a remote host it spares
    the sender a copy (the NIC reads the pages).
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # not a socket
        return False
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return False
        address = ipaddress.ip_address(sock.getpeername()[0])
    except (OSError, ValueError):
        return False
    finally:
        sock.detach()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _preadInto(fd: int, buffer: mmap.mmap, offset: int) -> int:
    """Fill C{buffer} from C{fd} at C{offset} (fewer bytes at the end of the file)."""
    return os.preadv(fd, [buffer], offset)


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
        L{IReactorFromThreads.callFromThread}), or L{None} without a
        reactor: then nothing is told when a write ends, and a writer that
        falls behind waits for its disk instead.
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


@implementer(IImageReader)
class _SpillReader:
    """
    Reads an image's runs in order: memfd runs with C{pread}, C{sendfile},
    or C{write} from a mapped window (see L{writesFromMapping}), spill
    files in aligned blocks (direct I/O) into buffers of its own, the next
    block read ahead by the store's I/O thread.
    """

    def __init__(self, segments: list[_Segment], io: _DiskIO) -> None:
        # Our own descriptors, so the bytes outlive a release during the read.
        self._runs = [(os.dup(segment.fd), segment.size, segment.onDisk) for segment in segments]
        self._io = io
        self._index = 0
        self._offset = 0
        self._buffers: list[mmap.mmap] = []
        self._pending = memoryview(b"")
        self._ahead: tuple[Future[int], int, int] | None = None  # read, its fd, its offset
        #: The last run may still grow (a reader following its writer).
        self._lastMayGrow = False
        self._window: tuple[int, int, mmap.mmap] | None = None  # run, start, mapping
        self._outKind = (-1, False)  # descriptor, writesFromMapping

    def _current(self) -> tuple[int, int, bool] | None:
        while self._index < len(self._runs):
            fd, size, onDisk = self._runs[self._index]
            if self._offset < size:
                return fd, size - self._offset, onDisk
            if self._lastMayGrow and self._index == len(self._runs) - 1:
                return None
            self._index += 1
            self._offset = 0
        return None

    def _readInto(self, which: int, fd: int, offset: int) -> Future[int]:
        """Read a whole buffer (the file ends at the run's end) on the I/O thread."""
        return self._io.submit(_preadInto, fd, self._buffers[which], offset)

    def _busy(self, reading: Future[int]) -> SourceBusy:
        """Raised by L{sendfile} while C{reading} runs (with a reactor to say when it ends)."""
        callFromThread = self._io.callFromThread
        assert callFromThread is not None
        whenReady: Deferred[None] = Deferred()
        reading.add_done_callback(lambda _: callFromThread(lambda: whenReady.callback(None)))
        return SourceBusy(whenReady)

    def _staged(self, fd: int, left: int, wait: bool = True) -> memoryview:
        """
        Bytes of the current spill file at the read position.  Unless
        C{wait}, raises L{SourceBusy} instead of waiting for the disk
        (given a reactor to tell when to try again).
        """
        if self._pending:
            return self._pending
        if not self._buffers:
            self._buffers = [mmap.mmap(-1, STAGE_SIZE) for _ in range(2)]
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[1:] == (fd, self._offset):
            reading = ahead[0]
        else:
            if ahead is not None:
                ahead[0].exception()  # a stale read-ahead: let it finish
            reading = self._readInto(1, fd, self._offset)
        if not wait and not reading.done() and self._io.callFromThread is not None:
            self._ahead = (reading, fd, self._offset)
            raise self._busy(reading)
        n = reading.result()
        if n <= 0:
            raise OSError(f"spill file ended {left} bytes early")
        n = min(n, left)
        self._buffers.reverse()  # the buffer just read is now [0]
        self._pending = memoryview(self._buffers[0])[:n]
        if left > n:
            self._ahead = (self._readInto(1, fd, self._offset + n), fd, self._offset + n)
        return self._pending

    def _consumed(self, n: int) -> None:
        self._offset += n
        if self._pending:
            self._pending = self._pending[n:]

    def read(self, size: int) -> bytes:
        current = self._current()
        if current is None:
            return b""
        fd, left, onDisk = current
        if onDisk:
            chunk = bytes(self._staged(fd, left)[:size])
        else:
            chunk = os.pread(fd, min(size, left), self._offset)
        self._consumed(len(chunk))
        return chunk

    def sendfile(self, out: int, count: int) -> int:
        """
        Copy up to C{count} bytes into the descriptor C{out}; 0 at the end
        of the image.  May raise L{BlockingIOError} (C{out} is full), or
        L{SourceBusy} (the bytes are still being read from the disk).
        """
        current = self._current()
        if current is None:
            return 0
        fd, left, onDisk = current
        if onDisk:
            sent = os.write(out, self._staged(fd, left, wait=False)[:count])
        elif self._fromMapping(out):
            sent = self._writeMapped(out, fd, left, count)
        else:
            sent = os.sendfile(out, fd, self._offset, min(count, left))
        self._consumed(sent)
        return sent

    def _fromMapping(self, out: int) -> bool:
        if self._outKind[0] != out:
            self._outKind = (out, writesFromMapping(out))
        return self._outKind[1]

    def _writeMapped(self, out: int, fd: int, left: int, count: int) -> int:
        """C{write} up to C{count} of the C{left} bytes of a memfd run at the read position."""
        offset = self._offset
        window = self._window
        if window is None or window[0] != self._index or not window[1] <= offset < window[1] + len(window[2]):
            self._unmap()
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            mapping = mmap.mmap(fd, min(SOCKET_WINDOW, offset + left - start), prot=mmap.PROT_READ, offset=start)
            window = self._window = (self._index, start, mapping)
        _, start, mapping = window
        view = memoryview(mapping)[offset - start : offset - start + min(count, left)]
        try:
            return os.write(out, view)
        finally:
            view.release()

    def _unmap(self) -> None:
        window, self._window = self._window, None
        if window is not None:
            window[2].close()

    def close(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[0].exception()  # the read-ahead uses our fd and buffer
        runs, self._runs = self._runs, []
        for fd, _, _ in runs:
            os.close(fd)
        self._unmap()
        self._pending.release()
        _closeBuffers(self._buffers)
        self._buffers = []


@implementer(IGrowingImage)
class _GrowingReader(_SpillReader):
    """
    Follows a L{_SpillWriter}: reads what is already in memory or durably
    in the spill file (whole aligned buffers), and more after each change.
    """

    def __init__(self, writer: _SpillWriter) -> None:
        super().__init__([], writer._store._io)
        self._writer: _SpillWriter | None = writer
        self._segments = writer._segments  # the list itself: commit hands it on
        self._lastMayGrow = True
        self.complete = False
        self.aborted = False
        #: The image the write became, once committed.
        self.image: IStoredImage | None = None
        self.onChange: Callable[[], None] = lambda: None

    @property
    def available(self) -> int:
        self._refresh()
        return sum(size for _, size, _ in self._runs)

    def _refresh(self) -> None:
        writer = self._writer
        if writer is None:
            return
        for i, segment in enumerate(self._segments):
            size = writer._durable(segment)
            if i < len(self._runs):
                fd, _, onDisk = self._runs[i]
                self._runs[i] = (fd, size, onDisk)
            else:
                self._runs.append((os.dup(segment.fd), size, segment.onDisk))

    def _changed(self, complete: bool = False, aborted: bool = False) -> None:
        """Called by the writer after each change (before it drops anything)."""
        if not aborted:
            self._refresh()
        if complete or aborted:
            self._writer = None
            self._lastMayGrow = False
        self.complete, self.aborted = complete, aborted
        self.onChange()

    # After an abort, what was available stays readable (our own fds): a
    # chunk already announced can still be completed.

    def read(self, size: int) -> bytes:
        self._refresh()
        return super().read(size)

    def sendfile(self, out: int, count: int) -> int:
        self._refresh()
        return super().sendfile(out, count)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer._unfollow(self)
        super().close()


@implementer(IStoredImage)
class SpillImage:
    """An image whose head is in memory (a memfd) and whose tail may be on disk."""

    def __init__(self, store: SpillStore, segments: list[_Segment]) -> None:
        self._store = store
        self._segments = segments
        self.size = sum(segment.size for segment in segments)

    @property
    def spilled(self) -> int:
        """Bytes of this image kept on disk."""
        return sum(segment.size for segment in self._segments if segment.onDisk)

    def open(self) -> IImageReader:
        return _SpillReader(self._segments, self._store._io)

    def release(self) -> None:
        segments, self._segments = self._segments, []
        for segment in segments:
            self._store._drop(segment)


@implementer(IGrowableWriter, IPacedWriter)
class _SpillWriter:
    """
    Fills a memfd while the store's budget allows, then a spill file.  The
    bytes come from L{write} or, without passing through Python, from a
    pipe with L{spliceFrom}.
    """

    def __init__(self, store: SpillStore) -> None:
        self._store = store
        self._segments: list[_Segment] = []
        self._staged: _StagedFile | None = None
        self._followers: list[_GrowingReader] = []
        self.size = 0
        self.writing = True

    def whenCaughtUp(self) -> Deferred[None] | None:
        staged = self._staged
        return None if staged is None else staged.whenCaughtUp()

    def follow(self) -> IGrowingImage:
        reader = _GrowingReader(self)
        self._followers.append(reader)
        return reader

    def _unfollow(self, reader: _GrowingReader) -> None:
        if reader in self._followers:
            self._followers.remove(reader)

    def _durable(self, segment: _Segment) -> int:
        """Bytes of C{segment} a follower may read now."""
        staged = self._staged
        if staged is not None and segment is self._segments[-1] and segment.onDisk:
            return staged.durable
        return segment.size

    def _notify(self, complete: bool = False, aborted: bool = False) -> None:
        followers = self._followers
        if complete or aborted:
            self._followers = []
        for follower in list(followers):
            follower._changed(complete, aborted)

    def _segmentFor(self, n: int) -> _Segment:
        """The segment the next C{n} bytes go to, with memory reserved."""
        last = self._segments[-1] if self._segments else None
        if (last is None or not last.onDisk) and self._store._reserveMemory(n):
            if last is None:
                last = _Segment(os.memfd_create("twisted-criu-image", os.MFD_CLOEXEC), None)
                self._segments.append(last)
            return last
        if last is None or not last.onDisk:
            last = _Segment(*self._store._newSpillFile())
            self._segments.append(last)
            self._staged = _StagedFile(last, self._store._io, self._notify)
        return last

    def _wrote(self, segment: _Segment, reserved: int, n: int) -> None:
        segment.size += n
        self.size += n
        if segment.onDisk:
            self._store.onDisk += n
        else:
            self._store._freeMemory(reserved - n)

    def write(self, data: bytes | memoryview) -> None:
        n = len(data)
        if not n:
            return
        segment = self._segmentFor(n)
        try:
            if self._staged is not None:
                self._staged.append(memoryview(data).cast("B"))
            else:
                _writeAll(segment.fd, data)
        except OSError:
            self._wrote(segment, n, 0)
            raise
        self._wrote(segment, n, n)
        if self._followers:
            self._notify()

    def spliceFrom(self, fd: int, count: int) -> int:
        """
        Move up to C{count} bytes from the pipe C{fd} into the image (into
        memory in the kernel).  Returns 0 at EOF; raises
        L{BlockingIOError} if the pipe is empty.
        """
        segment = self._segmentFor(count)
        try:
            if self._staged is not None:
                n = self._staged.readFrom(fd, count)
            else:
                n = os.splice(fd, segment.fd, count)
        except OSError:
            self._wrote(segment, count, 0)
            raise
        self._wrote(segment, count, n)
        if n and self._followers:
            self._notify()
        return n

    def _closeAll(self) -> None:
        staged, self._staged = self._staged, None
        if staged is not None:
            staged.close()
        segments, self._segments = self._segments, []
        for segment in segments:
            self._store._drop(segment)

    def commit(self) -> IStoredImage:
        self.writing = False
        staged, self._staged = self._staged, None
        if staged is not None:
            try:
                staged.finish()
            except OSError:
                staged.close()
                self.abort()
                raise
        segments, self._segments = self._segments, []
        image = SpillImage(self._store, segments)
        for follower in self._followers:
            follower.image = image
        self._notify(complete=True)
        return image

    def abort(self) -> None:
        self.writing = False
        self._notify(aborted=True)
        self._closeAll()
        self.size = 0


@implementer(IImageStore)
class SpillStore:
    """
    Images in memory up to C{memoryLimit} bytes in all, the rest in files
    under C{spillDir} (default: the system's temporary directory).

    Give C{callFromThread} (the reactor's) and a writer whose disk falls
    behind says so (L{IPacedWriter}) instead of making the reactor wait.
    """

    log = Logger()

    def __init__(
        self,
        memoryLimit: int,
        spillDir: str | None = None,
        callFromThread: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.memoryLimit = memoryLimit
        self.spillParent = os.path.abspath(spillDir or tempfile.gettempdir())
        self.inMemory = 0
        self.onDisk = 0
        self._dir: str | None = None
        self._lockFd = -1
        self._io = _DiskIO(callFromThread)
        for path in removeStaleSpillDirs(self.spillParent):
            self.log.warn("removed spill files left by a dead daemon: {path}", path=path)

    def newWriter(self, base: IStoredImage | None = None) -> IImageWriter:
        writer = _SpillWriter(self)
        if base is not None:
            reader = base.open()
            try:
                while chunk := reader.read(1 << 20):
                    writer.write(chunk)
            finally:
                reader.close()
        return writer

    def room(self) -> int | None:
        memory = max(0, self.memoryLimit - self.inMemory)
        # The spill directory is made on the first spill: until then, the
        # filesystem it will be on is that of its nearest existing parent.
        path = self.spillParent
        while True:
            try:
                disk = os.statvfs(path)
                break
            except FileNotFoundError:
                if path == os.path.dirname(path):
                    return memory
                path = os.path.dirname(path)
            except OSError:
                return memory
        return memory + disk.f_bavail * disk.f_frsize

    @property
    def directory(self) -> str | None:
        """This store's own spill directory, once something was spilled."""
        return self._dir

    def close(self) -> None:
        """Remove every spill file; the store must not be used afterwards."""
        self._io.shutdown()
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        if self._lockFd >= 0:
            os.close(self._lockFd)
            self._lockFd = -1
        self.onDisk = 0

    # -- accounting, for writers and images ----------------------------------

    def _reserveMemory(self, n: int) -> bool:
        if self.inMemory + n > self.memoryLimit:
            return False
        self.inMemory += n
        return True

    def _freeMemory(self, n: int) -> None:
        self.inMemory -= n

    def _newSpillFile(self) -> tuple[int, str]:
        if self._dir is None:
            os.makedirs(self.spillParent, exist_ok=True)
            directory = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=self.spillParent)
            lockFd = os.open(os.path.join(directory, _LOCK), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(lockFd, fcntl.LOCK_EX)
            self._dir, self._lockFd = directory, lockFd
            self.log.info("spilling images past the memory limit to {path}", path=directory)
        return openSpillFile(self._dir)

    def _drop(self, segment: _Segment) -> None:
        """Give back a segment's memory or disk space."""
        os.close(segment.fd)
        if segment.path is None:
            self._freeMemory(segment.size)
        elif self._dir is not None:  # else closed: the directory is gone already
            self.onDisk -= segment.size
            try:
                os.unlink(segment.path)
            except FileNotFoundError:
                pass
