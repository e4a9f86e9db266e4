# -*- test-case-name: tests.test_storage -*-
"""
Memory up to a budget shared by all images, then files on disk.

Each image keeps its first bytes in memory while the daemon-wide budget
allows, in a memfd (kernel memory: no page faults in the daemon, and pipes
splice into it without a copy through Python); once a write would exceed
the budget, that image's remaining bytes go to a private file.  Spill files live in a directory of their own (mode 0700,
files 0600, random names never derived from image names) under the spill
directory; it is removed when the store closes, and a directory left by a
crashed daemon is removed by the next store that starts there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile

from twisted.logger import Logger
from zope.interface import implementer

from twisted_criu.interfaces import IImageReader, IImageStore, IImageWriter, IStoredImage

_PREFIX = "twisted-criu-spill-"
_LOCK = ".lock"


def _writeAll(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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


@implementer(IImageReader)
class _SpillReader:
    def __init__(self, segments: list[_Segment]) -> None:
        # Our own descriptors, so the bytes outlive a release during the read.
        self._runs = [(os.dup(segment.fd), segment.size) for segment in segments]
        self._index = 0
        self._offset = 0

    def _current(self) -> tuple[int, int] | None:
        while self._index < len(self._runs):
            fd, size = self._runs[self._index]
            if self._offset < size:
                return fd, size - self._offset
            self._index += 1
            self._offset = 0
        return None

    def read(self, size: int) -> bytes:
        current = self._current()
        if current is None:
            return b""
        fd, left = current
        chunk = os.pread(fd, min(size, left), self._offset)
        self._offset += len(chunk)
        return chunk

    def sendfile(self, out: int, count: int) -> int:
        """
        Copy up to C{count} bytes into the descriptor C{out} in the kernel;
        0 at the end of the image.  May raise L{BlockingIOError}.
        """
        current = self._current()
        if current is None:
            return 0
        fd, left = current
        sent = os.sendfile(out, fd, self._offset, min(count, left))
        self._offset += sent
        return sent

    def close(self) -> None:
        runs, self._runs = self._runs, []
        for fd, _ in runs:
            os.close(fd)


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
        return _SpillReader(self._segments)

    def release(self) -> None:
        segments, self._segments = self._segments, []
        for segment in segments:
            self._store._drop(segment)


@implementer(IImageWriter)
class _SpillWriter:
    """
    Fills a memfd while the store's budget allows, then a spill file.  The
    bytes come from L{write} or, without passing through Python, from a
    pipe with L{spliceFrom}.
    """

    def __init__(self, store: SpillStore) -> None:
        self._store = store
        self._segments: list[_Segment] = []
        self.size = 0

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
            _writeAll(segment.fd, data)
        except OSError:
            self._wrote(segment, n, 0)
            raise
        self._wrote(segment, n, n)

    def spliceFrom(self, fd: int, count: int) -> int:
        """
        Move up to C{count} bytes from the pipe C{fd} into the image, in the
        kernel.  Returns 0 at EOF; raises L{BlockingIOError} if the pipe is
        empty.
        """
        segment = self._segmentFor(count)
        try:
            n = os.splice(fd, segment.fd, count)
        except OSError:
            self._wrote(segment, count, 0)
            raise
        self._wrote(segment, count, n)
        return n

    def _closeAll(self) -> None:
        segments, self._segments = self._segments, []
        for segment in segments:
            self._store._drop(segment)

    def commit(self) -> IStoredImage:
        segments, self._segments = self._segments, []
        return SpillImage(self._store, segments)

    def abort(self) -> None:
        self._closeAll()
        self.size = 0


@implementer(IImageStore)
class SpillStore:
    """
    Images in memory up to C{memoryLimit} bytes in all, the rest in files
    under C{spillDir} (default: the system's temporary directory).
    """

    log = Logger()

    def __init__(self, memoryLimit: int, spillDir: str | None = None) -> None:
        self.memoryLimit = memoryLimit
        self.spillParent = os.path.abspath(spillDir or tempfile.gettempdir())
        self.inMemory = 0
        self.onDisk = 0
        self._dir: str | None = None
        self._lockFd = -1
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
        try:
            disk = os.statvfs(self.spillParent)
        except OSError:
            return memory
        return memory + disk.f_bavail * disk.f_frsize

    @property
    def directory(self) -> str | None:
        """This store's own spill directory, once something was spilled."""
        return self._dir

    def close(self) -> None:
        """Remove every spill file; the store must not be used afterwards."""
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
        fd, path = tempfile.mkstemp(dir=self._dir, suffix=".img")
        return fd, path

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
