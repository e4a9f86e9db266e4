"""The store test-suite: one mixin, run against every backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twisted_criu.interfaces import IImageReader, IImageStore, IImageWriter, IStoredImage
from twisted_criu.registry import readAll
from twisted_criu.storage.memory import MemoryStore


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

    def test_writeAcceptsBuffers(self) -> None:
        buffer = bytearray(b"abc")
        writer = self.store.newWriter()
        writer.write(buffer)  # type: ignore[arg-type]
        buffer[:] = b"zzz"  # reused buffers must not change stored bytes
        self.assertEqual(readAll(writer.commit()), b"abc")


class MemoryStoreTests(StoreTestsMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MemoryStore()
