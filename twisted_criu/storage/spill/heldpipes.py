# -*- test-case-name: tests.test_heldpipes -*-
"""
Image bytes held in pipes, as criu handed them over: the proxy's copy of
what criu splices to it, without copying a byte.

criu's image pipes carry page references (its parasite C{vmsplice}s the
dumped process's pages).  C{splice(2)} from criu's pipe into a pipe of our
own (a I{hold}) moves those references; C{tee(2)} duplicates them into a
reader's scratch pipe, from which the reader takes the bytes, leaving the
hold as it was for the next reader.  The pages stay in memory while a
hold has them (they count against C{--memory-limit} like a memfd's), and
are freed when the last descriptor of the hold is closed.

A hold is sealed (its write end closed) once full, or when its image is
complete; only sealed holds are read.  Linux lets a pipe grow to
C{/proc/sys/fs/pipe-max-size} (1 MiB by default): L{HOLD_SIZE}.

Steps outside the standard library: C{tee(2)} through C{ctypes} (Python
has C{os.splice} but no C{tee}); L{available} says whether it works here.
C{tests.test_heldpipes} pins both against real pipes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import sys
import termios

from twisted_criu.flow.pipes import enlargePipe

#: Bytes a hold takes before it is sealed (as large as a pipe may grow).
HOLD_SIZE = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_tee = getattr(_libc, "tee", None)
if _tee is not None:
    _tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
    _tee.restype = ctypes.c_ssize_t


def tee(source: int, target: int, count: int) -> int:
    """C{tee(2)}: duplicate up to C{count} bytes at the head of pipe C{source} into pipe C{target}."""
    if _tee is None:
        raise OSError(errno.ENOSYS, "tee(2) is not available")
    n = int(_tee(source, target, count, os.SPLICE_F_NONBLOCK))
    if n < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return n


def pending(fd: int) -> int:
    """Bytes waiting in the pipe C{fd}."""
    buffer = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buffer)
    return int.from_bytes(buffer, sys.byteorder)


def newPipe() -> tuple[int, int] | None:
    """A non-blocking pipe of L{HOLD_SIZE} (read end, write end); L{None} if it cannot grow that large."""
    readEnd, writeEnd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    if enlargePipe(writeEnd, HOLD_SIZE) < HOLD_SIZE:
        os.close(readEnd)
        os.close(writeEnd)
        return None
    return readEnd, writeEnd


def available() -> bool:
    """Can this process hold bytes in pipes (C{tee} there, pipes of L{HOLD_SIZE} granted)?"""
    pipe = newPipe()
    if pipe is None:
        return False
    other = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.write(pipe[1], b"x")
        return tee(pipe[0], other[1], 1) == 1
    except OSError:
        return False
    finally:
        for fd in (*pipe, *other):
            os.close(fd)


class HeldCopy:
    """
    A reader's view of one sealed hold at a time: L{load} tees the hold's
    bytes into this reader's scratch pipe, L{read} and L{discard} take them
    from there in order.
    """

    def __init__(self) -> None:
        self._scratch: tuple[int, int] | None = None
        self.left = 0

    def load(self, hold: int, size: int) -> None:
        """Take a copy of the C{size} bytes of the sealed hold C{hold} (the last copy must be used up)."""
        assert not self.left, "the previous hold is not used up"
        if self._scratch is None:
            scratch = newPipe()
            if scratch is None:
                raise OSError(errno.ENOMEM, "no pipe large enough for a held image")
            self._scratch = scratch
        # One call: a second tee would copy from the hold's start again.
        copied = tee(hold, self._scratch[1], size) if size else 0
        if copied != size:
            self.close()  # (a part copied would be read as the next bytes)
            raise OSError(errno.EIO, f"a held pipe gave {copied} of its {size} bytes")
        self.left = size

    def read(self, count: int) -> bytes:
        """Up to C{count} of the loaded bytes, in order."""
        assert self._scratch is not None
        data = os.read(self._scratch[0], min(count, self.left))
        self.left -= len(data)
        return data

    def spliceTo(self, out: int, count: int) -> int:
        """Move up to C{count} of the loaded bytes into C{out} without copying them (L{BlockingIOError} if full)."""
        assert self._scratch is not None
        moved = os.splice(self._scratch[0], out, min(count, self.left), flags=os.SPLICE_F_NONBLOCK)
        self.left -= moved
        return moved

    def discard(self, count: int) -> None:
        """Drop the next C{count} loaded bytes."""
        while count:
            count -= len(self.read(min(count, HOLD_SIZE)))

    def close(self) -> None:
        scratch, self._scratch = self._scratch, None
        self.left = 0
        if scratch is not None:
            os.close(scratch[0])
            os.close(scratch[1])
