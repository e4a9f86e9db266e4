"""
The pieces of bench/datapaths.py: the syscalls Python lacks (vmsplice,
tee), the stamped bytes, the per-process meter, the far ends (criu's
feeder, the discarding receiver, criu restore's reader) and the paths
themselves, each a blocking loop in its own process.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import mmap
import os
import random
import resource
import select
import socket
import statistics
import struct
import sys
import tempfile
import termios
import time
import zlib
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted_criu.twistd.parsers import parseSize  # noqa: E402

GB = 1e9
MiB = 1 << 20
PAGE = mmap.PAGESIZE
F_SETPIPE_SZ = 1031
TCP_ULP = 31
MADV_POPULATE_WRITE = 23
SPLICE_F_NONBLOCK = 2
_libc = ctypes.CDLL(None, use_errno=True)


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _check(n: int) -> int:
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return n


def vmsplice(fd: int, address: int, length: int) -> int:
    """vmsplice(2) C{length} bytes at C{address} into the pipe C{fd} (no gift)."""
    _libc.vmsplice.restype = ctypes.c_ssize_t
    iov = _IOVec(address, length)
    return _check(_libc.vmsplice(fd, ctypes.byref(iov), ctypes.c_ulong(1), ctypes.c_uint(0)))


def tee(src: int, dst: int, length: int, flags: int = 0) -> int:
    """tee(2): duplicate up to C{length} bytes of pipe C{src} into pipe C{dst}."""
    _libc.tee.restype = ctypes.c_ssize_t
    return _check(_libc.tee(src, dst, ctypes.c_size_t(length), ctypes.c_uint(flags)))


def addressOf(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


# -- the bytes -------------------------------------------------------------

_BASE = random.Random(13).randbytes(MiB)


def block(i: int) -> bytes:
    """The C{i}th MiB of every stream: random, stamped with its index."""
    return struct.pack("<Q", i) + _BASE[8:]


def fill(m: Any, size: int) -> None:
    for i in range(0, size, MiB):
        m[i : min(size, i + MiB)] = block(i // MiB)[: min(MiB, size - i)]


def expectedCrc(size: int) -> int:
    crc = 0
    for i in range(0, size, MiB):
        crc = zlib.crc32(block(i // MiB)[: min(MiB, size - i)], crc)
    return crc


# -- measuring one process ---------------------------------------------------


class Meter:
    """getrusage of this process around the transfer, and when it ran."""

    def start(self) -> None:
        with open("/proc/self/status") as f:
            self.rss0 = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        self.t0, self.r0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)

    def result(self, **extra: Any) -> dict[str, Any]:
        t1, r1 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
        return dict(t0=self.t0, t1=t1, user=r1.ru_utime - self.r0.ru_utime, sys=r1.ru_stime - self.r0.ru_stime,
                    maxrssKiB=r1.ru_maxrss, startRssKiB=self.rss0, **extra)


def softirq() -> list[float]:
    """Per CPU irq+softirq seconds from /proc/stat."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        rows = [line.split() for line in f if line.startswith("cpu") and line[3] != " "]
    return [(int(r[6]) + int(r[7])) / hz for r in rows]


class Crc:
    def __init__(self, on: bool) -> None:
        self.on, self.value = on, 0

    def add(self, data: Any) -> None:
        if self.on:
            self.value = zlib.crc32(data, self.value)


def spawn(job: Callable[[], dict[str, Any]], cpu: int | None, close: list[int], ready: int) -> tuple[int, int]:
    """
    Fork C{job} (closing C{close} in the child); its result comes back as
    JSON on the returned pipe.  A job that fails writes C{!} to C{ready}.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            for fd in close:
                os.close(fd)
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            out = job()
        except BaseException as e:
            out, code = {"error": f"{type(e).__name__}: {e}"}, 1
            os.write(ready, b"!")
        os.write(w, json.dumps(out).encode())
        os._exit(code)
    os.close(w)
    return pid, r


def collect(pid: int, r: int) -> dict[str, Any]:
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    out: dict[str, Any] = json.loads(b"".join(chunks) or b'{"error": "no result"}')
    return out


def signal(fd: int) -> None:
    os.write(fd, b"x")


def wait(fd: int) -> None:
    if os.read(fd, 1) != b"x":
        raise RuntimeError("the run was abandoned")


# -- TLS (path e) ----------------------------------------------------------


def tlsConnection(server: bool) -> Any:
    """A pyOpenSSL memory-BIO TLS 1.3 connection, AES-128-GCM, with the link key's certificate."""
    from OpenSSL import SSL

    from twisted_criu.link.key import loadKey

    with tempfile.TemporaryDirectory() as d:
        key = loadKey(os.path.join(d, "link.key"), create=True)
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_tls13_ciphersuites(b"TLS_AES_128_GCM_SHA256")
    ctx.use_certificate(key.certificate.original)
    ctx.use_privatekey(key.certificate.privateKey.original)
    conn = SSL.Connection(ctx, None)
    (conn.set_accept_state if server else conn.set_connect_state)()
    return conn


