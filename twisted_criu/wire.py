# -*- test-case-name: tests.test_wire -*-
"""
The wire: frames and the control messages of CRIU's image protocols.

A frame is a u32 little-endian length followed by that many bytes of a
proto2 message.  This is the only module that touches the generated
protobuf classes; everything else sees the frozen values defined here.
"""

from __future__ import annotations

import struct
from enum import Enum, IntEnum
from typing import Iterable, TypeVar

from attrs import frozen
from google.protobuf.message import DecodeError, EncodeError, Message

from twisted_criu._pb import criu_image_pb2 as _pb
from twisted_criu.errors import ProtocolError
from twisted_criu.names import checkName, checkSnapshotId

U32 = struct.Struct("<I")

#: Longest control message we accept; real ones are a few hundred bytes.
MAX_HEADER_LENGTH = 64 * 1024

O_RDONLY = 0
O_WRONLY = 1
O_RDWR = 2
O_ACCMODE = 3
O_APPEND = 0o2000

ENOENT = 2

#: Name of the image holding the ordered list of snapshot ids.
PARENT_IMAGE = "parent"

#: The 2015 seed's markers for "no snapshot" and "dump finished".
SEED_NULL_SNAPSHOT = "null"
SEED_DUMP_FINISH = "DUMP_FINISH"


class OpenKind(Enum):
    """What a request's raw C{open_mode} asks for."""

    READ = "read"
    WRITE = "write"
    APPEND = "append"


def openKind(openMode: int) -> OpenKind:
    """
    Classify a raw Linux open flag word as CRIU uses it.

    @raise ProtocolError: for flag words that are neither a read, a write
        nor an append.
    """
    if openMode == O_RDONLY:
        return OpenKind.READ
    if openMode & O_APPEND:
        return OpenKind.APPEND
    if openMode & O_ACCMODE in (O_WRONLY, O_RDWR):
        return OpenKind.WRITE
    raise ProtocolError(f"unknown open mode {openMode:#o}")


def frame(payload: bytes) -> bytes:
    """Prefix C{payload} with its u32 little-endian length."""
    return U32.pack(len(payload)) + payload


_M = TypeVar("_M", bound=Message)


def _parse(cls: type[_M], raw: bytes) -> _M:
    try:
        message = cls.FromString(raw)
    except (DecodeError, ValueError) as e:
        raise ProtocolError(f"malformed {cls.__name__}: {e}") from None
    if not message.IsInitialized():
        missing = ", ".join(message.FindInitializationErrors())  # type: ignore[attr-defined]
        raise ProtocolError(f"{cls.__name__} lacks required fields: {missing}")
    for field in message.DESCRIPTOR.fields:
        # proto2 does not check UTF-8: upb then hands out bytes, not str.
        if field.type == field.TYPE_STRING and isinstance(getattr(message, field.name), bytes):
            raise ProtocolError(f"{cls.__name__}.{field.name} is not valid UTF-8")
    return message


def _serialize(message: Message) -> bytes:
    try:
        return frame(message.SerializeToString())
    except EncodeError as e:  # pragma: no cover - our own values are complete
        raise ProtocolError(str(e)) from None


@frozen
class LocalRequest:
    """A C{local_image_entry}: what criu asks of a daemon on one connection."""

    name: str
    snapshotId: str
    openMode: int

    @property
    def isFinish(self) -> bool:
        """Is this the end-of-dump / end-of-restore marker (either variant)?"""
        return (self.name == "" and self.snapshotId == "") or (
            self.name == SEED_DUMP_FINISH and self.snapshotId == SEED_NULL_SNAPSHOT
        )

    @property
    def isSeed(self) -> bool:
        """Does it carry one of the 2015 seed's markers?"""
        return self.snapshotId == SEED_NULL_SNAPSHOT

    @property
    def kind(self) -> OpenKind:
        return openKind(self.openMode)

    def toBytes(self) -> bytes:
        return _serialize(
            _pb.local_image_entry(
                name=self.name, snapshot_id=self.snapshotId, open_mode=self.openMode
            )
        )

    @classmethod
    def fromBytes(cls, raw: bytes) -> LocalRequest:
        m = _parse(_pb.local_image_entry, raw)
        request = cls(m.name, m.snapshot_id, m.open_mode)
        if not request.isFinish:
            checkName(request.name)
            checkSnapshotId(request.snapshotId)
            request.kind  # validates the mode
        return request


