# -*- test-case-name: tests.test_traces -*-
"""
Replaying a loaded L{Trace} against real daemons, the way criu did, with
L{LocalImageClient}:

  - dump legs: each write is opened (header sent, pipe passed) when criu
    connected, and its data is written and the pipe closed where the trace
    saw that pipe's EOF, so transfers overlap as they did.  Data of writes
    still open when the FINISH comes is written before the FINISH and their
    pipes are closed after it, as criu did.
  - every leg: each read is made where criu made it; the reply must be the
    recorded one (ENOENT where the recorder answered error 2), and the
    bytes must be what this replay wrote (or, for C{parent}, what the
    recorder sent criu).  A read that criu abandoned is abandoned too.

Everything that blocks has a deadline: a stalled daemon raises
L{ReplayTimeout} rather than hanging the caller.
"""

from __future__ import annotations

import os
import select
import socket
from typing import Iterable

from attrs import Factory, define, frozen

from twisted_criu import wire
from twisted_criu.keys import ImageKey
from twisted_criu.testing.criu import ImageReader, ImageWriter, LocalImageClient
from twisted_criu.testing.traces import Connection, Leg, Op, StepKind, Trace, sha256

#: Bytes written to a pipe per system call.
WRITE_CHUNK = 1 << 20


class ReplayTimeout(Exception):
    """A daemon made no progress within the replay's timeout."""


@frozen
class ReadOutcome:
    """
    What one replayed read got, next to what criu got.

    @ivar expectedSha256: the bytes this read must return (C{None} if it
        must fail, or if criu abandoned it before reading).
    @ivar recordedSha256: the hash the trace recorded for the bytes; only
        comparable when the replay wrote the published bytes.
    @ivar snapshotIds: for C{parent}, the list it returned; and the list
        criu got in C{expectedSnapshotIds}.
    """

    leg: str
    conn: int
    key: ImageKey
    expectedError: int
    error: int
    expectedSha256: str | None
    sha256: str | None
    size: int | None
    recordedSha256: str | None = None
    snapshotIds: tuple[str, ...] | None = None
    expectedSnapshotIds: tuple[str, ...] | None = None

    def problem(self) -> str | None:
        """Why this read differs from the recording, or L{None}."""
        where = f"{self.leg}#{self.conn} read {'/'.join(filter(None, self.key))}"
        if self.error != self.expectedError:
            return f"{where}: reply {self.error}, criu got {self.expectedError}"
        if self.snapshotIds != self.expectedSnapshotIds:
            return f"{where}: {self.snapshotIds}, criu got {self.expectedSnapshotIds}"
        if self.expectedSha256 is not None and self.sha256 != self.expectedSha256:
            return f"{where}: {self.size} bytes with sha256 {self.sha256}, expected {self.expectedSha256}"
        if self.recordedSha256 is not None and self.sha256 != self.recordedSha256:
            return f"{where}: sha256 {self.sha256}, the trace has {self.recordedSha256}"
        return None


@define
class LegOutcome:
    """What replaying one leg did."""

    leg: str
    reads: list[ReadOutcome] = Factory(list)
    written: dict[ImageKey, str] = Factory(dict)

    def problems(self) -> list[str]:
        return [p for p in (r.problem() for r in self.reads) if p is not None]


def _waitFor(fd: int, writing: bool, timeout: float, what: str) -> None:
    ready = select.select([], [fd], [], timeout) if writing else select.select([fd], [], [], timeout)
    if not any(ready):
        raise ReplayTimeout(f"{what}: no progress for {timeout} s")


def _writePipe(fd: int, data: bytes, timeout: float, what: str) -> None:
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        _waitFor(fd, True, timeout, what)
        try:
            view = view[os.write(fd, view[:WRITE_CHUNK]) :]
        except BlockingIOError:
            continue


def _readPipe(fd: int, timeout: float, what: str) -> bytes:
    parts: list[bytes] = []
    while True:
        _waitFor(fd, False, timeout, what)
        part = os.read(fd, 1 << 20)
        if not part:
            return b"".join(parts)
        parts.append(part)


