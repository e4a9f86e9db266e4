"""
The paths of bench/datapaths: each moves a whole transfer as a blocking
loop of 1 MiB system calls, in the process the caller forked for it, and
returns what it kept (checked and freed after the timing).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import select
import socket
import struct
import termios
from typing import Any

from bench.datapaths.plumbing import F_SETPIPE_SZ, MADV_POPULATE_WRITE, SPLICE_F_NONBLOCK, Crc, MiB, tee


def newMemfd(size: int = 0) -> int:
    fd = os.memfd_create("datapaths", os.MFD_CLOEXEC)
    if size:
        os.ftruncate(fd, size)
    return fd


class Kept:
    """What a path kept of the bytes (a memfd, or holding pipes): checked and freed after the timing."""

    def __init__(self, memfd: int = -1, size: int = 0, pipes: list[int] | None = None) -> None:
        self.memfd, self.size, self.pipes = memfd, size, pipes or []

    def check(self, verify: bool) -> dict[str, Any]:
        crc = Crc(verify)
        if self.memfd >= 0:
            for i in range(0, self.size if verify else 0, MiB):
                crc.add(os.pread(self.memfd, min(MiB, self.size - i), i))
            os.close(self.memfd)
        for r in self.pipes:
            while verify and (data := os.read(r, MiB)):
                crc.add(data)
            os.close(r)
        return {"keptCrc": crc.value, "holdPipes": len(self.pipes)}


def spliceAll(src: int, dst: int, count: int, flags: int = 0) -> None:
    while count:
        count -= os.splice(src, dst, count, flags=flags)


def proxyMove(kind: str, pipe: int, sock: socket.socket, conn: Any, opts: Any) -> Kept:
    """Move criu's C{pipe} to C{sock} to EOF, the C{kind} way."""
    out = sock.fileno()
    if kind in ("a", "a2"):  # today: into a memfd, then out of it (cut-through: each MiB as it comes)
        fd, moved, window, m = newMemfd(), 0, 32 * MiB, None
        while n := os.splice(pipe, fd, MiB - moved % MiB):  # (never across a window)
            if kind == "a":
                sent = 0
                while sent < n:
                    sent += os.sendfile(out, fd, moved + sent, n - sent)
            else:
                if moved % window == 0 or m is None:
                    if m is not None:
                        m.close()
                    os.ftruncate(fd, moved - moved % window + window)  # (mappable ahead)
                    m = mmap.mmap(fd, window, prot=mmap.PROT_READ, offset=moved - moved % window)
                start = moved % window
                with memoryview(m) as view:
                    sock.sendall(view[start : start + n])
            moved += n
        if m is not None:
            m.close()
            os.ftruncate(fd, moved)
        return Kept(memfd=fd, size=moved)
    if kind == "b":
        while os.splice(pipe, out, MiB, flags=os.SPLICE_F_MORE):
            pass
        return Kept()
    if kind == "c":
        return teeThrough(pipe, out, opts.holdSize)
    buf = bytearray(MiB)
    view = memoryview(buf)
    while n := os.readv(pipe, [buf]):
        if conn is None:
            sock.sendall(view[:n])
            continue
        for i in range(0, n, 1 << 16):  # small writes: a memory BIO grown to a MiB costs more than the cipher
            conn.sendall(view[i : min(n, i + (1 << 16))])
            sock.sendall(conn.bio_read(1 << 18))
    return Kept()


def newHoldingPipe(holdSize: int) -> tuple[int, int, int]:
    """A holding pipe: its read end, its write end, the bytes of room F_SETPIPE_SZ gave it."""
    r, w = os.pipe()
    return r, w, fcntl.fcntl(w, F_SETPIPE_SZ, holdSize)