class Codec(IntEnum):
    """How an image's compressed chunks are compressed (link version 4)."""

    NONE = 0
    ZSTD = 1
    LZ4 = 2


@frozen
class RemoteHeader:
    """
    A C{remote_image_entry}: announces C{size} raw bytes of one image.

    Two optional fields are twisted-criu's extensions, skipped by CRIU's C
    peers (protobuf-c ignores unknown fields): the bytes' C{sha256}, and
    C{linkVersion}, which a twisted-criu proxy sets on every header so that
    a twisted-criu cache knows it may answer with L{LinkStatus} frames.
    """

    name: str
    snapshotId: str
    openMode: int
    size: int
    sha256: bytes | None = None
    linkVersion: int | None = None
    #: Cut through: C{size} is 0 and chunks follow (see L{CHUNK_LENGTH}).
    chunked: bool = False
    #: The proxy's session token (link version 3).
    session: str | None = None
    #: A marker that carries no image (L{Marker}; link version 3).
    marker: Marker | None = None
    #: A SYNC marker's number, echoed by the cache's SYNCED.
    sequence: int = 0
    #: The codec of the image's compressed chunks (link version 4).
    compression: Codec = Codec.NONE
    #: The chunks continue the image at this byte (link version 4: a resume).
    offset: int = 0

    def toBytes(self) -> bytes:
        message = _pb.remote_image_entry(
            name=self.name,
            snapshot_id=self.snapshotId,
            open_mode=self.openMode,
            size=self.size,
        )
        if self.sha256 is not None:
            message.sha256 = self.sha256
        if self.linkVersion is not None:
            message.link_version = self.linkVersion
        if self.chunked:
            message.chunked = True
        if self.session is not None:
            message.session = self.session
        if self.marker is not None:
            message.marker = self.marker.value
            message.sequence = self.sequence
        if self.compression is not Codec.NONE:
            message.compression = self.compression.value
        if self.offset:
            message.offset = self.offset
        return _serialize(message)

    @property
    def isMarker(self) -> bool:
        """Does this header carry no image (end of dump, SYNC, ABORT)?"""
        return self.name == "" and self.snapshotId == ""

    @property
    def isEndOfDump(self) -> bool:
        """Is this the link extension's end-of-dump marker?"""
        return self.isMarker and self.marker is None

    @classmethod
    def fromBytes(cls, raw: bytes) -> RemoteHeader:
        m = _parse(_pb.remote_image_entry, raw)
        version = m.link_version if m.HasField("link_version") else None
        session = m.session if m.HasField("session") else None
        if session is not None:
            checkSnapshotId(session)
        if m.name == "" and m.snapshot_id == "" and version is not None:
            if m.size != 0 or m.HasField("sha256"):
                raise ProtocolError("an end-of-dump marker with a body")
            marker = None
            if m.HasField("marker"):
                try:
                    marker = Marker(m.marker)
                except ValueError:
                    raise ProtocolError(f"unknown link marker {m.marker}") from None
            if marker is Marker.RESUME and version < 4:
                raise ProtocolError(f"a RESUME marker on link version {version} (it needs 4)")
            return cls("", "", m.open_mode, 0, None, version, session=session, marker=marker, sequence=m.sequence)
        if m.HasField("marker"):
            raise ProtocolError("a marker with an image name")
        if m.HasField("compression") or m.HasField("offset"):
            if not m.chunked or version is None or version < 4:
                raise ProtocolError("compression and offset need a chunked image and link version 4")
        try:
            compression = Codec(m.compression)
        except ValueError:
            raise ProtocolError(f"unknown compression {m.compression}") from None
        checkName(m.name)
        checkSnapshotId(m.snapshot_id)
        openKind(m.open_mode)
        digest = m.sha256 if m.HasField("sha256") else None
        if digest is not None and len(digest) != 32:
            raise ProtocolError(f"a SHA-256 of {len(digest)} bytes")
        chunked = m.chunked
        if chunked and (version is None or version < 2 or m.size or digest is not None):
            raise ProtocolError("a chunked image needs link version 2, size 0 and no SHA-256")
        if chunked and openKind(m.open_mode) is not OpenKind.WRITE:
            raise ProtocolError("only a plain write can be chunked")
        return cls(
            m.name, m.snapshot_id, m.open_mode, m.size, digest, version, chunked, session,
            compression=compression, offset=m.offset,
        )