class TraceReplay:
    """
    Plays the legs of a L{Trace} against a proxy and a cache.

    Use from a thread other than the daemons' reactor thread: every step
    blocks until the daemon has dealt with it (or C{timeout} passes).

    @ivar written: the bytes this replay wrote, by image, across legs.
    """

    def __init__(self, trace: Trace, timeout: float = 20.0) -> None:
        self.trace = trace
        self.timeout = timeout
        self.written: dict[ImageKey, bytes] = {}

    def replayDump(self, proxySocket: str, leg: Leg) -> LegOutcome:
        """Play one dump leg on the proxy's C{img-proxy.sock}."""
        return self._replay(LocalImageClient(proxySocket, timeout=self.timeout), leg)

    def replayRestore(self, cacheSocket: str) -> LegOutcome:
        """Play the restore on the cache's C{img-cache.sock}."""
        client = LocalImageClient(cacheSocket, timeout=self.timeout)
        return self._replay(client, self.trace.restore)

    def replayAll(self, proxySocket: str, cacheSocket: str) -> list[LegOutcome]:
        """Every dump leg, then the restore."""
        outcomes = [self.replayDump(proxySocket, leg) for leg in self.trace.dumps]
        return outcomes + [self.replayRestore(cacheSocket)]

    def verifyHeld(self, socketPath: str, keys: Iterable[ImageKey]) -> LegOutcome:
        """
        Read back images this replay wrote from a daemon (reads do not
        consume them), expecting exactly the bytes written.
        """
        client = LocalImageClient(socketPath, timeout=self.timeout)
        outcome = LegOutcome("held")
        for number, (snapshotId, name) in enumerate(keys, 1):
            wanted = Connection(number, Op.READ, snapshotId, name, wire.O_RDONLY, b"", reply=0)
            outcome.reads.append(self._read(client, outcome.leg, wanted))
        return outcome

    # -- the schedule --------------------------------------------------------

    def _replay(self, client: LocalImageClient, leg: Leg) -> LegOutcome:
        outcome = LegOutcome(leg.name)
        writers: dict[int, ImageWriter] = {}
        flushed: set[int] = set()
        try:
            for step in leg.steps:
                conn = leg.connections[step.conn]
                if step.kind is StepKind.OPEN:
                    writers[conn.conn] = client.openWrite(conn.snapshotId, conn.name, conn.openMode)
                elif step.kind is StepKind.CLOSE:
                    writer = writers.pop(conn.conn)
                    if conn.conn not in flushed:
                        self._writeData(writer, conn, outcome)
                    writer.close()
                elif step.kind is StepKind.READ:
                    outcome.reads.append(self._read(client, leg.name, conn))
                else:
                    for number, writer in writers.items():
                        self._writeData(writer, leg.connections[number], outcome)
                        flushed.add(number)
                    self._finish(client, conn)
        finally:
            for writer in writers.values():
                writer.close()
        return outcome

    def _dataFor(self, conn: Connection) -> bytes:
        if conn.op is Op.APPEND:
            assert conn.payload is not None
            return conn.payload
        return self.trace.images[conn.key].data

    def _writeData(self, writer: ImageWriter, conn: Connection, outcome: LegOutcome) -> None:
        data = self._dataFor(conn)
        pipe = _pipeOf(writer)
        if pipe is None:
            writer.write(data)  # inline: a socket with the client's timeout
        else:
            _writePipe(pipe, data, self.timeout, f"writing {conn.key}")
        if conn.op is Op.APPEND:
            data = self.written.get(conn.key, b"") + data
        self.written[conn.key] = data
        outcome.written[conn.key] = sha256(data)

    def _finish(self, client: LocalImageClient, conn: Connection) -> None:
        if conn.openMode == wire.O_RDONLY:
            client.finishRestore()
        else:
            client.finishDump()

    def _expectedSha256(self, conn: Connection) -> str | None:
        if conn.reply != 0 or conn.closedEarly:
            return None
        if conn.snapshotId == "" and conn.payload is not None:
            return sha256(conn.payload)  # parent: what the recorder sent criu
        data = self.written.get(conn.key)
        return conn.sha256 if data is None else sha256(data)

    def _recordedSha256(self, conn: Connection) -> str | None:
        image = self.trace.images.get(conn.key)
        if image is None or not image.published or conn.closedEarly:
            return None
        return conn.sha256

    def _read(self, client: LocalImageClient, leg: str, conn: Connection) -> ReadOutcome:
        reader = client.openRead(conn.snapshotId, conn.name)
        digest = size = ids = None
        if reader is not None:
            with reader:
                if not conn.closedEarly:
                    data = self._readData(reader, conn)
                    digest, size = sha256(data), len(data)
                    ids = _parentList(conn, data)
        return ReadOutcome(
            leg=leg,
            conn=conn.conn,
            key=conn.key,
            expectedError=conn.reply if conn.reply is not None else 0,
            error=wire.ENOENT if reader is None else 0,
            expectedSha256=self._expectedSha256(conn),
            sha256=digest,
            size=size,
            recordedSha256=self._recordedSha256(conn),
            snapshotIds=ids,
            expectedSnapshotIds=None if conn.reply else _parentList(conn, conn.payload),
        )

    def _readData(self, reader: ImageReader, conn: Connection) -> bytes:
        pipe = _pipeOf(reader)
        if pipe is not None:
            return _readPipe(pipe, self.timeout, f"reading {conn.key}")
        sock = _socketOf(reader)
        sock.settimeout(self.timeout)
        try:
            return reader.readAll()
        except socket.timeout:
            raise ReplayTimeout(f"reading {conn.key}: no progress for {self.timeout} s") from None


def _parentList(conn: Connection, data: bytes | None) -> tuple[str, ...] | None:
    """The snapshot ids in C{data} if C{conn} read C{parent}."""
    if data is None or conn.key != ("", wire.PARENT_IMAGE):
        return None
    return tuple(wire.decodeSnapshotIds(data))


# The replay waits on the client's descriptors with a deadline instead of
# blocking for ever.


def _pipeOf(handle: ImageReader | ImageWriter) -> int | None:
    return handle.pipe


def _socketOf(reader: ImageReader) -> socket.socket:
    sock = reader.socket
    assert sock is not None
    return sock