def teeThrough(pipe: int, out: int, holdSize: int) -> Kept:
    """Keep each page with tee into holding pipes of C{holdSize}, and splice the original to C{out}."""
    holds: list[int] = []
    room = teed = 0
    w = -1
    poller = select.poll()
    poller.register(pipe, select.POLLIN)
    os.set_blocking(pipe, False)
    while True:
        if not teed:
            if not room and poller.poll(0) and _hasBytes(pipe):
                if w >= 0:
                    os.close(w)  # a full holding pipe needs only its read end
                r, w, room = newHoldingPipe(holdSize)
                holds.append(r)
            try:
                teed = tee(pipe, w, min(room, MiB), SPLICE_F_NONBLOCK) if room else 0
            except BlockingIOError:
                if poller.poll(0):  # criu's pipe has bytes: the holding pipe is full
                    room = 0
                else:
                    poller.poll()
                continue
            if not teed:
                if not room:
                    poller.poll()  # bytes, or EOF
                    if poller.poll(0) and _hasBytes(pipe):
                        continue
                break
            room -= teed
        teed -= os.splice(pipe, out, teed, flags=os.SPLICE_F_MORE)
    if w >= 0:
        os.close(w)
    return Kept(pipes=holds)


def _hasBytes(pipe: int) -> bool:
    return struct.unpack("i", fcntl.ioctl(pipe, termios.FIONREAD, b"\0" * 4))[0] > 0


def spliceKeep(sock: socket.socket, holdSize: int) -> Kept:
    """Keep what C{sock} brings as the socket's own pages, spliced into holding pipes (no store at all)."""
    holds: list[int] = []
    w = -1
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    sock.setblocking(False)
    while True:
        if w < 0:
            r, w, _ = newHoldingPipe(holdSize)
            holds.append(r)
        try:
            n = os.splice(sock.fileno(), w, MiB, flags=os.SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        except BlockingIOError:  # the socket is empty, or the holding pipe full
            if poller.poll(0):
                os.close(w)
                w = -1
            else:
                poller.poll()
            continue
        if not n:
            break
    os.close(w)
    return Kept(pipes=holds)


def allocatedMemfd(size: int) -> int:
    """A memfd whose C{size} bytes of pages are already allocated (a pool of store pages, reused)."""
    fd = newMemfd()
    os.posix_fallocate(fd, 0, size)
    return fd


def cacheMove(kind: str, sock: socket.socket, size: int, holdSize: int, pool: int = -1) -> Kept:
    """Store what C{sock} brings (C{size} bytes) in a memfd (C{pool} if given), the C{kind} way."""
    if kind in ("f", "f2"):  # today (f2: into pages allocated beforehand)
        fd, buf = newMemfd() if pool < 0 else pool, bytearray(MiB)
        view = memoryview(buf)
        while n := sock.recv_into(buf):
            os.write(fd, view[:n])
        return Kept(memfd=fd, size=size)
    if kind == "k":
        return spliceKeep(sock, holdSize)
    if kind == "g":
        fd = newMemfd()
        r, w = os.pipe()
        fcntl.fcntl(w, F_SETPIPE_SZ, MiB)
        while n := os.splice(sock.fileno(), w, MiB, flags=os.SPLICE_F_MOVE):
            spliceAll(r, fd, n, os.SPLICE_F_MOVE)
        os.close(r)
        os.close(w)
        return Kept(memfd=fd, size=size)
    fd = newMemfd(size) if pool < 0 else pool  # h2: pages allocated beforehand
    m = mmap.mmap(fd, size)
    view, got, ahead, step = memoryview(m), 0, 0, 8 * MiB
    while got < size:
        while ahead < min(size, got + MiB):
            try:
                m.madvise(MADV_POPULATE_WRITE, ahead, min(step, size - ahead))
            except OSError as e:  # before Linux 5.14: the copy faults them in
                if e.errno != errno.EINVAL:
                    raise
            ahead += step
        n = sock.recv_into(view[got : min(size, got + MiB)])
        if not n:
            break
        got += n
    view.release()
    m.close()
    if got < size:
        raise EOFError(f"{size - got} bytes short")
    return Kept(memfd=fd, size=size)


def serveMove(kind: str, fd: int, out: int, size: int) -> None:
    """Copy C{size} bytes of the memfd C{fd} into the pipe C{out}."""
    offset = 0
    buf = bytearray(MiB)
    while offset < size:
        if kind == "i":  # today
            offset += os.sendfile(out, fd, offset, min(size - offset, MiB))
        else:
            n = os.preadv(fd, [buf], offset)
            os.write(out, memoryview(buf)[: min(n, size - offset)])
            offset += n
