"""The store test-suite: one mixin, run against every backend."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import tempfile
from typing import TYPE_CHECKING

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twisted_criu.interfaces import (
    IGrowingImage,
    IImageReader,
    IImageStore,
    IImageWriter,
    IStoredImage,
)
from twisted_criu.registry import readAll
from twisted_criu.storage.memory import MemoryStore
from twisted_criu.storage.spill import (
    BLOCK,
    STAGE_SIZE,
    SpillImage,
    SpillStore,
    openSpillFile,
    readers,
)
from twisted_criu.storage.spill.store import SMALL_IMAGE
from twisted_criu.testing.fakes import storedImage

if TYPE_CHECKING:
    _Base = SynchronousTestCase
else:
    _Base = object


class StoreTestsMixin(_Base):
    """Behaviour every L{IImageStore} must have. Subclasses set C{store}."""

    store: IImageStore

    def _write(self, *chunks: bytes) -> IStoredImage:
        writer = self.store.newWriter()
        for chunk in chunks:
            writer.write(chunk)
        return writer.commit()

    def test_interfaces(self) -> None:
        verifyObject(IImageStore, self.store)
        writer = self.store.newWriter()
        verifyObject(IImageWriter, writer)
        image = writer.commit()
        verifyObject(IStoredImage, image)
        verifyObject(IImageReader, image.open())

    def test_chunksInOut(self) -> None:
        image = self._write(b"abc", b"", b"defg", b"h" * 100000)
        self.assertEqual(image.size, 7 + 100000)
        self.assertEqual(readAll(image), b"abcdefg" + b"h" * 100000)

    def test_readsBoundedChunks(self) -> None:
        """Readers never hand out more than asked: images stream, never whole."""
        image = self._write(b"x" * 10000, b"y" * 5)
        reader = image.open()
        sizes = []
        while chunk := reader.read(4096):
            sizes.append(len(chunk))
        self.assertEqual(sum(sizes), 10005)
        self.assertEqual(max(sizes), 4096)

    def test_rereadable(self) -> None:
        image = self._write(b"abc", b"def")
        self.assertEqual(readAll(image), b"abcdef")
        self.assertEqual(readAll(image), b"abcdef")

    def test_zeroLength(self) -> None:
        image = self._write()
        self.assertEqual(image.size, 0)
        self.assertEqual(image.open().read(10), b"")

    def test_appendCopiesBase(self) -> None:
        base = self._write(b"one")
        writer = self.store.newWriter(base)
        self.assertEqual(writer.size, 3)
        writer.write(b"two")
        appended = writer.commit()
        self.assertEqual(readAll(appended), b"onetwo")
        self.assertEqual(readAll(base), b"one")
        base.release()
        self.assertEqual(readAll(appended), b"onetwo")

    def test_abort(self) -> None:
        writer = self.store.newWriter()
        writer.write(b"partial")
        writer.abort()
        self.assertEqual(writer.size, 0)

    def test_accountingReturnsToZero(self) -> None:
        """Bytes held are counted while held, and given back when released or aborted."""
        first = self._write(b"a" * 3000, b"b" * 5000)
        writer = self.store.newWriter(first)
        writer.write(b"c" * 100)
        second = writer.commit()
        aborted = self.store.newWriter()
        aborted.write(b"d" * 700)
        held = self.store.inMemory + getattr(self.store, "onDisk", 0)  # type: ignore[attr-defined]
        self.assertEqual(held, 8000 + 8100 + 700)
        aborted.abort()
        first.release()
        second.release()
        second.release()  # twice is harmless
        self.assertEqual(self.store.inMemory + getattr(self.store, "onDisk", 0), 0)  # type: ignore[attr-defined]

    def test_writeAcceptsBuffers(self) -> None:
        buffer = bytearray(b"abc")
        writer = self.store.newWriter()
        writer.write(buffer)  # type: ignore[arg-type]
        buffer[:] = b"zzz"  # reused buffers must not change stored bytes
        self.assertEqual(readAll(writer.commit()), b"abc")


class MemoryStoreTests(StoreTestsMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MemoryStore()


class SpillStoreAllInMemoryTests(StoreTestsMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.store = SpillStore(1 << 30, self.mktemp())
        self.addCleanup(self.store.close)


class SpillStoreAllOnDiskTests(StoreTestsMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.store = SpillStore(0, self.mktemp())
        self.addCleanup(self.store.close)


class SpillStoreMixedTests(StoreTestsMixin, SynchronousTestCase):
    """The budget runs out in the middle of images."""

    def setUp(self) -> None:
        self.store = SpillStore(5, self.mktemp())
        self.addCleanup(self.store.close)


class SpillBehaviourTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.parent = self.mktemp()
        self.store = SpillStore(100, self.parent)
        self.addCleanup(self.store.close)

    def spillFiles(self) -> list[str]:
        directory = self.store.directory
        if directory is None:
            return []
        return sorted(n for n in os.listdir(directory) if n != ".lock")

    def test_budgetExactUnderConcurrentWriters(self) -> None:
        """Interleaved writers never hold more than the budget in memory."""
        writers = [self.store.newWriter() for _ in range(4)]
        for round in range(10):
            for i, writer in enumerate(writers):
                writer.write(bytes([i]) * (7 + round))
                self.assertLessEqual(self.store.inMemory, 100)
        images = [w.commit() for w in writers]
        total = sum(image.size for image in images)
        self.assertEqual(self.store.inMemory + self.store.onDisk, total)
        self.assertGreater(self.store.inMemory, 100 - 16)  # the budget was used
        for i, image in enumerate(images):
            self.assertEqual(
                readAll(image), b"".join(bytes([i]) * (7 + r) for r in range(10))
            )
        for image in images:
            image.release()
        self.assertEqual((self.store.inMemory, self.store.onDisk), (0, 0))
        self.assertEqual(self.spillFiles(), [])

    def test_smallImagesHoldNoDescriptor(self) -> None:
        """
        A complete image small enough is kept as bytes: thousands of held
        images take no descriptor each (large ones keep their memfd).
        """
        store = SpillStore(1 << 30, self.mktemp())
        self.addCleanup(store.close)
        before = len(os.listdir("/proc/self/fd"))
        small = [storedImage(store, os.urandom(n % 2000)) for n in range(1, 1500)]
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)
        large = storedImage(store, b"L" * (SMALL_IMAGE + 1))
        self.assertEqual(len(os.listdir("/proc/self/fd")), before + 1)
        self.assertEqual(store.inMemory, sum(i.size for i in small) + large.size)
        self.assertEqual(len(readAll(small[10])), 11)
        for image in [*small, large]:
            image.release()
        self.assertEqual((store.inMemory, len(os.listdir("/proc/self/fd"))), (0, before))

    def test_filesSecureAndGoneAfterDrop(self) -> None:
        writer = self.store.newWriter()
        writer.write(b"m" * 100)
        writer.write(b"d" * 1000)
        image = writer.commit()
        self.assertIsInstance(image, SpillImage)
        self.assertEqual(image.spilled, 1000)  # type: ignore[attr-defined]
        directory = self.store.directory
        assert directory is not None
        self.assertEqual(os.stat(directory).st_mode & 0o777, 0o700)
        [name] = self.spillFiles()
        self.assertEqual(os.stat(os.path.join(directory, name)).st_mode & 0o777, 0o600)
        image.release()
        self.assertEqual(self.spillFiles(), [])

    def test_abortRemovesFile(self) -> None:
        writer = self.store.newWriter()
        writer.write(b"x" * 500)
        self.assertEqual(len(self.spillFiles()), 1)
        writer.abort()
        self.assertEqual(self.spillFiles(), [])
        self.assertEqual((self.store.inMemory, self.store.onDisk), (0, 0))

    def test_closeRemovesEverything(self) -> None:
        writer = self.store.newWriter()
        writer.write(b"x" * 500)
        writer.commit()
        directory = self.store.directory
        self.store.close()
        self.assertFalse(os.path.exists(directory))  # type: ignore[arg-type]

    def test_readWhileReleased(self) -> None:
        """A reader already open keeps its bytes if the image is replaced."""
        writer = self.store.newWriter()
        writer.write(b"a" * 100)
        writer.write(b"b" * 100)
        image = writer.commit()
        reader = image.open()
        image.release()
        data = b""
        while chunk := reader.read(64):
            data += chunk
        reader.close()
        self.assertEqual(data, b"a" * 100 + b"b" * 100)

    def test_roomBeforeTheSpillDirectoryExists(self) -> None:
        """Free disk space counts before the first spill has made the directory."""
        store = SpillStore(100, os.path.join(self.mktemp(), "not", "yet"))
        free = os.statvfs(".")
        room = store.room()
        assert room is not None
        self.assertGreater(room, 100 + free.f_bavail * free.f_frsize // 2)

    def test_staleDirectoriesOfDeadDaemonsRemoved(self) -> None:
        writer = self.store.newWriter()
        writer.write(b"x" * 500)
        live = self.store.directory
        dead = os.path.join(self.parent, "twisted-criu-spill-999999-dead")
        os.makedirs(dead)
        open(os.path.join(dead, ".lock"), "w").close()
        open(os.path.join(dead, "tmp123.img"), "w").close()
        unrelated = os.path.join(self.parent, "something-else")
        os.makedirs(unrelated)
        SpillStore(100, self.parent)
        self.assertFalse(os.path.exists(dead))
        self.assertTrue(os.path.exists(live))  # type: ignore[arg-type]
        self.assertTrue(os.path.exists(unrelated))


class DirectSpillTests(SynchronousTestCase):
    """Spill files are written and read in aligned blocks (direct I/O)."""

    #: Sizes around the block and staging-buffer boundaries.
    SIZES = (1, BLOCK - 1, BLOCK, BLOCK + 1, STAGE_SIZE - 1, STAGE_SIZE, STAGE_SIZE + 1, 3 * STAGE_SIZE + 777)

    def setUp(self) -> None:
        self.store = SpillStore(0, self.mktemp())
        self.addCleanup(self.store.close)

    def imageOf(self, data: bytes, piece: int) -> IStoredImage:
        writer = self.store.newWriter()
        for start in range(0, len(data), piece):
            writer.write(data[start : start + piece])
        return writer.commit()

    def test_unalignedSizesRoundTrip(self) -> None:
        """Every size, written in odd pieces, reads back exactly, by read() and by sendfile()."""
        for size in self.SIZES:
            data = os.urandom(size)
            image = self.imageOf(data, 100_003)
            self.assertEqual(image.size, size)
            [name] = [n for n in os.listdir(self.store.directory) if n != ".lock"]
            path = os.path.join(self.store.directory, name)  # type: ignore[arg-type]
            self.assertEqual(os.path.getsize(path), size)  # the padding is cut off
            self.assertEqual(readAll(image), data)
            self.assertEqual(self.sendAll(image), data)
            image.release()

    def sendAll(self, image: IStoredImage) -> bytes:
        """The image as sendfile() moves it into a pipe, less than the pipe holds at a time."""
        reader = image.open()
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        received = []
        while sent := reader.sendfile(w, 60_001):  # type: ignore[attr-defined]
            received.append(os.read(r, sent))
        reader.close()
        return b"".join(received)

    def test_fromPipe(self) -> None:
        """Bytes spliced from a pipe land in the spill file too."""
        data = os.urandom(STAGE_SIZE + 5000)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        writer = self.store.newWriter()
        os.set_blocking(r, False)
        view = memoryview(data)
        while view:
            view = view[os.write(w, view[:60_000]) :]
            while True:
                try:
                    if not writer.spliceFrom(r, 1 << 20):  # type: ignore[attr-defined]
                        break
                except BlockingIOError:
                    break
        os.close(w)
        self.assertEqual(writer.spliceFrom(r, 1 << 20), 0)  # type: ignore[attr-defined]
        self.assertEqual(readAll(writer.commit()), data)

    def test_directWhereSupported(self) -> None:
        """Where the filesystem allows it, the spill file bypasses the page cache."""
        directory = tempfile.mkdtemp(dir="/var/tmp")
        self.addCleanup(shutil.rmtree, directory)
        try:
            os.close(os.open(os.path.join(directory, "probe"), os.O_RDWR | os.O_CREAT | os.O_DIRECT))
            direct = os.O_DIRECT
        except OSError:
            direct = 0
        fd, path = openSpillFile(directory)
        self.addCleanup(os.close, fd)
        self.assertEqual(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT, direct)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

    def test_fallbackWithoutDirect(self) -> None:
        """A filesystem refusing O_DIRECT gets ordinary files, same bytes."""
        realOpen = os.open

        def refuseDirect(path: str, flags: int, mode: int = 0o777) -> int:
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "no direct I/O")
            return realOpen(path, flags, mode)

        self.patch(os, "open", refuseDirect)
        data = os.urandom(STAGE_SIZE + 3)
        image = self.imageOf(data, 4097)
        self.assertEqual(readAll(image), data)
        self.assertEqual(self.sendAll(image), data)


class GrowingImageTests(SynchronousTestCase):
    """A follower reads an image while it is written (cut-through forwarding)."""

    def follow(self, budget: int) -> None:
        store = SpillStore(budget, self.mktemp())
        self.addCleanup(store.close)
        writer = store.newWriter()
        follower = writer.follow()  # type: ignore[attr-defined]
        verifyObject(IGrowingImage, follower)
        changes: list[int] = []
        follower.onChange = lambda: changes.append(follower.available)
        data = os.urandom(3 * STAGE_SIZE + 12_345)
        got = bytearray()
        for start in range(0, len(data), 300_001):
            writer.write(data[start : start + 300_001])
            while chunk := follower.read(100_000):
                got += chunk
            # Never ahead of the writer; in memory at once, on disk per buffer.
            self.assertLessEqual(len(got), start + 300_001)
            self.assertEqual(bytes(got), data[: len(got)])
            self.assertFalse(follower.complete)
        if budget >= len(data):
            self.assertEqual(len(got), len(data))
        image = writer.commit()
        self.assertTrue(follower.complete)
        while chunk := follower.read(100_000):
            got += chunk
        self.assertEqual(bytes(got), data)
        self.assertEqual(changes[-1], len(data))
        follower.close()
        self.assertEqual(readAll(image), data)
        image.release()

    def test_inMemory(self) -> None:
        self.follow(1 << 30)

    def test_onDisk(self) -> None:
        self.follow(0)

    def test_spillsMidway(self) -> None:
        self.follow(STAGE_SIZE + 7)

    def test_abortStopsTheFollower(self) -> None:
        store = SpillStore(1 << 20, self.mktemp())
        self.addCleanup(store.close)
        writer = store.newWriter()
        follower = writer.follow()  # type: ignore[attr-defined]
        writer.write(b"x" * 5000)
        self.assertEqual(follower.read(10), b"x" * 10)
        writer.abort()
        self.assertTrue(follower.aborted)
        self.assertEqual(follower.read(10_000), b"x" * 4990)  # what it had could still go
        self.assertEqual(follower.read(10), b"")
        follower.close()
        self.assertEqual((store.inMemory, store.onDisk), (0, 0))

    def test_sendfileFollows(self) -> None:
        store = SpillStore(STAGE_SIZE, self.mktemp())
        self.addCleanup(store.close)
        writer = store.newWriter()
        follower = writer.follow()  # type: ignore[attr-defined]
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        data = os.urandom(2 * STAGE_SIZE + 99)
        got = bytearray()
        writer.write(data[:STAGE_SIZE + 10])
        writer.write(data[STAGE_SIZE + 10 :])
        writer.commit()
        while sent := follower.sendfile(w, 60_000):
            got += os.read(r, sent)
        self.assertEqual(bytes(got), data)
        follower.close()


class LoopbackTCPTests(SynchronousTestCase):
    """
    Into TCP to this host, memory runs are written from a mapping of the
    memfd, a window at a time; everywhere else they go by sendfile().
    """

    def setUp(self) -> None:
        self.patch(readers, "SOCKET_WINDOW", 5 * BLOCK)  # many windows in a small image
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.sending = socket.create_connection(listener.getsockname())
        self.receiving, _ = listener.accept()
        listener.close()
        self.addCleanup(self.sending.close)
        self.addCleanup(self.receiving.close)
        self.sendfiles: list[int] = []  # the descriptors sendfile() wrote into
        realSendfile = os.sendfile

        def recordingSendfile(out: int, *args: int) -> int:
            self.sendfiles.append(out)
            return realSendfile(out, *args)

        self.patch(os, "sendfile", recordingSendfile)

    def receive(self, count: int) -> bytes:
        got = bytearray()
        while len(got) < count:
            got += self.receiving.recv(count - len(got))
        return bytes(got)

    def sendAll(self, reader: IImageReader) -> bytes:
        got = bytearray()
        while sent := reader.sendfile(self.sending.fileno(), 60_001):  # type: ignore[attr-defined]
            got += self.receive(sent)
        return bytes(got)

    def test_whichDescriptors(self) -> None:
        """Only a TCP socket connected to a loopback address is written from a mapping."""
        self.assertTrue(readers.writesFromMapping(self.sending.fileno()))
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.assertFalse(readers.writesFromMapping(w))
        unix, other = socket.socketpair()
        self.addCleanup(unix.close)
        self.addCleanup(other.close)
        self.assertFalse(readers.writesFromMapping(unix.fileno()))
        unconnected = socket.socket()
        self.addCleanup(unconnected.close)
        self.assertFalse(readers.writesFromMapping(unconnected.fileno()))
        self.assertFalse(readers.writesFromMapping(os.open(os.devnull, os.O_RDONLY) + 1000))
        os.fstat(w)  # the probe left the descriptors open
        os.fstat(unix.fileno())

    def test_memoryAndDisk(self) -> None:
        """An image half in memory, half spilled, arrives whole; no sendfile into the socket."""
        store = SpillStore(STAGE_SIZE + 5, self.mktemp())
        self.addCleanup(store.close)
        writer = store.newWriter()
        data = os.urandom(2 * STAGE_SIZE + 777)
        for start in range(0, len(data), 100_003):
            writer.write(data[start : start + 100_003])
        image = writer.commit()
        self.assertTrue(0 < image.spilled < len(data))  # type: ignore[attr-defined]
        reader = image.open()
        self.assertEqual(self.sendAll(reader), data)
        reader.close()
        self.assertIsNone(reader._window)  # type: ignore[attr-defined]
        self.assertEqual(self.sendfiles, [])
        # Into a pipe, the same image goes by sendfile().
        self.assertEqual(DirectSpillTests.sendAll(self, image), data)  # type: ignore[arg-type]
        self.assertNotEqual(self.sendfiles, [])

    def test_followerMapsWhatIsWritten(self) -> None:
        """A follower maps only what the writer has written, and maps again as it grows."""
        store = SpillStore(1 << 30, self.mktemp())
        self.addCleanup(store.close)
        writer = store.newWriter()
        follower = writer.follow()  # type: ignore[attr-defined]
        data = os.urandom(3 * readers.SOCKET_WINDOW + 1234)
        got = bytearray()
        for start in range(0, len(data), 7001):
            writer.write(data[start : start + 7001])
            got += self.sendAll(follower)
            self.assertEqual(bytes(got), data[: start + 7001])
        writer.commit()
        self.assertEqual(self.sendAll(follower), b"")
        follower.close()
        self.assertEqual(bytes(got), data)
        self.assertEqual(self.sendfiles, [])


class SpillWriteFailureTests(SynchronousTestCase):
    """A spill disk that fills up: the error reaches the writer (the write runs on a thread)."""

    def test_diskFullReachesTheWriter(self) -> None:
        store = SpillStore(0, self.mktemp())
        self.addCleanup(store.close)

        def full(fd: int, data: object, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "pwrite", full)
        writer = store.newWriter()
        with self.assertRaises(OSError) as e:
            for _ in range(4):  # the first full buffer fails in the background; a later call says so
                writer.write(b"x" * STAGE_SIZE)
            writer.commit()
        self.assertEqual(e.exception.errno, errno.ENOSPC)
        writer.abort()
        self.assertEqual((store.inMemory, store.onDisk), (0, 0))
        self.assertEqual([n for n in os.listdir(store.directory) if n != ".lock"], [])
