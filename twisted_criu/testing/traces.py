# -*- test-case-name: tests.test_traces -*-
"""
Recordings of real C{criu --remote} traffic, and their replay.

A trace directory (C{shared/criu-traces/remote-*}) holds what criu-dev
664bd7a26 sent to a recording peer on C{img-proxy.sock} (C{dump*.jsonl})
and C{img-cache.sock} (C{restore.jsonl}), an C{images-manifest.json}, and
for some runs the image bytes under C{images/}.  L{loadTrace} reads one;
L{TraceReplay} plays it against real daemons with L{LocalImageClient}, the
way criu did:

  - dump legs: each write is opened (header sent, pipe passed) when criu
    connected, and its data is written and the pipe closed where the trace
    saw that pipe's EOF, so transfers overlap as they did.  Data of writes
    still open when the FINISH comes is written before the FINISH and their
    pipes are closed after it, as criu did.
  - every leg: each read is made where criu made it; the reply must be the
    recorded one (ENOENT where the recorder answered error 2), and the
    bytes must be what this replay wrote (or, for C{parent}, what the
    recorder sent criu).  A read that criu abandoned is abandoned too.

Runs whose image bytes are not published (only sizes and hashes) get
deterministic pseudo-random bytes of the recorded size (L{fillerBytes}).

Everything that blocks has a deadline: a stalled daemon raises
L{ReplayTimeout} rather than hanging the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

from attrs import Factory, define, frozen

from twisted_criu import wire
from twisted_criu.keys import ImageKey
from twisted_criu.testing.criu import ImageReader, ImageWriter, LocalImageClient

#: How the manifest names the key of images without a snapshot id.
NO_SNAPSHOT_DIR = "_nosnap_"

#: Bytes written to a pipe per system call.
WRITE_CHUNK = 1 << 20


class TraceError(Exception):
    """A trace directory is missing, incomplete or inconsistent."""


class ReplayTimeout(Exception):
    """A daemon made no progress within the replay's timeout."""


class Op(Enum):
    """What one recorded connection asked for."""

    READ = "read"
    WRITE = "write"
    APPEND = "append"
    FINISH = "finish"


class StepKind(Enum):
    """One action of a replay."""

    OPEN = "open"  # connect, send the header, pass the pipe
    CLOSE = "close"  # write the data (unless already written), close the pipe
    READ = "read"  # a whole read: header, reply, bytes to EOF
    FINISH = "finish"  # the dump or restore FINISH


@frozen
class Connection:
    """
    One recorded criu connection, with what the recorder saw of it.

    @ivar reply: the error the recorder replied to a read (C{None} for
        other requests).
    @ivar size: the bytes that went through the connection's pipe or
        socket (C{None} if none was recorded).
    @ivar payload: the bytes themselves, for transfers over the socket.
    @ivar closedEarly: criu closed its end before reading the whole image.
    """

    conn: int
    op: Op
    snapshotId: str
    name: str
    openMode: int
    frame: bytes
    reply: int | None = None
    size: int | None = None
    sha256: str | None = None
    payload: bytes | None = None
    closedEarly: bool = False

    @property
    def key(self) -> ImageKey:
        return (self.snapshotId, self.name)


@frozen
class Step:
    kind: StepKind
    conn: int


@frozen
class Leg:
    """
    One trace file: a dump (C{dump.jsonl}, C{dump1.jsonl}, ...) or the
    restore.

    @ivar steps: the replay schedule, in recorded order.
    """

    name: str
    connections: dict[int, Connection]
    steps: tuple[Step, ...]

    def requests(self, op: Op) -> list[Connection]:
        """The connections asking for C{op}, in connection order."""
        return [c for _, c in sorted(self.connections.items()) if c.op is op]

    @property
    def maxOpenWrites(self) -> int:
        """How many image writes the schedule keeps open at once, at most."""
        open_, most = 0, 0
        for step in self.steps:
            if step.kind is StepKind.OPEN:
                open_ += 1
                most = max(most, open_)
            elif step.kind is StepKind.CLOSE:
                open_ -= 1
        return most

    @property
    def finishBeforeEOF(self) -> list[ImageKey]:
        """Writes whose EOF the trace saw after the FINISH."""
        late, seenFinish = [], False
        for step in self.steps:
            if step.kind is StepKind.FINISH:
                seenFinish = True
            elif step.kind is StepKind.CLOSE and seenFinish:
                late.append(self.connections[step.conn].key)
        return late


@frozen
class Image:
    """
    The bytes a replay writes for one image.

    @ivar published: the bytes are the real ones from C{images/} (else they
        are L{fillerBytes} of the recorded size).
    """

    data: bytes
    sha256: str
    published: bool

    @property
    def size(self) -> int:
        return len(self.data)


@frozen
class Trace:
    """
    A loaded trace directory.

    @ivar dumps: the dump legs in the order they ran.
    @ivar images: what to write for every image the dumps write.
    """

    name: str
    path: Path
    dumps: tuple[Leg, ...]
    restore: Leg
    images: dict[ImageKey, Image]

    @property
    def legs(self) -> tuple[Leg, ...]:
        return self.dumps + (self.restore,)

    @property
    def snapshotIds(self) -> list[str]:
        """The C{parent} list the restore was given."""
        (parent,) = [c for c in self.restore.requests(Op.READ) if c.name == wire.PARENT_IMAGE]
        assert parent.payload is not None
        return wire.decodeSnapshotIds(parent.payload)

    @property
    def enoents(self) -> list[ImageKey]:
        """The images the restore asked for and was told do not exist."""
        return [c.key for c in self.restore.requests(Op.READ) if c.reply == wire.ENOENT]