def handshake(conn: Any, sock: socket.socket) -> None:
    from OpenSSL import SSL

    while True:
        try:
            conn.do_handshake()
            done = True
        except SSL.WantReadError:
            done = False
        try:
            out = conn.bio_read(1 << 16)
            sock.sendall(out)
        except SSL.WantReadError:
            pass
        if done:
            return
        data = sock.recv(1 << 16)
        if not data:
            raise EOFError("the peer left during the handshake")
        conn.bio_write(data)


# -- the far ends ------------------------------------------------------------


def discardSink(listener: socket.socket, ready: int, tls: bool, verify: bool) -> dict[str, Any]:
    """Accept one connection and discard it with recv_into a reused buffer (decrypting if C{tls})."""
    sock, _ = listener.accept()
    conn = None
    if tls:
        conn = tlsConnection(True)
        handshake(conn, sock)
    signal(ready)
    buf, clear = bytearray(MiB), bytearray(MiB)
    view, clearView = memoryview(buf), memoryview(clear)
    crc, meter, total, started = Crc(verify), Meter(), 0, False
    from OpenSSL import SSL  # noqa: F401 - imported before timing

    while True:
        n = sock.recv_into(buf)
        if not started:
            meter.start()
            started = True
        if not n:
            break
        if conn is None:
            crc.add(view[:n])
            total += n
            continue
        conn.bio_write(view[:n])
        while True:
            try:
                m = conn.recv_into(clear)
            except (SSL.WantReadError, SSL.ZeroReturnError):
                break
            crc.add(clearView[:m])
            total += m
    return meter.result(bytes=total, crc=crc.value)


def pipeSink(fd: int, verify: bool) -> dict[str, Any]:
    """Read a pipe to EOF into a reused buffer (criu restore's side)."""
    buf = bytearray(MiB)
    view = memoryview(buf)
    crc, meter, total, started = Crc(verify), Meter(), 0, False
    while True:
        n = os.readv(fd, [buf])
        if not started:
            meter.start()
            started = True
        if not n:
            break
        crc.add(view[:n])
        total += n
    return meter.result(bytes=total, crc=crc.value)


def criuFeeder(pipe: int, size: int, ready: int) -> dict[str, Any]:
    """criu: pre-touch C{size} bytes of anonymous memory, then vmsplice them into C{pipe}."""
    m = mmap.mmap(-1, size)
    fill(m, size)
    base = addressOf(m)
    signal(ready)
    meter = Meter()
    meter.start()
    done = 0
    while done < size:
        done += vmsplice(pipe, base + done, min(size - done, 1 << 20))
    os.close(pipe)
    return meter.result()


def tcpFeeder(port: int, size: int, ready: int, go: int) -> dict[str, Any]:
    """The proxy, for the cache's paths: send C{size} bytes from a pre-touched mapping."""
    m = mmap.mmap(-1, size)
    fill(m, size)
    sock = socket.create_connection(("127.0.0.1", port))
    signal(ready)
    wait(go)
    meter = Meter()
    meter.start()
    view = memoryview(m)
    for i in range(0, size, MiB):
        sock.sendall(view[i : i + MiB])
    sock.close()
    return meter.result()


# -- the paths ---------------------------------------------------------------


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


def cipherCost(size: int) -> float:
    """CPU-seconds per GB of AES-128-GCM alone (OpenSSL through cryptography, 1 MiB at a time into a reused buffer)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    encryptor = Cipher(algorithms.AES(os.urandom(16)), modes.GCM(os.urandom(12))).encryptor()
    data, out = bytearray(_BASE), bytearray(MiB + 16)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(0, size, MiB):
        encryptor.update_into(data, out)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / (size / GB)
