"""
The plumbing of bench/datapaths: the syscalls Python lacks (vmsplice,
tee), the stamped bytes, the per-process meter and fork, TLS, and the far
ends (criu's feeder, the discarding receiver, criu restore's reader).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import resource
import socket
import struct
import tempfile
import time
import zlib
from typing import Any, Callable

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
