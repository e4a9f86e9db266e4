"""
The proxy's copy of criu's bytes held in pipes (L{heldpipes}): C{tee} and
holds against real pipes, and a spill store that keeps what is spliced into
it in holds, read back every way the daemons read images.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from twisted_criu.interfaces import IStoredImage
from twisted_criu.storage.memory import MemoryImage
from twisted_criu.storage.spill import SpillStore, store as spillStore
from twisted_criu.storage.spill import heldpipes
from twisted_criu.storage.spill.heldpipes import HOLD_SIZE, HeldCopy, newPipe, tee

MiB = 1 << 20


def _pipe(case: SynchronousTestCase) -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK)
    case.addCleanup(_closeAll, r, w)
    return r, w


def _closeAll(*fds: int) -> None:
    for fd in fds:
        if _open(fd):
            os.close(fd)


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class TeeTests(SynchronousTestCase):
    def test_available(self) -> None:
        """This machine lets pipes grow to a hold's size and has C{tee}."""
        self.assertTrue(heldpipes.available())

    def test_teeLeavesTheSource(self) -> None:
        source, target = _pipe(self), _pipe(self)
        os.write(source[1], b"abcdef")
        self.assertEqual(tee(source[0], target[1], 4), 4)
        self.assertEqual(os.read(target[0], 10), b"abcd")
        self.assertEqual(os.read(source[0], 10), b"abcdef")  # still all there

    def test_teeFromAnEmptyPipe(self) -> None:
        source, target = _pipe(self), _pipe(self)
        self.assertRaises(BlockingIOError, tee, source[0], target[1], 4)

    def test_heldCopyReadsAndDiscards(self) -> None:
        """A copy of a sealed hold is read in order, as often as wanted; the hold stays whole."""
        pipe = newPipe()
        assert pipe is not None
        hold, writeEnd = pipe
        self.addCleanup(os.close, hold)
        data = os.urandom(HOLD_SIZE)
        view = memoryview(data)
        while view:
            view = view[os.write(writeEnd, view) :]
        os.close(writeEnd)
        for _ in range(2):
            copy = HeldCopy()
            copy.load(hold, len(data))
            copy.discard(1000)
            got = b"".join(iter(lambda: copy.read(300_000), b""))
            copy.close()
            self.assertTrue(got == data[1000:])

    def test_shortHoldRefused(self) -> None:
        """A hold with fewer bytes than said is an error, not a short image."""
        pipe = newPipe()
        assert pipe is not None
        self.addCleanup(os.close, pipe[0])
        os.write(pipe[1], b"12345")
        os.close(pipe[1])
        copy = HeldCopy()
        self.assertRaises(OSError, copy.load, pipe[0], 10)
        copy.close()


class Feeder:
    """A thread writing C{data} into a pipe (criu writing an image); the read end, non-blocking."""

    def __init__(self, case: SynchronousTestCase, data: bytes, piece: int = MiB) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        self.fd = r
        case.addCleanup(os.close, r)

        def feed() -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(w, view[:piece]) :]
            os.close(w)

        self.thread = threading.Thread(target=feed)
        self.thread.start()
        case.addCleanup(self.thread.join, 30)


