# -*- test-case-name: tests.test_storage -*-
"""Keep every image in memory, as the chunks it arrived in."""

from __future__ import annotations

from typing import Protocol

from zope.interface import implementer

from twisted_criu.interfaces import IImageReader, IImageStore, IImageWriter, ISkippingReader, IStoredImage


@implementer(ISkippingReader)
class _ChunkReader:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks
        self._index = 0
        self._offset = 0

    def read(self, size: int) -> bytes:
        if self._index >= len(self._chunks):
            return b""
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

    def skip(self, count: int) -> int:
        skipped = 0
        while skipped < count and self._index < len(self._chunks):
            n = min(count - skipped, len(self._chunks[self._index]) - self._offset)
            skipped += n
            self._offset += n
            if self._offset >= len(self._chunks[self._index]):
                self._index += 1
                self._offset = 0
        return skipped

    def close(self) -> None:
        self._index = len(self._chunks)


class CountsMemory(Protocol):
    """A store that counts the image bytes it holds in memory."""

    inMemory: int


@implementer(IStoredImage)
class MemoryImage:
    """An immutable image made of the chunks it was written in."""

    def __init__(self, chunks: list[bytes], size: int, store: CountsMemory | None = None) -> None:
        self._chunks = chunks
        self.size = size
        self._store = store

    def open(self) -> IImageReader:
        return _ChunkReader(self._chunks)

    def release(self) -> None:
        if self._chunks and self._store is not None:
            self._store.inMemory -= self.size
        self._chunks = []

    def chunks(self) -> list[bytes]:
        return list(self._chunks)


@implementer(IImageWriter)
class _MemoryWriter:
    def __init__(self, chunks: list[bytes], store: MemoryStore) -> None:
        self._chunks = chunks
        self._store = store
        self.size = sum(len(c) for c in chunks)
        store.inMemory += self.size

    def write(self, data: bytes | memoryview) -> None:
        if data:
            self._chunks.append(bytes(data))
            self.size += len(data)
            self._store.inMemory += len(data)

    def commit(self) -> IStoredImage:
        return MemoryImage(self._chunks, self.size, self._store)

    def abort(self) -> None:
        self._store.inMemory -= self.size
        self._chunks = []
        self.size = 0


@implementer(IImageStore)
class MemoryStore:
    """
    An unbounded in-memory store.  Chunks are kept as received and never
    joined, so storing costs no copies beyond the socket read.

    @ivar inMemory: bytes held (written and not yet released).
    """

    def __init__(self) -> None:
        self.inMemory = 0

    def newWriter(self, base: IStoredImage | None = None) -> IImageWriter:
        chunks: list[bytes] = []
        if base is not None:
            reader = base.open()
            while chunk := reader.read(1 << 20):
                chunks.append(chunk)
            reader.close()
        return _MemoryWriter(chunks, self)

    def close(self) -> None:
        pass

    def room(self) -> int | None:
        return None
