# -*- test-case-name: tests.test_daemons -*-
"""
A blocking client of the local protocol: what C{criu --remote} does.

Used by the tests, the demo and the benchmark; also handy to push or pull
images by hand.  Each operation opens its own connection, like criu.  The
variants:

  - C{pipe}: criu-dev 2020.  Image bytes go through a pipe passed with
    SCM_RIGHTS whenever the snapshot id is not empty; C{parent} and the
    finish use an empty snapshot id.
  - C{seed}: the 2015 seed.  Bytes always flow on the socket; C{parent}
    and the finish use the markers C{null} / C{DUMP_FINISH}.
"""

from __future__ import annotations

import os
import socket
from typing import Iterable, TypeVar

from twisted_criu import wire

PIPE = "pipe"
SEED = "seed"

#: Pipe size criu asks for on large images.
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031


class LocalProtocolError(Exception):
    """The daemon answered something criu would not accept."""


def _recvExactly(sock: socket.socket, n: int) -> bytes:
    parts = []
    while n:
        part = sock.recv(n)
        if not part:
            raise LocalProtocolError("daemon closed the connection early")
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _recvAll(sock: socket.socket) -> bytes:
    parts = []
    while part := sock.recv(1 << 16):
        parts.append(part)
    return b"".join(parts)


def _readAll(fd: int) -> bytes:
    parts = []
    while part := os.read(fd, 1 << 20):
        parts.append(part)
    return b"".join(parts)


def _readFrame(sock: socket.socket) -> bytes:
    """One length-prefixed frame from the daemon (bounded as the daemons bound theirs)."""
    (length,) = wire.U32.unpack(_recvExactly(sock, wire.U32.size))
    if length > wire.MAX_HEADER_LENGTH:
        raise LocalProtocolError(f"reply frame of {length} bytes")
    return _recvExactly(sock, length)


def readReply(sock: socket.socket) -> wire.Reply:
    """The daemon's answer to a read request (C{local_image_reply_entry})."""
    return wire.Reply.fromBytes(_readFrame(sock))