class Marker(IntEnum):
    """A header that carries no image, besides the end of a dump (version 3)."""

    #: Confirm that every image sent before is stored (answered by SYNCED).
    SYNC = 1
    #: The session's dump failed and criu resumed the process: never serve it.
    ABORT = 2
    #: Version 4: where do my images resume?  Answered by RESUME_AT statuses,
    #: then SYNCED with the marker's sequence; it confirms and delivers nothing.
    RESUME = 3


#: The version of the link extension this code speaks: 1 link statuses,
#: 2 also chunked (cut-through) images, 3 also session tokens, SYNC and
#: ABORT markers, 4 also compressed chunks and resumed images (RESUME_AT).
LINK_EXTENSION_VERSION = 4

#: Chunked images: each chunk is this length prefix, then that many bytes.
CHUNK_LENGTH = struct.Struct("<I")
#: The length that ends a chunked image: it is complete.
CHUNK_END = 0
#: The length that ends a chunked image whose write broke off: discard it.
CHUNK_ABORT = 0xFFFFFFFF
#: The largest chunk a sender makes (and a receiver accepts); a compressed
#: chunk also decompresses to at most this.
MAX_CHUNK = 1 << 24
#: Set in a chunk's length (link version 4): the chunk is compressed.
CHUNK_COMPRESSED = 0x80000000


def chunkWord(length: int, compressed: bool = False) -> bytes:
    """The length prefix of a chunk of C{length} bytes."""
    assert 0 < length <= MAX_CHUNK
    return CHUNK_LENGTH.pack(length | CHUNK_COMPRESSED if compressed else length)


def parseChunkWord(word: int) -> tuple[int, bool]:
    """
    A chunk's length word: its length and whether it is compressed.
    L{CHUNK_END} and L{CHUNK_ABORT} are the caller's to check first.
    Raises L{ProtocolError} for a chunk over L{MAX_CHUNK}.
    """
    compressed = bool(word & CHUNK_COMPRESSED)
    length = word & ~CHUNK_COMPRESSED
    if length > MAX_CHUNK or not length:
        raise ProtocolError(f"a chunk of {length} bytes (at most {MAX_CHUNK})")
    return length, compressed

#: The proxy's end-of-dump marker, sent only to caches that said HELLO.
END_OF_DUMP = RemoteHeader("", "", O_RDONLY, 0, None, LINK_EXTENSION_VERSION)


class LinkStatusKind(IntEnum):
    """What a L{LinkStatus} says (twisted-criu's link extension)."""

    HELLO = 1
    DUMP_RECEIVED = 2
    SESSION_DONE = 3
    SYNCED = 4
    SESSION_ABORTED = 5
    #: Version 4, answering a RESUME marker: the cache kept the first C{size}
    #: bytes of an image (C{images=0}), or holds it whole, C{size} bytes
    #: (C{images=1}).
    RESUME_AT = 6


@frozen
class LinkStatus:
    """A C{link_status_entry}: the cache telling the proxy how things stand."""

    kind: LinkStatusKind
    version: int = 0
    images: int = 0
    size: int = 0
    sequence: int = 0
    #: RESUME_AT: the image kept in part, or (C{images=1}) held whole.
    name: str = ""
    snapshotId: str = ""

    def toBytes(self) -> bytes:
        message = _pb.link_status_entry(kind=self.kind.value)
        if self.kind is LinkStatusKind.HELLO:
            message.version = self.version
        elif self.kind in (LinkStatusKind.DUMP_RECEIVED, LinkStatusKind.SYNCED):
            message.images = self.images
            message.bytes = self.size
        if self.kind is LinkStatusKind.SYNCED:
            message.sequence = self.sequence
        if self.kind is LinkStatusKind.RESUME_AT:
            if self.images:
                message.images = self.images
            message.bytes = self.size
            message.name = self.name
            message.snapshot_id = self.snapshotId
        return _serialize(message)

    @classmethod
    def fromBytes(cls, raw: bytes) -> LinkStatus:
        m = _parse(_pb.link_status_entry, raw)
        try:
            kind = LinkStatusKind(m.kind)
        except ValueError:
            raise ProtocolError(f"unknown link status {m.kind}") from None
        if kind is LinkStatusKind.RESUME_AT:
            if m.images > 1:
                raise ProtocolError(f"a RESUME_AT with images={m.images} (0: kept in part, 1: held whole)")
            checkName(m.name)
            checkSnapshotId(m.snapshot_id)
        return cls(kind, m.version, m.images, m.bytes, m.sequence, m.name, m.snapshot_id)