# -- loading ---------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=8)
def fillerBytes(key: str, size: int) -> bytes:
    """Deterministic stand-in bytes for an unpublished image: SHAKE-256 of C{key}."""
    return hashlib.shake_256(key.encode("utf-8")).digest(size) if size else b""


def manifestKey(key: ImageKey) -> str:
    snapshotId, name = key
    return f"remote/{snapshotId or NO_SNAPSHOT_DIR}/{name}"


def _readEvents(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as e:
                    raise TraceError(f"{path}:{number}: {e}") from None


def _connection(request: dict[str, Any], events: list[dict[str, Any]]) -> Connection:
    reply = next((e["error"] for e in events if e["event"] == "reply"), None)
    end = next((e for e in events if e["event"] == "data_eof"), {})
    payload = end.get("payload_hex")
    return Connection(
        conn=request["conn"],
        op=Op(request["op"]),
        snapshotId=request["snapshot_id"],
        name=request["name"],
        openMode=request["open_mode"],
        frame=bytes.fromhex(request["frame_hex"]),
        reply=reply,
        size=end.get("bytes"),
        sha256=end.get("sha256"),
        payload=None if payload is None else bytes.fromhex(payload),
        closedEarly=end.get("reader_error") is not None,
    )


def _stepFor(event: dict[str, Any], op: Op) -> StepKind | None:
    kind = event["event"]
    if op in (Op.WRITE, Op.APPEND):
        return {"accept": StepKind.OPEN, "data_eof": StepKind.CLOSE}.get(kind)
    if kind == "request":
        return StepKind.READ if op is Op.READ else StepKind.FINISH
    return None


def loadLeg(path: Path) -> Leg:
    """
    Read one C{.jsonl} trace file into its connections and a replay schedule.

    Writes open where criu connected (C{accept}, whose numbering is exact)
    and close where their EOF was seen; reads and the FINISH happen where
    their request was received.
    """
    events = list(_readEvents(path))
    byConn: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        if "conn" in event:
            byConn.setdefault(event["conn"], []).append(event)
    connections = {}
    for conn, connEvents in byConn.items():
        requests = [e for e in connEvents if e["event"] == "request"]
        if len(requests) != 1:
            raise TraceError(f"{path}: connection {conn} has {len(requests)} requests")
        connections[conn] = _connection(requests[0], connEvents)
    steps = []
    for event in events:
        if "conn" in event:
            kind = _stepFor(event, connections[event["conn"]].op)
            if kind is not None:
                steps.append(Step(kind, event["conn"]))
    leg = Leg(path.stem, connections, tuple(steps))
    _checkSchedule(path, leg)
    return leg


def _checkSchedule(path: Path, leg: Leg) -> None:
    opened: set[int] = set()
    for step in leg.steps:
        if step.kind is StepKind.OPEN:
            opened.add(step.conn)
        elif step.kind is StepKind.CLOSE:
            if step.conn not in opened:
                raise TraceError(f"{path}: EOF of connection {step.conn} before it opened")
            opened.remove(step.conn)
    if opened:
        raise TraceError(f"{path}: writes {sorted(opened)} never reach EOF")


def _loadImage(tracePath: Path, key: ImageKey, entry: dict[str, Any]) -> Image:
    snapshotId, name = key
    published = tracePath / "images" / (snapshotId or NO_SNAPSHOT_DIR) / name
    if published.exists():
        data = published.read_bytes()
        if sha256(data) != entry["sha256"] or len(data) != entry["bytes"]:
            raise TraceError(f"{published} does not match images-manifest.json")
        return Image(data, entry["sha256"], True)
    data = fillerBytes(manifestKey(key), entry["bytes"])
    return Image(data, sha256(data), False)


def _loadImages(path: Path, dumps: Iterable[Leg]) -> dict[ImageKey, Image]:
    try:
        manifest: dict[str, Any] = json.loads((path / "images-manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise TraceError(f"{path}: bad images-manifest.json: {e}") from None
    images = {}
    for leg in dumps:
        for write in leg.requests(Op.WRITE):
            entry = manifest.get(manifestKey(write.key))
            if entry is None:
                raise TraceError(f"{path}: {manifestKey(write.key)} not in the manifest")
            sent = entry.get("sha256_as_sent_by_criu", entry["sha256"])
            if (entry["bytes"], sent) != (write.size, write.sha256):
                raise TraceError(f"{path}: {leg.name} and the manifest disagree on {write.key}")
            images[write.key] = _loadImage(path, write.key, entry)
    return images


def loadTrace(path: Path | str) -> Trace:
    """
    Load a C{remote-*} trace directory.

    @raise TraceError: if it is missing or does not hold a usable trace.
    """
    path = Path(path)
    dumpFiles = sorted(path.glob("dump*.jsonl"))
    if not dumpFiles or not (path / "restore.jsonl").exists():
        raise TraceError(f"{path}: no dump*.jsonl and restore.jsonl here")
    dumps = tuple(loadLeg(f) for f in dumpFiles)
    restore = loadLeg(path / "restore.jsonl")
    return Trace(path.name, path, dumps, restore, _loadImages(path, dumps))


def tracesIn(directory: Path | str, prefix: str = "remote-") -> list[Path]:
    """The trace directories under C{directory} whose name starts with C{prefix}."""
    return sorted(p for p in Path(directory).iterdir() if p.name.startswith(prefix))


# -- replaying -------------------------------------------------------------


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
