"""
Property-based tests (hypothesis): random and mutated frames, descriptors
and closes fed to every protocol.

Whatever arrives, a protocol must not raise, must close every descriptor it
was handed, must leave no write or wait behind, must never publish an image
that was not complete, and must never touch a file outside its spill
directory.

The number of examples comes from the hypothesis profile: C{ci} (the
default: 120 per property, deterministic, run by the test suite) or C{long}
(C{admin/fuzz}: 20,000 per property, or C{FUZZ_EXAMPLES}, random).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections import Counter
from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python import log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import wire
from twisted_criu.criu.images import LocalImageProtocol
from twisted_criu.criu.stream import StreamCaptureProtocol, StreamServeProtocol
from twisted_criu.errors import ProtocolError
from twisted_criu.link.receiver import RemoteReceiver
from twisted_criu.link.sender import RemoteSender
from twisted_criu.registry import readAll
from twisted_criu.storage.spill import SpillStore
from twisted_criu.testing.fakes import (
    FakeLinkSource,
    FakeLocalService,
    FakeSink,
    driveProducer,
    pump,
)

from .test_wire import _collect as collectFrames

settings.register_profile(
    "ci",
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Examples run, per test (reported when each test ends).
EXAMPLES: Counter[str] = Counter()


class _Counting(SynchronousTestCase):
    """Counts the examples each property ran, and reports them."""

    def count(self) -> None:
        EXAMPLES[self.id()] += 1

    def tearDown(self) -> None:
        line = f"fuzz: {self.id()}: {EXAMPLES[self.id()]} examples"
        print(line)
        log.msg(line)


# -- building blocks -----------------------------------------------------------

HOSTILE_NAMES = ["..", ".", "a/b", "../../etc/passwd", "a\0b", "x" * 256, "", "DUMP_FINISH", "parent"]

# Mostly well-formed values (so that the interesting states are reached),
# some hostile ones, some anything.
goodNames = st.one_of(
    st.sampled_from(["pages-1.img", "core-1.img", "inventory.img", "parent"]),
    st.from_regex(r"[a-z0-9._-]{1,20}", fullmatch=True).filter(lambda n: n not in (".", "..")),
)
names = st.one_of(goodNames, goodNames, goodNames, st.sampled_from(HOSTILE_NAMES), st.text(max_size=20))
snapshotIds = st.one_of(
    st.sampled_from(["snap1", "snap1", "", "null", "/var/lib/criu/x"]),
    st.sampled_from(["a\0", "x" * 4096]),
    st.text(max_size=10),
)
modes = st.one_of(
    st.sampled_from([0, 1, 1, 1024]),
    st.sampled_from([2, 1025, 0o100, 3]),
    st.integers(0, 2**32 - 1),
)


def mutate(data: bytes, draw: Callable[[Any], Any]) -> bytes:
    """Flip, cut, extend or re-length a frame."""
    how = draw(st.sampled_from(["flip", "cut", "extend", "length", "none"]))
    if not data or how == "none":
        return data
    if how == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    if how == "cut":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "extend":
        return data + draw(st.binary(min_size=1, max_size=16))
    return wire.U32.pack(draw(st.integers(0, 2**32 - 1))) + data[4:]


@st.composite
def localFrames(draw: Callable[[Any], Any]) -> bytes:
    kind = draw(st.sampled_from(["valid", "valid", "valid", "mutated", "random", "huge"]))
    if kind == "random":
        return bytes(draw(st.binary(max_size=64)))
    if kind == "huge":
        return wire.U32.pack(draw(st.integers(wire.MAX_HEADER_LENGTH + 1, 2**32 - 1)))
    frame = wire.LocalRequest(draw(names), draw(snapshotIds), draw(modes)).toBytes()
    return mutate(frame, draw) if kind == "mutated" else frame


@st.composite
def remoteSegments(draw: Callable[[Any], Any]) -> bytes:
    """One piece of a link stream: mostly a well-formed image, sometimes not."""
    kind = draw(
        st.sampled_from(["image"] * 5 + ["chunked"] * 2 + ["odd", "marker", "mutated", "random", "huge"])
    )
    if kind == "chunked":  # a cut-through image: chunks, then end, abort or a bad length
        frame = wire.RemoteHeader(
            draw(goodNames), "snap1", 1, 0, None, wire.LINK_EXTENSION_VERSION, True
        ).toBytes()
        for chunk in draw(st.lists(st.binary(min_size=1, max_size=200), max_size=4)):
            frame += wire.CHUNK_LENGTH.pack(len(chunk)) + chunk
        end = draw(st.sampled_from([wire.CHUNK_END] * 3 + [wire.CHUNK_ABORT, wire.MAX_CHUNK + 1]))
        frame += wire.CHUNK_LENGTH.pack(end)
        return mutate(frame, draw) if draw(st.integers(0, 5)) == 0 else frame
    if kind == "random":
        return bytes(draw(st.binary(max_size=64)))
    if kind == "huge":
        return wire.U32.pack(draw(st.integers(wire.MAX_HEADER_LENGTH + 1, 2**32 - 1)))
    if kind == "marker":
        return wire.END_OF_DUMP.toBytes()
    body = bytes(draw(st.binary(max_size=300)))
    if kind == "odd":  # hostile fields, wrong sizes, bad digests
        try:
            frame = wire.RemoteHeader(
                draw(names),
                draw(snapshotIds),
                draw(modes),
                max(0, len(body) + draw(st.sampled_from([1, -1, 1000]))),
                draw(st.sampled_from([None, b"\0" * 32, b"short"])),
                draw(st.sampled_from([None, 1, 2])),
                draw(st.booleans()),
            ).toBytes()
        except (ValueError, ProtocolError):
            return body
        return frame + body
    import hashlib

    digest = hashlib.sha256(body).digest() if draw(st.integers(0, 3)) == 0 else None
    frame = wire.RemoteHeader(
        draw(goodNames),
        draw(st.sampled_from(["snap1", "snap2", "", "/var/lib/criu/x"])),
        draw(st.sampled_from([1, 1, 1, 1024])),
        len(body),
        digest,
        draw(st.sampled_from([None, 1])),
    ).toBytes()
    if kind == "mutated":
        frame = mutate(frame, draw)
    return frame + body


def chopped(data: bytes, cuts: list[int]) -> list[bytes]:
    """C{data} split at the given points (modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points + [len(data)]:
        pieces.append(data[last:point])
        last = point
    return [p for p in pieces if p]


def openFds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


class _Descriptors:
    """Descriptors of every kind a hostile client could pass."""

    def __init__(self) -> None:
        self.mine: list[int] = []  # ours to close (the far ends)
        self.written: list[bytes] = []  # what each pipe-read carried, whole
        self.directory = tempfile.mkdtemp(prefix="tc-fuzz-")

    def make(self, kind: str, data: bytes = b"") -> int:
        if kind == "pipe-read":
            readEnd, writeEnd = os.pipe()
            os.write(writeEnd, data[: 60000])
            os.close(writeEnd)
            self.written.append(data[:60000])
            return readEnd
        if kind == "pipe-write":
            readEnd, writeEnd = os.pipe()
            os.set_blocking(readEnd, False)
            self.mine.append(readEnd)
            return writeEnd
        if kind == "file":
            path = os.path.join(self.directory, "victim")
            with open(path, "wb") as f:
                f.write(b"do not touch")
            return os.open(path, os.O_RDWR)
        if kind == "socket":
            a, b = socket.socketpair()
            self.mine.append(b.detach())
            return a.detach()
        return os.open("/dev/null", os.O_RDWR)

    def close(self) -> None:
        for fd in self.mine:
            os.close(fd)
        victim = os.path.join(self.directory, "victim")
        if os.path.exists(victim):
            with open(victim, "rb") as f:
                assert f.read() == b"do not touch", "a passed file was written to"
        shutil.rmtree(self.directory)


descriptorKinds = st.sampled_from(
    ["pipe-read", "pipe-read", "pipe-write", "pipe-write", "file", "socket", "devnull"]
)


@st.composite
def localEvents(draw: Callable[[Any], Any]) -> list[tuple[str, Any]]:
    """
    Mostly what a criu connection does (a request, maybe a descriptor, maybe
    bytes), with mutations, extra descriptors and garbage mixed in; then a
    close, clean or not.
    """
    events: list[tuple[str, Any]] = []
    if draw(st.integers(0, 3)):
        events.append(("data", draw(localFrames())))
        for _ in range(draw(st.integers(0, 2))):
            events.append(("fd", (draw(descriptorKinds), bytes(draw(st.binary(max_size=3000))))))
        if draw(st.booleans()):
            events.append(("data", b"\0" + bytes(draw(st.binary(max_size=300)))))
    for _ in range(draw(st.integers(0, 3))):
        choice = draw(st.sampled_from(["data", "fd", "bytes"]))
        if choice == "data":
            events.append(("data", draw(localFrames())))
        elif choice == "bytes":
            events.append(("data", bytes(draw(st.binary(min_size=1, max_size=200)))))
        else:
            events.append(("fd", (draw(descriptorKinds), bytes(draw(st.binary(max_size=2000))))))
    events.append(("close", draw(st.booleans())))
    return events


class _SpillDirTest(_Counting):
    def spillStore(self) -> tuple[SpillStore, str]:
        parent = tempfile.mkdtemp(prefix="tc-spill-")
        self.addCleanup(shutil.rmtree, parent, True)
        return SpillStore(64, parent), parent

    def assertOnlySpillFiles(self, store: SpillStore, parent: str) -> None:
        """Everything in the spill parent is the store's own directory, now empty."""
        store.close()
        self.assertEqual(os.listdir(parent), [])


class _CriuSocketTest(_SpillDirTest):
    """Plays events on a criu-facing protocol, then checks what it left behind."""

    def play(
        self,
        build: Callable[[FakeLocalService], Any],
        events: list[tuple[str, Any]],
        waitForMissing: bool,
        published: tuple[str, str],
    ) -> tuple[FakeLocalService, _Descriptors]:
        """
        Run C{events} on a new protocol over a spill store that already holds
        C{published}; close the connection as the last event says.
        """
        self.fdsBefore = openFds()
        service = FakeLocalService(waitForMissing)
        self.store, self.parent = self.spillStore()
        service.store = self.store  # type: ignore[assignment]
        writer = service.store.newWriter()
        writer.write(b"published before")
        service.registry.beginWrite(published)
        service.registry.publish(published, writer.commit())
        descriptors = _Descriptors()
        protocol = build(service)
        transport = StringTransport()
        protocol.makeConnection(transport)
        for kind, value in events:
            if transport.disconnecting or transport.disconnected:
                break
            if kind == "data":
                protocol.dataReceived(value)
            elif kind == "fd":
                protocol.fileDescriptorReceived(descriptors.make(*value))
            pump(service.reactor)
            if transport.producer is not None:
                driveProducer(transport)  # inline reads: the socket takes it all
        clean = events[-1][1]
        protocol.connectionLost(Failure(ConnectionDone() if clean else ConnectionLost()))
        pump(service.reactor)
        service.registry.close()
        pump(service.reactor)
        self.assertEqual(service.registry.writesInProgress, 0)
        self.assertEqual(service.registry.waiting, 0)
        return service, descriptors

    def assertNothingLeft(self, service: FakeLocalService, descriptors: _Descriptors) -> None:
        service.registry.release()
        descriptors.close()
        self.assertOnlySpillFiles(self.store, self.parent)
        self.assertEqual(openFds(), self.fdsBefore)


class LocalProtocolFuzzTests(_CriuSocketTest):
    """criu's UNIX socket (remote images, both variants)."""

    @given(events=localEvents(), waitForMissing=st.booleans())
    def test_anythingOnTheLocalSocket(self, events: list[tuple[str, Any]], waitForMissing: bool) -> None:
        self.count()
        service, descriptors = self.play(
            LocalImageProtocol, events, waitForMissing, ("snap1", "pages-1.img")
        )
        for snapshotId, name in service.registry.keys():  # well-formed keys, never paths
            wire.checkName(name)
            wire.checkSnapshotId(snapshotId)
        self.assertNothingLeft(service, descriptors)


class RemoteReceiverFuzzTests(_SpillDirTest):
    """The cache's end of the link: images are published whole or not at all."""

    @staticmethod
    def reference(stream: bytes) -> tuple[dict[tuple[str, str], bytes], bool]:
        """
        What a correct cache stores from C{stream} (complete images, in
        order), and whether a header announced the link extension.
        """
        images: dict[tuple[str, str], bytes] = {}
        extended = False
        rest = stream
        while len(rest) >= 4:
            (length,) = wire.U32.unpack_from(rest)
            if length > wire.MAX_HEADER_LENGTH or len(rest) < 4 + length:
                break
            try:
                header = wire.RemoteHeader.fromBytes(rest[4 : 4 + length])
            except ProtocolError:
                break
            rest = rest[4 + length :]
            extended = extended or header.linkVersion is not None
            if header.isEndOfDump:
                continue
            if header.chunked:
                body = b""
                while True:
                    if len(rest) < 4:
                        return images, extended
                    (n,) = wire.CHUNK_LENGTH.unpack_from(rest)
                    rest = rest[4:]
                    if n in (wire.CHUNK_END, wire.CHUNK_ABORT):
                        break
                    if n > wire.MAX_CHUNK or len(rest) < n:
                        return images, extended
                    body, rest = body + rest[:n], rest[n:]
                if n == wire.CHUNK_END:
                    images[(header.snapshotId, header.name)] = body
                continue
            if len(rest) < header.size:
                break
            body, rest = rest[: header.size], rest[header.size :]
            if header.sha256 is not None:
                import hashlib

                if hashlib.sha256(body).digest() != header.sha256:
                    break
            key = (header.snapshotId, header.name)
            if wire.openKind(header.openMode) is wire.OpenKind.APPEND and key in images:
                images[key] = images[key] + body
            else:
                images[key] = body
        return images, extended

    @given(
        segments=st.lists(remoteSegments(), min_size=1, max_size=6),
        cuts=st.lists(st.integers(0, 10**6), max_size=8),
        tail=st.one_of(st.just(0), st.integers(1, 400)),
        clean=st.booleans(),
    )
    def test_anythingOnTheLink(
        self, segments: list[bytes], cuts: list[int], tail: int, clean: bool
    ) -> None:
        self.count()
        stream = b"".join(segments)
        stream = stream[: max(0, len(stream) - tail)]  # the link broke here
        sink = FakeSink()
        store, parent = self.spillStore()
        sink.store = store  # type: ignore[assignment]
        receiver = RemoteReceiver(sink)
        transport = StringTransport()
        receiver.makeConnection(transport)
        for piece in chopped(stream, cuts):
            if transport.disconnecting or transport.disconnected:
                break
            receiver.dataReceived(piece)
        receiver.connectionLost(Failure(ConnectionDone() if clean else ConnectionLost()))
        registry = sink.registry
        self.assertEqual(registry.writesInProgress, 0)
        stored = {key: readAll(registry.get(key)) for key in registry.keys()}  # type: ignore[arg-type]
        expected, extended = self.reference(stream)
        self.assertEqual(stored, expected)
        # Whatever the cache wrote back is a valid link status, and only to a
        # proxy that announced the extension.
        written = transport.value()
        for payload in wire.iterFrames(written):
            wire.LinkStatus.fromBytes(payload)
        if not extended:
            self.assertEqual(written, b"")
        registry.release()
        self.assertOnlySpillFiles(store, parent)


class RemoteSenderFuzzTests(_Counting):
    """The proxy's end: whatever the cache (or an impostor) sends back."""

    @given(data=st.lists(st.one_of(st.binary(max_size=40), st.sampled_from([
        wire.LinkStatus(wire.LinkStatusKind.HELLO, 1).toBytes(),
        wire.LinkStatus(wire.LinkStatusKind.DUMP_RECEIVED, images=1, size=2).toBytes(),
        wire.LinkStatus(wire.LinkStatusKind.SESSION_DONE).toBytes(),
    ])), max_size=6))
    def test_anythingFromTheCache(self, data: list[bytes]) -> None:
        self.count()
        source = FakeLinkSource()
        statuses: list[wire.LinkStatus] = source.statuses
        sender = RemoteSender(source)
        transport = StringTransport()
        sender.makeConnection(transport)
        for piece in data:
            if transport.disconnected:
                break
            sender.dataReceived(piece)
        for status in statuses:
            self.assertIsInstance(status.kind, wire.LinkStatusKind)
        sender.connectionLost(Failure(ConnectionDone()))


class StreamFuzzTests(_CriuSocketTest):
    """criu --stream's control connection, capture and serve."""

    @given(events=localEvents(), capture=st.booleans())
    def test_anythingOnTheStreamSocket(self, events: list[tuple[str, Any]], capture: bool) -> None:
        self.count()
        protocol = StreamCaptureProtocol if capture else StreamServeProtocol
        service, descriptors = self.play(protocol, events, not capture, ("", "inventory.img"))
        for key in service.registry.keys():  # every file stored is a whole pipe's bytes
            if key != ("", "inventory.img"):
                data = readAll(service.registry.get(key))  # type: ignore[arg-type]
                self.assertIn(data, descriptors.written, key)
        self.assertNothingLeft(service, descriptors)


class ParserFuzzTests(_Counting):
    """Every parser raises L{ProtocolError} or nothing, for any bytes."""

    @given(raw=st.binary(max_size=200))
    def test_parsers(self, raw: bytes) -> None:
        self.count()
        for parse in (
            wire.LocalRequest.fromBytes,
            wire.RemoteHeader.fromBytes,
            wire.Reply.fromBytes,
            wire.StreamRequest.fromBytes,
            wire.StreamReply.fromBytes,
            wire.LinkStatus.fromBytes,
            wire.decodeSnapshotIds,
        ):
            try:
                parse(raw)
            except ProtocolError:
                pass

    @given(frames=st.lists(st.binary(max_size=100), max_size=5), cuts=st.lists(st.integers(0, 10**4), max_size=6))
    def test_framesSplitAnywhere(self, frames: list[bytes], cuts: list[int]) -> None:
        self.count()
        data = b"".join(wire.frame(f) for f in frames)
        self.assertEqual(collectFrames(chopped(data, cuts)), frames)
