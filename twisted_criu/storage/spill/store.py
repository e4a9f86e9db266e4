# -*- test-case-name: tests.test_storage -*-
"""The spill store: memory up to a shared budget, then spill files."""

from __future__ import annotations

import fcntl
import os
import resource
import shutil
import tempfile
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from twisted_criu.interfaces import (
    IGrowableWriter,
    IGrowingImage,
    IImageReader,
    IImageStore,
    IImageWriter,
    IPacedWriter,
    ISpliceSink,
    IStoredImage,
)
from twisted_criu.progress import formatBytes
from twisted_criu.storage.spill.directories import (
    _LOCK,
    _PREFIX,
    openSpillFile,
    removeStaleSpillDirs,
)
from twisted_criu.storage.spill.diskio import _DiskIO, _Segment, _StagedFile, _writeAll
from twisted_criu.storage.spill.heldpipes import HOLD_SIZE, newPipe, pending
from twisted_criu.storage.memory import MemoryImage
from twisted_criu.storage.spill.growing import _GrowingReader
from twisted_criu.storage.spill.readers import _SpillReader

#: Images up to this size are kept as bytes once complete, not in a memfd.
SMALL_IMAGE = 64 * 1024


def maxHolds() -> int:
    """
    How many holds a store keeps at most: an eighth of the descriptors the
    process may open (each reader of a held image opens one per hold too).
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(0, soft // 8) if soft != resource.RLIM_INFINITY else 1 << 16


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



@implementer(IGrowableWriter, IPacedWriter, ISpliceSink)
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
        #: Who waits for the write to reach a size (L{whenGrown}).
        self._growthWaiters: list[tuple[int, Deferred[None]]] = []
        self.size = 0
        self.writing = True

    def whenCaughtUp(self) -> Deferred[None] | None:
        staged = self._staged
        return None if staged is None else staged.whenCaughtUp()

    def follow(self) -> IGrowingImage:
        """A reader of the bytes as they come (raises L{OSError} if it gets no descriptor)."""
        reader = _GrowingReader(self)
        self._followers.append(reader)
        return reader

    def whenGrown(self, size: int) -> Deferred[None]:
        """Fires once C{size} bytes are written, or the write has ended."""
        d: Deferred[None] = Deferred()
        self._growthWaiters.append((size, d))
        self._wakeGrown()
        return d

    def _wakeGrown(self) -> None:
        waiters = self._growthWaiters
        if not waiters:
            return
        ended = not self.writing
        self._growthWaiters = [(size, d) for size, d in waiters if size > self.size and not ended]
        for size, d in waiters:
            if size <= self.size or ended:
                d.callback(None)

    def _unfollow(self, reader: _GrowingReader) -> None:
        if reader in self._followers:
            self._followers.remove(reader)

    def _durable(self, segment: _Segment) -> int:
        """Bytes of C{segment} a follower may read now (of a hold: none until it is sealed)."""
        if segment.filling:
            return 0
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

    def _segmentFor(self, n: int, hold: bool = False) -> _Segment:
        """
        The segment the next C{n} bytes go to, with memory reserved: a hold
        if C{hold} (and the store can), else a memfd, or past the budget a
        spill file.
        """
        last = self._segments[-1] if self._segments else None
        if last is not None and last.filling and not (hold and last.size < HOLD_SIZE):
            last.seal()
        if (last is None or not last.onDisk) and self._store._reserveMemory(n):
            if hold:
                if last is not None and last.filling:
                    return last
                try:
                    held = self._store._newHold()
                except OSError:
                    self._store._freeMemory(n)
                    raise
                if held is not None:
                    self._segments.append(held)
                    return held
            if last is None or last.held:
                try:
                    last = _Segment(self._store._newMemfd(), None)
                except OSError:
                    self._store._freeMemory(n)
                    raise
                self._segments.append(last)
            return last
        if last is None or not last.onDisk:
            if last is not None:
                last.seal()
            last = _Segment(*self._store._newSpillFile())
            self._segments.append(last)
            self._staged = _StagedFile(last, self._store._io, self._notify)
        return last

    def _wrote(self, segment: _Segment, reserved: int, n: int) -> None:
        segment.size += n
        self.size += n
        if segment.onDisk:
            self._store._spilled(n)
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
        self._wakeGrown()

    def spliceFrom(self, fd: int, count: int) -> int:
        """
        Move up to C{count} bytes from the pipe C{fd} into the image (into
        memory in the kernel).  Returns 0 at EOF; raises
        L{BlockingIOError} if the pipe is empty.
        """
        segment = self._segmentFor(count, hold=self._store.holdsPipes)
        waiting = 0
        try:
            if self._staged is not None:
                n = self._staged.readFrom(fd, count)
            elif segment.held:
                waiting = pending(fd)  # (only we take bytes out of it)
                n = os.splice(fd, segment.writeFd, min(count, HOLD_SIZE - segment.size))
            else:
                n = os.splice(fd, segment.fd, count)
        except OSError as e:
            self._wrote(segment, count, 0)
            if isinstance(e, BlockingIOError) and waiting:
                segment.seal()  # the hold's slots are full (before its bytes): the next one
                return self.spliceFrom(fd, count)
            raise
        self._wrote(segment, count, n)
        if segment.filling and segment.size >= HOLD_SIZE:
            segment.seal()
        if n and self._followers:
            self._notify()
        if n:
            self._wakeGrown()
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
        if self._segments and self._segments[-1].filling:
            self._segments[-1].seal()
            if not self._segments[-1].size:  # opened for bytes that never came (EOF)
                self._store._drop(self._segments.pop())
        staged, self._staged = self._staged, None
        if staged is not None:
            try:
                staged.finish()
            except OSError:
                staged.close()
                self.abort()
                raise
        segments, self._segments = self._segments, []
        small = self._asBytes(segments)
        image: IStoredImage = small if small is not None else SpillImage(self._store, segments)
        for follower in self._followers:
            follower.image = image
        self._notify(complete=True)  # followers hold their own descriptors
        if small is not None:
            for segment in segments:
                self._store._drop(segment)
        self._wakeGrown()
        return image

    def _asBytes(self, segments: list[_Segment]) -> MemoryImage | None:
        """
        A small image all in memory, as bytes: held images then take no
        descriptor each (criu writes thousands of small ones for a large
        process tree).  Its memory stays counted against the budget.
        """
        if len(segments) != 1 or segments[0].onDisk or segments[0].size > SMALL_IMAGE:
            return None
        segment = segments[0]
        reader = _SpillReader(segments, self._store._io)  # (a memfd or a hold)
        try:
            data = b"".join(iter(lambda: reader.read(SMALL_IMAGE), b""))
        finally:
            reader.close()
        if len(data) != segment.size:
            return None
        self._store.inMemory += segment.size  # dropping the memfd gives its share back
        return MemoryImage([data], len(data), self._store)

    def abort(self) -> None:
        self.writing = False
        self._notify(aborted=True)
        self._closeAll()
        self.size = 0
        self._wakeGrown()


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
        holdPipes: bool = False,
    ) -> None:
        self.memoryLimit = memoryLimit
        #: Bytes spliced in from pipes stay in pipes (holds) while the
        #: budget and the descriptors allow; see L{heldpipes}.
        self.holdsPipes = holdPipes
        self._holds = 0
        self.spillParent = os.path.abspath(spillDir or tempfile.gettempdir())
        self.inMemory = 0
        self.onDisk = 0
        #: Spill files open now, and the most bytes on disk since spilling began.
        self._spillFiles = 0
        self._peakOnDisk = 0
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
        self.onDisk = self._spillFiles = self._peakOnDisk = 0

    # -- accounting, for writers and images ----------------------------------

    def _reserveMemory(self, n: int) -> bool:
        if self.inMemory + n > self.memoryLimit:
            return False
        self.inMemory += n
        return True

    def _freeMemory(self, n: int) -> None:
        self.inMemory -= n

    def _newHold(self) -> _Segment | None:
        """A hold for bytes spliced in, or L{None} (use a memfd): too many held, or pipes cannot grow."""
        if self._holds >= maxHolds():
            return None
        pipe = newPipe()
        if pipe is None:
            self.holdsPipes = False
            self.log.warn(
                "pipes cannot grow to {size} bytes here: image bytes go into memory files (a copy) instead",
                size=HOLD_SIZE,
            )
            return None
        self._holds += 1
        return _Segment(pipe[0], None, writeFd=pipe[1])

    def _newMemfd(self) -> int:
        """A memfd for an image's bytes in memory (raises L{OSError}: EMFILE, ENFILE)."""
        return os.memfd_create("twisted-criu-image", os.MFD_CLOEXEC)

    def _newSpillFile(self) -> tuple[int, str]:
        if self._dir is None:
            os.makedirs(self.spillParent, exist_ok=True)
            directory = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=self.spillParent)
            lockFd = os.open(os.path.join(directory, _LOCK), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(lockFd, fcntl.LOCK_EX)
            self._dir, self._lockFd = directory, lockFd
        opened = openSpillFile(self._dir)
        if not self._spillFiles:
            self.log.info(
                "spilling to disk past --memory-limit {limit} ({memory} in memory):"
                " image bytes that do not fit go to {path}",
                memory=formatBytes(self.inMemory),
                limit=formatBytes(self.memoryLimit),
                path=self._dir,
                inMemory=self.inMemory,
                memoryLimit=self.memoryLimit,
            )
        self._spillFiles += 1
        return opened

    def _spilled(self, n: int) -> None:
        self.onDisk += n
        self._peakOnDisk = max(self._peakOnDisk, self.onDisk)

    def _drop(self, segment: _Segment) -> None:
        """Give back a segment's memory or disk space."""
        os.close(segment.fd)
        if segment.held:
            segment.seal()
            self._holds -= 1
        if segment.path is None:
            self._freeMemory(segment.size)
        elif self._dir is not None:  # else closed: the directory is gone already
            self.onDisk -= segment.size
            try:
                os.unlink(segment.path)
            except FileNotFoundError:
                pass
            self._spillFiles -= 1
            if not self._spillFiles:
                self.log.info(
                    "stopped spilling: no image left on disk (at most {peak} was);"
                    " {memory} in memory",
                    peak=formatBytes(self._peakOnDisk),
                    memory=formatBytes(self.inMemory),
                    peakOnDisk=self._peakOnDisk,
                    inMemory=self.inMemory,
                )
                self._peakOnDisk = 0