@frozen
class Reply:
    """A C{local_image_reply_entry}: 0, or an errno."""

    error: int

    def toBytes(self) -> bytes:
        return _serialize(_pb.local_image_reply_entry(error=self.error))

    @classmethod
    def fromBytes(cls, raw: bytes) -> Reply:
        return cls(_parse(_pb.local_image_reply_entry, raw).error)


REPLY_OK = Reply(0).toBytes()
REPLY_ENOENT = Reply(ENOENT).toBytes()


def encodeSnapshotId(snapshotId: str) -> bytes:
    """One framed C{snapshot_id_entry}, as criu appends it to C{parent}."""
    return _serialize(_pb.snapshot_id_entry(snapshot_id=snapshotId))


def decodeSnapshotIds(data: bytes) -> list[str]:
    """The snapshot ids in a C{parent} image, in push order."""
    ids = []
    for payload in iterFrames(data):
        ids.append(_parse(_pb.snapshot_id_entry, payload).snapshot_id)
    return ids


@frozen
class StreamRequest:
    """An C{img_streamer_request_entry} of criu C{--stream}."""

    filename: str

    def toBytes(self) -> bytes:
        return _serialize(_pb.img_streamer_request_entry(filename=self.filename))

    @classmethod
    def fromBytes(cls, raw: bytes) -> StreamRequest:
        m = _parse(_pb.img_streamer_request_entry, raw)
        return cls(checkName(m.filename))


@frozen
class StreamReply:
    """An C{img_streamer_reply_entry}: does the requested file exist?"""

    exists: bool

    def toBytes(self) -> bytes:
        return _serialize(_pb.img_streamer_reply_entry(exists=self.exists))

    @classmethod
    def fromBytes(cls, raw: bytes) -> StreamReply:
        return cls(_parse(_pb.img_streamer_reply_entry, raw).exists)


def iterFrames(data: bytes) -> Iterable[bytes]:
    """
    Split a complete byte string into frame payloads.

    @raise ProtocolError: if C{data} ends inside a frame.
    """
    buffer = FrameBuffer()
    rest = data
    while rest:
        payload = buffer.feed(rest)
        if payload is None:
            raise ProtocolError("truncated frame")
        yield payload
        rest = buffer.takeRest()


class FrameBuffer:
    """
    Collects one frame from data split at any byte.

    L{feed} returns the payload once it is complete; the bytes that came
    after it are then available from L{takeRest}.  The length prefix is
    checked before any payload is buffered, so a hostile length costs
    nothing.
    """

    def __init__(self, maxLength: int = MAX_HEADER_LENGTH) -> None:
        self.maxLength = maxLength
        self._buffer = b""
        self._rest = b""

    def feed(self, data: bytes) -> bytes | None:
        self._buffer += data
        if len(self._buffer) < U32.size:
            return None
        (length,) = U32.unpack_from(self._buffer)
        if length > self.maxLength:
            raise ProtocolError(
                f"frame of {length} bytes exceeds the {self.maxLength}-byte limit"
            )
        end = U32.size + length
        if len(self._buffer) < end:
            return None
        payload = self._buffer[U32.size : end]
        self._rest = self._buffer[end:]
        self._buffer = b""
        return payload

    @property
    def pending(self) -> int:
        """How many bytes of an incomplete frame are buffered."""
        return len(self._buffer)

    def takeRest(self) -> bytes:
        rest, self._rest = self._rest, b""
        return rest
