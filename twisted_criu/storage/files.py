# -*- test-case-name: tests.test_chains -*-
"""Images that are files already on disk (what C{criu dump -D DIR} wrote)."""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from zope.interface import implementer

from twisted_criu.interfaces import IImageReader, IKernelSource, ISkippingReader, IStoredImage


@implementer(IKernelSource, ISkippingReader)
class _FileReader:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._offset = 0

    def read(self, size: int) -> bytes:
        chunk = os.pread(self._fd, size, self._offset)
        self._offset += len(chunk)
        return chunk

    def skip(self, count: int) -> int:
        skipped = max(0, min(count, os.fstat(self._fd).st_size - self._offset))
        self._offset += skipped
        return skipped

    def whenReadable(self) -> Deferred[None] | None:
        return None  # the kernel reads the file in sendfile

    def sendfile(self, out: int, count: int) -> int:
        """Copy up to C{count} bytes into C{out} in the kernel; 0 at the end."""
        sent = os.sendfile(out, self._fd, self._offset, count)
        self._offset += sent
        return sent

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


@implementer(IStoredImage)
class FileImage:
    """
    An image file, read in place.  Its size is taken when it is found; the
    link refuses to send it if the file changed size since.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = os.stat(path).st_size

    def open(self) -> IImageReader:
        return _FileReader(self.path)

    def release(self) -> None:
        pass
