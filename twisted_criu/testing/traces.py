# -*- test-case-name: tests.test_traces -*-
"""
Recordings of real C{criu --remote} traffic: the trace model and loading.

A trace directory (C{shared/criu-traces/remote-*}) holds what criu-dev
664bd7a26 sent to a recording peer on C{img-proxy.sock} (C{dump*.jsonl})
and C{img-cache.sock} (C{restore.jsonl}), an C{images-manifest.json}, and
for some runs the image bytes under C{images/}.  L{loadTrace} reads one
into a L{Trace}: its dump legs and restore leg (L{Leg}), each with the
connections criu made (L{Connection}) and a replay schedule (L{Step}), and
the bytes to write for every image (L{Image}).
L{twisted_criu.testing.replay.TraceReplay} plays it against daemons.

Runs whose image bytes are not published (only sizes and hashes) get
deterministic pseudo-random bytes of the recorded size (L{fillerBytes}).
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

from attrs import frozen

from twisted_criu import wire
from twisted_criu.keys import ImageKey

#: How the manifest names the key of images without a snapshot id.
NO_SNAPSHOT_DIR = "_nosnap_"

class TraceError(Exception):
    """A trace directory is missing, incomplete or inconsistent."""


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
