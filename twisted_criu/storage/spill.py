# -*- test-case-name: tests.test_storage -*-
"""
Memory up to a budget shared by all images, then files on disk.

Each image keeps its first chunks in memory while the daemon-wide budget
allows; once a write would exceed it, that image's remaining bytes go to a
private file.  Spill files live in a directory of their own (mode 0700,
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


@implementer(IImageReader)
class _SpillReader:
    def __init__(self, chunks: list[bytes], path: str | None) -> None:
        self._chunks = chunks
        self._index = 0
        self._offset = 0
        # Opened now, so that the file outlives a release during the read.
        self._fd = os.open(path, os.O_RDONLY) if path is not None else -1

    def read(self, size: int) -> bytes:
        if self._index < len(self._chunks):
            chunk = self._chunks[self._index]
            if self._offset == 0 and len(chunk) <= size:
                self._index += 1
                return chunk
            piece = chunk[self._offset : self._offset + size]
            self._offset += len(piece)
            if self._offset >= len(chunk):
                self._index += 1
                self._offset = 0
            return piece
        if self._fd < 0:
            return b""
        return os.read(self._fd, size)

    def close(self) -> None:
        self._index = len(self._chunks)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@implementer(IStoredImage)
class SpillImage:
    """An image whose head is in memory and whose tail may be in a file."""

    def __init__(
        self, store: SpillStore, chunks: list[bytes], inMemory: int, path: str | None, onDisk: int
    ) -> None:
        self._store = store
        self._chunks = chunks
        self._inMemory = inMemory
        self._path = path
        self._onDisk = onDisk
        self.size = inMemory + onDisk

    @property
    def spilled(self) -> int:
        """Bytes of this image kept on disk."""
        return self._onDisk

    def open(self) -> IImageReader:
        return _SpillReader(self._chunks, self._path)

    def release(self) -> None:
        self._chunks = []
        self._store._freeMemory(self._inMemory)
        self._inMemory = 0
        path, self._path = self._path, None
        if path is not None:
            self._store._freeDisk(path, self._onDisk)


@implementer(IImageWriter)
class _SpillWriter:
    def __init__(self, store: SpillStore) -> None:
        self._store = store
        self._chunks: list[bytes] = []
        self._inMemory = 0
        self._fd = -1
        self._path: str | None = None
        self._onDisk = 0
        self.size = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        n = len(data)
        if self._fd < 0 and self._store._reserveMemory(n):
            self._chunks.append(bytes(data))
            self._inMemory += n
        else:
            if self._fd < 0:
                self._fd, self._path = self._store._newSpillFile()
            _writeAll(self._fd, data)
            self._onDisk += n
            self._store.onDisk += n
        self.size += n

    def _closeFile(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def commit(self) -> IStoredImage:
        self._closeFile()
        return SpillImage(self._store, self._chunks, self._inMemory, self._path, self._onDisk)

    def abort(self) -> None:
        self._closeFile()
        self._chunks = []
        self._store._freeMemory(self._inMemory)
        if self._path is not None:
            self._store._freeDisk(self._path, self._onDisk)
        self._inMemory = self._onDisk = self.size = 0
        self._path = None


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

    def _freeDisk(self, path: str, n: int) -> None:
        if self._dir is None:
            return  # closed: the whole directory is gone already
        self.onDisk -= n
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