class HeldStoreTests(SynchronousTestCase):
    """A L{SpillStore} keeping spliced bytes in holds."""

    def setUp(self) -> None:
        self.store = SpillStore(1 << 30, self.mktemp(), holdPipes=True)
        self.addCleanup(self.store.close)

    def spliceAll(self, writer: Any, data: bytes, onWait: Callable[[], None] = lambda: None) -> IStoredImage:
        feeder = Feeder(self, data)
        while True:
            try:
                if not writer.spliceFrom(feeder.fd, MiB):
                    break
            except BlockingIOError:
                onWait()
        feeder.thread.join()
        image: IStoredImage = writer.commit()
        return image

    def test_heldReadSkippedSent(self) -> None:
        """
        A 3.5 MiB image spliced in is held in 4 pipes, no memory file; it
        reads back, from an offset inside a hold, and into a socket, as
        often as asked; released, it gives its memory back.
        """
        data = os.urandom(3 * MiB + MiB // 2)
        image = self.spliceAll(self.store.newWriter(), data)
        self.assertEqual((image.size, self.store._holds, self.store.inMemory), (len(data), 4, len(data)))
        for _ in range(2):
            reader = image.open()
            self.assertTrue(b"".join(iter(lambda: reader.read(300_000), b"")) == data)
            reader.close()
        reader = image.open()
        self.assertEqual(reader.skip(MiB + 12345), MiB + 12345)  # type: ignore[attr-defined]
        self.assertTrue(b"".join(iter(lambda: reader.read(MiB), b"")) == data[MiB + 12345 :])
        reader.close()
        self.assertTrue(self.sendAll(image) == data)
        image.release()
        self.assertEqual((self.store._holds, self.store.inMemory), (0, 0))

    def test_sentIntoLoopbackTCP(self) -> None:
        """Into loopback TCP a held image goes by read and write (see writesFromMapping), not splice."""
        data = os.urandom(2 * MiB + 777)
        image = self.spliceAll(self.store.newWriter(), data)
        server = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(server.close)
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
        self.assertTrue(self.sendAll(image, (a, b)) == data)

    def sendAll(self, image: IStoredImage, pair: tuple[socket.socket, socket.socket] | None = None) -> bytes:
        """The image through C{sendfile} into a socket that takes less than offered at times."""
        a, b = pair or socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        a.setblocking(False)
        reader = image.open()
        got = bytearray()
        while True:
            try:
                sent = reader.sendfile(a.fileno(), 200_000)  # type: ignore[attr-defined]
            except BlockingIOError:
                sent = -1
            b.setblocking(False)
            try:
                while chunk := b.recv(MiB):
                    got += chunk
            except BlockingIOError:
                pass
            if sent == 0:
                break
        reader.close()
        return bytes(got)

    def test_followerSeesSealedHolds(self) -> None:
        """A reader following the write gets a hold's bytes once it is full, the last at commit."""
        data = os.urandom(2 * MiB + 100)
        writer: Any = self.store.newWriter()
        follower: Any = writer.follow()
        seen: list[int] = []
        image = self.spliceAll(writer, data, lambda: seen.append(follower.available))
        self.assertTrue(set(seen) <= {0, MiB, 2 * MiB}, seen)
        self.assertEqual(follower.available, len(data))
        self.assertTrue(b"".join(iter(lambda: follower.read(MiB), b"")) == data)
        follower.close()
        self.assertEqual(image.size, len(data))

    def test_followerLooksAtTheLastHoldOnly(self) -> None:
        """
        Each change a follower hears costs the same however many holds
        came before (it looked at every one: quadratic in the image's size,
        a third of the proxy's CPU on a 512 MiB image); it still reads
        every byte, and what is available adds up.
        """
        data = os.urandom(24 * MiB + 5)
        writer: Any = self.store.newWriter()
        follower: Any = writer.follow()
        looked: list[int] = []
        durable = writer._durable

        def counted(segment: Any) -> int:
            looked.append(1)
            return int(durable(segment))

        writer._durable = counted
        perChange: list[int] = []
        read = bytearray()

        def changed() -> None:
            perChange.append(len(looked))
            looked.clear()
            read.extend(follower.read(4 * MiB))

        follower.onChange = changed
        self.spliceAll(writer, data)
        read.extend(b"".join(iter(lambda: follower.read(MiB), b"")))
        self.assertTrue(read == data)
        self.assertEqual(follower.available, len(data))
        self.assertGreater(len(perChange), 24)
        self.assertLessEqual(max(perChange), 4, perChange)
        follower.close()

    def test_smallImageAsBytes(self) -> None:
        """A small image spliced in ends as bytes, holding no pipe."""
        image = self.spliceAll(self.store.newWriter(), b"core")
        self.assertIsInstance(image, MemoryImage)
        self.assertEqual((self.store._holds, self.store.inMemory), (0, 4))

    def test_writtenBytesAfterHeldOnes(self) -> None:
        """Bytes written (not spliced) after held ones go into a memory file, in order."""
        writer: Any = self.store.newWriter()
        feeder = Feeder(self, b"a" * 100_000)
        while True:
            try:
                if not writer.spliceFrom(feeder.fd, MiB):
                    break
            except BlockingIOError:
                pass
        writer.write(b"b" * 100_000)
        image = writer.commit()
        reader = image.open()
        self.assertTrue(b"".join(iter(lambda: reader.read(MiB), b"")) == b"a" * 100_000 + b"b" * 100_000)
        reader.close()

    def test_pastTheBudgetOnDisk(self) -> None:
        """Holds count against the memory budget: past it, the bytes spill to disk."""
        store = SpillStore(2 * MiB, self.mktemp(), holdPipes=True)
        self.addCleanup(store.close)
        data = os.urandom(3 * MiB + 5)
        image = self.spliceAll(store.newWriter(), data)
        self.assertLessEqual(store.inMemory, 2 * MiB)
        self.assertGreater(store.onDisk, 0)
        self.assertEqual(store.inMemory + store.onDisk, len(data))
        self.assertGreater(store._holds, 0)
        reader = image.open()
        self.assertTrue(b"".join(iter(lambda: reader.read(MiB), b"")) == data)
        reader.close()

    def test_tooManyHoldsThenMemoryFiles(self) -> None:
        """Past the descriptors allowed for holds, spliced bytes go into a memory file."""
        self.patch(spillStore, "maxHolds", lambda: 1)
        data = os.urandom(2 * MiB + 5)
        image = self.spliceAll(self.store.newWriter(), data)
        self.assertEqual(self.store._holds, 1)
        reader = image.open()
        self.assertTrue(b"".join(iter(lambda: reader.read(MiB), b"")) == data)
        reader.close()

    def test_abortGivesAllBack(self) -> None:
        writer: Any = self.store.newWriter()
        feeder = Feeder(self, os.urandom(2 * MiB))
        moved = 0
        while moved < MiB + 1:
            try:
                moved += writer.spliceFrom(feeder.fd, MiB)
            except BlockingIOError:
                pass
        writer.abort()
        while True:  # let the feeder finish
            try:
                if not os.read(feeder.fd, MiB):
                    break
            except BlockingIOError:
                pass
        self.assertEqual((self.store._holds, self.store.inMemory), (0, 0))
