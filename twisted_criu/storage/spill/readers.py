# -*- test-case-name: tests.test_storage,tests.test_pacing -*-
"""Reading stored images: memfd and spill-file segments, front to back, as bytes or into a descriptor."""

from __future__ import annotations

import ipaddress
import mmap
import os
import socket
from concurrent.futures import Future

from twisted.internet.defer import Deferred
from zope.interface import implementer

from twisted_criu.interfaces import IKernelSource, ISkippingReader
from twisted_criu.storage.spill.diskio import BLOCK, DISK, HELD, STAGE_SIZE, _closeBuffers, _DiskIO, _Segment
from twisted_criu.storage.spill.heldpipes import HOLD_SIZE, HeldCopy


#: Bytes of a memfd mapped at a time to write them into a loopback TCP
#: socket (see L{writesFromMapping}).
SOCKET_WINDOW = 32 << 20


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


@implementer(IKernelSource, ISkippingReader)
class _SpillReader:
    """
    Reads an image's runs in order: memfd runs with C{pread}, C{sendfile},
    or C{write} from a mapped window (see L{writesFromMapping}), spill
    files in aligned blocks (direct I/O) into buffers of its own, the next
    block read ahead by the store's I/O thread (L{whenReadable} says when
    it is in), holds by a copy of their page references (L{HeldCopy}).
    """

    def __init__(self, segments: list[_Segment], io: _DiskIO) -> None:
        # Our own descriptors, so the bytes outlive a release during the read.
        self._runs: list[tuple[int, int, int]] = []  # descriptor, size, kind
        try:
            for segment in segments:
                self._runs.append((os.dup(segment.fd), segment.size, segment.kind))
        except OSError:  # no descriptor left (EMFILE): none of ours stays open
            for fd, _, _ in self._runs:
                os.close(fd)
            raise
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
        self._held = HeldCopy()
        self._heldRun = -1  # the run whose copy L{_held} has

    def _current(self) -> tuple[int, int, int] | None:
        while self._index < len(self._runs):
            fd, size, kind = self._runs[self._index]
            if self._offset < size:
                return fd, size - self._offset, kind
            if self._lastMayGrow and self._index == len(self._runs) - 1:
                return None
            self._index += 1
            self._offset = 0
        return None

    def _readInto(self, which: int, fd: int, offset: int) -> Future[int]:
        """Read a whole buffer (the file ends at the run's end) on the I/O thread."""
        return self._io.submit(_preadInto, fd, self._buffers[which], offset)

    def _readAt(self, fd: int) -> Future[int]:
        """
        The read of the spill file C{fd} at the read position: the
        read-ahead if it is that one, else a new one.  Kept as the
        read-ahead until L{_staged} takes it.
        """
        if not self._buffers:
            self._buffers = [mmap.mmap(-1, STAGE_SIZE) for _ in range(2)]
        ahead = self._ahead
        if ahead is not None and ahead[1:] == (fd, self._offset):
            return ahead[0]
        if ahead is not None:
            ahead[0].exception()  # a stale read-ahead: let it finish
        reading = self._readInto(1, fd, self._offset)
        self._ahead = (reading, fd, self._offset)
        return reading

    def whenReadable(self) -> Deferred[None] | None:
        """
        L{None} if the next bytes are at hand (in memory, or read from the
        disk already); else a L{Deferred} fired once the disk delivered
        them.  Without a reactor to tell, always L{None} (L{sendfile} waits).
        """
        current = self._current()
        callFromThread = self._io.callFromThread
        if current is None or self._pending or current[2] != DISK or callFromThread is None:
            return None
        reading = self._readAt(current[0])
        if reading.done():
            return None
        readable: Deferred[None] = Deferred()
        reading.add_done_callback(lambda _: callFromThread(lambda: readable.callback(None)))
        return readable

    def _staged(self, fd: int, left: int) -> memoryview:
        """Bytes of the current spill file at the read position (waiting for the disk)."""
        if self._pending:
            return self._pending
        reading = self._readAt(fd)
        self._ahead = None
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

    def _copyOfHold(self, fd: int) -> HeldCopy:
        """The current run's hold, copied (at its start) if it was not yet."""
        if self._heldRun != self._index:
            assert self._offset == 0
            self._held.load(fd, self._runs[self._index][1])
            self._heldRun = self._index
        return self._held

    def _heldStaged(self, fd: int, left: int) -> memoryview:
        """Bytes of the current hold at the read position."""
        if not self._pending:
            self._pending = memoryview(self._copyOfHold(fd).read(min(left, HOLD_SIZE)))
        return self._pending

    def read(self, size: int) -> bytes:
        current = self._current()
        if current is None:
            return b""
        fd, left, kind = current
        if kind == DISK:
            chunk = bytes(self._staged(fd, left)[:size])
        elif kind == HELD:
            if self._pending:
                chunk = bytes(self._pending[:size])
            else:
                chunk = self._copyOfHold(fd).read(min(size, left))
        else:
            chunk = os.pread(fd, min(size, left), self._offset)
        self._consumed(len(chunk))
        return chunk

    def skip(self, count: int) -> int:
        """Move on C{count} bytes (fewer at the end): only before the first read."""
        assert not self._pending and self._ahead is None, "skip before reading"
        skipped = 0
        while skipped < count:
            current = self._current()
            if current is None:
                break
            fd, left, kind = current
            n = min(left, count - skipped)
            if kind == HELD and n < left:  # its copy, less what is skipped
                self._copyOfHold(fd).discard(n)
                self._offset += n
                skipped += n
                break
            if kind == DISK and n < left:  # direct I/O: to a block boundary, then read the rest
                target = self._offset + n
                aligned = target - target % BLOCK
                skipped += aligned - self._offset
                self._offset = aligned
                if target > aligned:
                    skipped += len(self.read(target - aligned))
                break  # (it ends inside this run)
            self._offset += n
            skipped += n
        return skipped

    def sendfile(self, out: int, count: int) -> int:
        """
        Copy up to C{count} bytes into the descriptor C{out}; 0 at the end
        of the image.  May raise L{BlockingIOError} (C{out} is full); waits
        for the disk unless L{whenReadable} was heeded.
        """
        current = self._current()
        if current is None:
            return 0
        fd, left, kind = current
        if kind == DISK:
            sent = os.write(out, self._staged(fd, left)[:count])
        elif kind == HELD:
            if self._pending or self._fromMapping(out):  # (loopback TCP: see writesFromMapping)
                sent = os.write(out, self._heldStaged(fd, left)[:count])
            else:
                sent = self._copyOfHold(fd).spliceTo(out, min(count, left))
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
        self._held.close()
        _closeBuffers(self._buffers)
        self._buffers = []