def _writeAll(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _enlarge(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # unprivileged limit: keep the default size


def _passPipe(sock: socket.socket, giveReadEnd: bool) -> int:
    """
    Make a pipe (enlarged, as criu enlarges its own), pass one end over
    C{sock} with SCM_RIGHTS as criu does, and return the other end.
    """
    readEnd, writeEnd = os.pipe()
    _enlarge(writeEnd)
    given, kept = (readEnd, writeEnd) if giveReadEnd else (writeEnd, readEnd)
    try:
        socket.send_fds(sock, [b"\0"], [given])
    except BaseException:
        os.close(kept)
        raise
    finally:
        os.close(given)
    return kept


def passReadEnd(sock: socket.socket) -> int:
    """As C{criu dump}: pass a pipe's read end; returns its write end."""
    return _passPipe(sock, giveReadEnd=True)


def passWriteEnd(sock: socket.socket) -> int:
    """As C{criu restore}: pass a pipe's write end; returns its read end."""
    return _passPipe(sock, giveReadEnd=False)


class _Channel:
    """An image's data channel: the pipe criu passed, or the socket itself."""

    def __init__(self, sock: socket.socket | None, pipeFd: int | None) -> None:
        self._sock = sock
        self._pipe = pipeFd

    @property
    def pipe(self) -> int | None:
        """The pipe's descriptor, if the bytes go through a pipe (and it is open)."""
        return self._pipe

    @property
    def socket(self) -> socket.socket | None:
        """The socket, if the bytes go inline on it (and it is open)."""
        return self._sock

    def close(self) -> None:
        """Close the channel (for a writer: the image ends here)."""
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_C = TypeVar("_C", bound=_Channel)


class ImageWriter(_Channel):
    """
    An image being written: L{write} any number of times, then
    L{close<_Channel.close>}.
    """

    def __init__(self, sock: socket.socket | None, pipeFd: int | None) -> None:
        if pipeFd is not None and sock is not None:
            sock.close()  # criu closes its socket once the pipe is passed
            sock = None
        super().__init__(sock, pipeFd)
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self._pipe is not None:
            _writeAll(self._pipe, data)
        else:
            assert self._sock is not None
            self._sock.sendall(data)


class ImageReader(_Channel):
    """An image being read from the daemon, to EOF."""

    def read(self, size: int = 1 << 20) -> bytes:
        if self._pipe is not None:
            return os.read(self._pipe, size)
        assert self._sock is not None
        return self._sock.recv(size)

    def readAll(self) -> bytes:
        if self._pipe is not None:
            return _readAll(self._pipe)
        assert self._sock is not None
        return _recvAll(self._sock)


class LocalImageClient:
    """
    Talk to C{img-proxy.sock} or C{img-cache.sock} as criu does.

    @param path: the daemon's socket.
    @param variant: L{PIPE} (criu-dev 2020) or L{SEED} (2015).
    @param timeout: seconds a read may wait for the daemon's reply.
    """

    def __init__(self, path: str, variant: str = PIPE, timeout: float | None = None) -> None:
        if variant not in (PIPE, SEED):
            raise ValueError(f"unknown variant {variant!r}")
        self.path = path
        self.variant = variant
        self.timeout = timeout

    @property
    def noSnapshot(self) -> str:
        """The snapshot id of C{parent} and of the finish in this variant."""
        return wire.SEED_NULL_SNAPSHOT if self.variant == SEED else ""

    def _connect(self, name: str, snapshotId: str, mode: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            sock.sendall(wire.LocalRequest(name, snapshotId, mode).toBytes())
        except BaseException:
            sock.close()
            raise
        return sock

    def _usesPipe(self, snapshotId: str) -> bool:
        return self.variant == PIPE and snapshotId != ""

    # -- dump side -------------------------------------------------------------

    def openWrite(self, snapshotId: str, name: str, mode: int = wire.O_WRONLY) -> ImageWriter:
        sock = self._connect(name, snapshotId, mode)
        if not self._usesPipe(snapshotId):
            return ImageWriter(sock, None)
        return ImageWriter(sock, passReadEnd(sock))

    def write(
        self,
        snapshotId: str,
        name: str,
        data: bytes | Iterable[bytes],
        mode: int = wire.O_WRONLY,
    ) -> int:
        """Write a whole image; returns its size."""
        with self.openWrite(snapshotId, name, mode) as writer:
            if isinstance(data, (bytes, bytearray, memoryview)):
                writer.write(data)
            else:
                for chunk in data:
                    writer.write(chunk)
        return writer.size

    def append(self, snapshotId: str, name: str, data: bytes) -> int:
        return self.write(snapshotId, name, data, wire.O_APPEND)

    def pushSnapshotId(self, snapshotId: str) -> None:
        """Append C{snapshotId} to C{parent}, as every dump starts by doing."""
        self.append(self.noSnapshot, wire.PARENT_IMAGE, wire.encodeSnapshotId(snapshotId))

    def finishDump(self) -> None:
        """Tell the proxy no more images will come."""
        self._finish(wire.O_WRONLY)

    # -- restore side ----------------------------------------------------------

    def openRead(self, snapshotId: str, name: str) -> ImageReader | None:
        """Ask for an image; L{None} if the daemon says ENOENT."""
        sock = self._connect(name, snapshotId, wire.O_RDONLY)
        try:
            reply = readReply(sock)
        except BaseException:
            sock.close()
            raise
        if reply.error == wire.ENOENT:
            sock.close()
            return None
        if reply.error:
            sock.close()
            raise LocalProtocolError(f"daemon answered error {reply.error}")
        sock.settimeout(None)
        if not self._usesPipe(snapshotId):
            return ImageReader(sock, None)
        try:
            return ImageReader(None, passWriteEnd(sock))
        finally:
            sock.close()

    def read(self, snapshotId: str, name: str) -> bytes | None:
        """A whole image, or L{None} if it does not exist."""
        reader = self.openRead(snapshotId, name)
        if reader is None:
            return None
        with reader:
            return reader.readAll()

    def snapshotIds(self) -> list[str]:
        """The C{parent} list: every snapshot id pushed so far, in order."""
        data = self.read(self.noSnapshot, wire.PARENT_IMAGE)
        return [] if data is None else wire.decodeSnapshotIds(data)

    def finishRestore(self) -> None:
        """Tell the cache the restore is over; waits for it to close."""
        self._finish(wire.O_RDONLY)

    def _finish(self, mode: int) -> None:
        if self.variant == SEED:
            name, snapshotId = wire.SEED_DUMP_FINISH, wire.SEED_NULL_SNAPSHOT
        else:
            name, snapshotId = "", ""
        sock = self._connect(name, snapshotId, mode)
        try:
            if mode == wire.O_RDONLY:
                extra = _recvAll(sock)
                if extra:
                    raise LocalProtocolError(f"{len(extra)} bytes after the finish")
        finally:
            sock.close()


class StreamClient:
    """
    Talk to C{streamer-capture.sock} / C{streamer-serve.sock} as
    C{criu --stream} does: one connection for the whole run.
    """

    def __init__(self, path: str, timeout: float | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def _connection(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def openWrite(self, filename: str) -> ImageWriter:
        """Dump side: announce C{filename} and hand over a pipe for it."""
        sock = self._connection()
        sock.sendall(wire.StreamRequest(filename).toBytes())
        return ImageWriter(None, passReadEnd(sock))

    def write(self, filename: str, data: bytes) -> None:
        with self.openWrite(filename) as writer:
            writer.write(data)

    def openRead(self, filename: str) -> ImageReader | None:
        """Restore side: ask for C{filename}; L{None} if it does not exist."""
        sock = self._connection()
        sock.sendall(wire.StreamRequest(filename).toBytes())
        if not wire.StreamReply.fromBytes(_readFrame(sock)).exists:
            return None
        return ImageReader(None, passWriteEnd(sock))

    def read(self, filename: str) -> bytes | None:
        reader = self.openRead(filename)
        if reader is None:
            return None
        with reader:
            return reader.readAll()

    def close(self) -> None:
        """End the run, as criu does by closing its connection."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
