"""Tests for L{twisted_criu.wire}: frames split anywhere, hostile frames."""

from __future__ import annotations

import attrs
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import wire
from twisted_criu.errors import ProtocolError


def _stream() -> tuple[bytes, list[bytes]]:
    frames = [
        wire.LocalRequest("pages-1.img", "snap1", 1).toBytes(),
        wire.encodeSnapshotId("snap1"),
        wire.RemoteHeader("inventory.img", "snap1", 1, 19).toBytes(),
    ]
    return b"".join(frames), [f[4:] for f in frames]


def _collect(pieces: list[bytes]) -> list[bytes]:
    buffer = wire.FrameBuffer()
    payloads = []
    for piece in pieces:
        while piece:
            payload = buffer.feed(piece)
            if payload is None:
                break
            payloads.append(payload)
            piece = buffer.takeRest()
    return payloads


class FrameBufferTests(SynchronousTestCase):
    def test_everySplitPoint(self) -> None:
        """Three frames cut in two at every byte parse to the same payloads."""
        data, expected = _stream()
        for cut in range(len(data) + 1):
            self.assertEqual(_collect([data[:cut], data[cut:]]), expected, cut)

    def test_byteByByte(self) -> None:
        data, expected = _stream()
        self.assertEqual(_collect([data[i : i + 1] for i in range(len(data))]), expected)

    def test_oversizedLengthRefusedBeforePayload(self) -> None:
        """A hostile length is refused from its 4 bytes alone."""
        buffer = wire.FrameBuffer(maxLength=100)
        with self.assertRaises(ProtocolError) as e:
            buffer.feed(wire.U32.pack(101))
        self.assertIn("exceeds the 100-byte limit", str(e.exception))

    def test_defaultLimit(self) -> None:
        self.assertEqual(wire.FrameBuffer().maxLength, 64 * 1024)
        with self.assertRaises(ProtocolError):
            wire.FrameBuffer().feed(b"\xff\xff\xff\xff")

    def test_pending(self) -> None:
        buffer = wire.FrameBuffer()
        self.assertIsNone(buffer.feed(b"\x05\x00\x00\x00ab"))
        self.assertEqual(buffer.pending, 6)

    def test_iterFramesTruncated(self) -> None:
        data = wire.encodeSnapshotId("a") + wire.encodeSnapshotId("b")[:-1]
        with self.assertRaises(ProtocolError):
            list(wire.iterFrames(data))


class MessageTests(SynchronousTestCase):
    def test_localRequestRoundTrip(self) -> None:
        request = wire.LocalRequest("foo.img", "X", 1)
        raw = request.toBytes()
        self.assertEqual(raw.hex(), "0e0000000a07666f6f2e696d671201581801")
        self.assertEqual(wire.LocalRequest.fromBytes(raw[4:]), request)

    def test_missingRequiredField(self) -> None:
        """protobuf does not enforce proto2 required fields on parse; we do."""
        raw = bytes.fromhex("0a07666f6f2e696d67")  # name only
        with self.assertRaises(ProtocolError) as e:
            wire.LocalRequest.fromBytes(raw)
        self.assertIn("lacks required fields", str(e.exception))
        self.assertIn("snapshot_id", str(e.exception))

    def test_garbage(self) -> None:
        with self.assertRaises(ProtocolError) as e:
            wire.RemoteHeader.fromBytes(b"\xff\xff\xff\xff\xff")
        self.assertIn("malformed", str(e.exception))

    def test_remoteHeaderRoundTrip(self) -> None:
        header = wire.RemoteHeader("after.img", "X", 1, 19)
        raw = header.toBytes()
        self.assertEqual(raw.hex(), "120000000a0961667465722e696d67120158180120" + "13")
        self.assertEqual(wire.RemoteHeader.fromBytes(raw[4:]), header)

    def test_hugeSize(self) -> None:
        header = wire.RemoteHeader("pages-1.img", "s", 1, 2**63)
        self.assertEqual(wire.RemoteHeader.fromBytes(header.toBytes()[4:]).size, 2**63)

    def test_finishVariants(self) -> None:
        self.assertTrue(wire.LocalRequest("", "", 1).isFinish)
        self.assertTrue(wire.LocalRequest("", "", 0).isFinish)
        seed = wire.LocalRequest("DUMP_FINISH", "null", 1)
        self.assertTrue(seed.isFinish)
        self.assertTrue(seed.isSeed)
        self.assertFalse(wire.LocalRequest("DUMP_FINISH", "snap", 1).isFinish)
        self.assertFalse(wire.LocalRequest("x", "", 1).isFinish)

    def test_finishFrame(self) -> None:
        raw = bytes.fromhex("060000000a0012001801")
        self.assertTrue(wire.LocalRequest.fromBytes(raw[4:]).isFinish)

    def test_openKinds(self) -> None:
        self.assertIs(wire.openKind(0), wire.OpenKind.READ)
        self.assertIs(wire.openKind(1), wire.OpenKind.WRITE)
        self.assertIs(wire.openKind(0o1101), wire.OpenKind.WRITE)  # O_WRONLY|O_CREAT|O_TRUNC
        self.assertIs(wire.openKind(1024), wire.OpenKind.APPEND)
        self.assertIs(wire.openKind(1025), wire.OpenKind.APPEND)
        with self.assertRaises(ProtocolError) as e:
            wire.openKind(0o100)  # O_CREAT alone: neither
        self.assertIn("unknown open mode", str(e.exception))

    def test_unknownModeRejectedOnParse(self) -> None:
        raw = wire.LocalRequest("a.img", "s", 0o100).toBytes()[4:]
        with self.assertRaises(ProtocolError):
            wire.LocalRequest.fromBytes(raw)

    def test_hostileNames(self) -> None:
        for name in ["../etc/passwd", "a/b", "..", ".", "a\0b", "x" * 256, "x" * 4096, ""]:
            raw = wire.LocalRequest(name, "snap", 1).toBytes()[4:]
            if name == "":
                raw = wire.RemoteHeader(name, "snap", 1, 0).toBytes()[4:]
                with self.assertRaises(ProtocolError):
                    wire.RemoteHeader.fromBytes(raw)
                continue
            with self.assertRaises(ProtocolError, msg=repr(name[:10])):
                wire.LocalRequest.fromBytes(raw)
            raw = wire.RemoteHeader(name, "snap", 1, 0).toBytes()[4:]
            with self.assertRaises(ProtocolError):
                wire.RemoteHeader.fromBytes(raw)

    def test_controlCharactersRefused(self) -> None:
        """ESC, newlines, DEL and C1 controls never reach a log, a listing or a file name."""
        for bad in [
            "a\x1b[2Jb.img", "pages\n1.img", "x\r.img", "del\x7f.img", "c1\x9b31m.img", "\t.img",
            "pages-1\u202egmi.exe", "rtl\u200f.img", "iso\u2067late.img", "al\u061cm.img",
        ]:
            for parse in (
                lambda: wire.LocalRequest.fromBytes(wire.LocalRequest(bad, "snap", 1).toBytes()[4:]),
                lambda: wire.RemoteHeader.fromBytes(wire.RemoteHeader(bad, "snap", 1, 0).toBytes()[4:]),
                lambda: wire.StreamRequest.fromBytes(wire.StreamRequest(bad).toBytes()[4:]),
                lambda: wire.LocalRequest.fromBytes(wire.LocalRequest("a.img", bad, 1).toBytes()[4:]),
            ):
                with self.assertRaises(ProtocolError, msg=repr(bad)) as e:
                    parse()
                self.assertIn("control character", str(e.exception))
                self.assertNotRegex(str(e.exception), "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
        # Printable non-ASCII stays allowed (CRIU takes any byte but NUL and '/').
        request = wire.LocalRequest("pagés-1.img", "/var/lib/criu/dümp", 1)
        self.assertEqual(wire.LocalRequest.fromBytes(request.toBytes()[4:]), request)

    def test_longestNames(self) -> None:
        """A file name (255 bytes) and a path (4095 bytes) are the limits."""
        request = wire.LocalRequest("x" * 255, "/" + "d" * 4094, 1)
        self.assertEqual(wire.LocalRequest.fromBytes(request.toBytes()[4:]), request)
        with self.assertRaises(ProtocolError) as e:
            wire.LocalRequest.fromBytes(wire.LocalRequest("a.img", "d" * 4096, 1).toBytes()[4:])
        self.assertIn("snapshot id longer than 4095 bytes", str(e.exception))

    def test_endOfDumpMarker(self) -> None:
        """The link extension's marker: no name, id or bytes, a link version."""
        raw = wire.END_OF_DUMP.toBytes()
        self.assertEqual(raw.hex(), "0a0000000a001200180020003004")
        marker = wire.RemoteHeader.fromBytes(raw[4:])
        self.assertEqual(marker, wire.END_OF_DUMP)
        self.assertTrue(marker.isEndOfDump)
        for header in [
            wire.RemoteHeader("", "", 0, 0),  # what a C proxy could send: no version
            wire.RemoteHeader("", "", 0, 1, None, 1),  # a marker with a body
            wire.RemoteHeader("", "s", 0, 0, None, 1),
        ]:
            with self.assertRaises(ProtocolError):
                wire.RemoteHeader.fromBytes(header.toBytes()[4:])

    def test_linkVersionIsAnExtraField(self) -> None:
        """A C cache sees the same header plus field 6, which it skips."""
        plain = wire.RemoteHeader("after.img", "X", 1, 19).toBytes()
        extended = wire.RemoteHeader("after.img", "X", 1, 19, None, 1).toBytes()
        self.assertEqual(extended[4:], plain[4:] + bytes.fromhex("3001"))
        self.assertEqual(wire.RemoteHeader.fromBytes(extended[4:]).linkVersion, 1)
        self.assertIsNone(wire.RemoteHeader.fromBytes(plain[4:]).linkVersion)

    def test_chunkedHeader(self) -> None:
        """A cut-through image: field 7, size 0, version 2, a plain write."""
        header = wire.RemoteHeader("pages-1.img", "X", 1, 0, None, 2, True)
        raw = header.toBytes()
        self.assertEqual(raw[4:], wire.RemoteHeader("pages-1.img", "X", 1, 0, None, 2).toBytes()[4:] + b"\x38\x01")
        self.assertEqual(wire.RemoteHeader.fromBytes(raw[4:]), header)
        for bad in [
            wire.RemoteHeader("a.img", "X", 1, 0, None, 1, True),  # version 1 has no chunks
            wire.RemoteHeader("a.img", "X", 1, 0, None, None, True),
            wire.RemoteHeader("a.img", "X", 1, 5, None, 2, True),  # a size as well
            wire.RemoteHeader("a.img", "X", 1, 0, b"d" * 32, 2, True),  # a digest of what?
            wire.RemoteHeader("a.img", "X", 1 | 0o2000, 0, None, 2, True),  # an append
        ]:
            with self.assertRaises(ProtocolError):
                wire.RemoteHeader.fromBytes(bad.toBytes()[4:])

    def test_compressedAndResumedHeader(self) -> None:
        """Version 4: a chunked image's codec and resume offset, refused elsewhere."""
        header = wire.RemoteHeader(
            "pages-1.img", "X", 1, 0, None, 4, True, "t", compression=wire.Codec.LZ4, offset=1 << 40
        )
        self.assertEqual(wire.RemoteHeader.fromBytes(header.toBytes()[4:]), header)
        plain = wire.RemoteHeader("pages-1.img", "X", 1, 0, None, 4, True, "t")
        self.assertEqual(wire.RemoteHeader.fromBytes(plain.toBytes()[4:]).compression, wire.Codec.NONE)
        for bad in [
            wire.RemoteHeader("a.img", "X", 1, 0, None, 3, True, compression=wire.Codec.ZSTD),  # version 3
            wire.RemoteHeader("a.img", "X", 1, 9, None, 4, False, offset=3),  # not chunked
            wire.RemoteHeader("a.img", "X", 1, 9, None, 4, False, compression=wire.Codec.ZSTD),
        ]:
            with self.assertRaises(ProtocolError):
                wire.RemoteHeader.fromBytes(bad.toBytes()[4:])
        raw = bytearray(header.toBytes()[4:])
        raw[raw.index(b"\x58\x02") + 1] = 9  # field 11, an unknown codec
        with self.assertRaises(ProtocolError) as e:
            wire.RemoteHeader.fromBytes(bytes(raw))
        self.assertIn("unknown compression 9", str(e.exception))

    def test_chunkWords(self) -> None:
        """Bit 31 marks a compressed chunk; the end and abort words stay apart."""
        self.assertEqual(wire.chunkWord(5), b"\x05\x00\x00\x00")
        self.assertEqual(wire.chunkWord(5, compressed=True), b"\x05\x00\x00\x80")
        for length in [1, wire.MAX_CHUNK]:
            for compressed in [False, True]:
                (word,) = wire.CHUNK_LENGTH.unpack(wire.chunkWord(length, compressed))
                self.assertNotIn(word, (wire.CHUNK_END, wire.CHUNK_ABORT))
                self.assertEqual(wire.parseChunkWord(word), (length, compressed))
        for word in [wire.MAX_CHUNK + 1, wire.CHUNK_COMPRESSED | (wire.MAX_CHUNK + 1), wire.CHUNK_COMPRESSED]:
            with self.assertRaises(ProtocolError):
                wire.parseChunkWord(word)

    def test_resumeAt(self) -> None:
        status = wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, size=7 << 30, name="pages-3.img", snapshotId="s")
        self.assertEqual(wire.LinkStatus.fromBytes(status.toBytes()[4:]), status)
        hostile = wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, size=1, name="../x", snapshotId="s")
        with self.assertRaises(ProtocolError):
            wire.LinkStatus.fromBytes(hostile.toBytes()[4:])

    def test_resumeAtHeldWhole(self) -> None:
        """C{images=1}: the cache holds the image whole (field 3); 0 is left out, more is refused."""
        whole = wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, images=1, size=5, name="a.img", snapshotId="s")
        raw = whole.toBytes()[4:]
        self.assertEqual(raw, bytes.fromhex("0806") + bytes.fromhex("1801") + bytes.fromhex("2005") + b"\x32\x05a.img:\x01s")
        self.assertEqual(wire.LinkStatus.fromBytes(raw), whole)
        part = wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, size=5, name="a.img", snapshotId="s")
        self.assertEqual(part.toBytes()[4:], raw.replace(bytes.fromhex("1801"), b""))
        with self.assertRaises(ProtocolError) as e:
            wire.LinkStatus.fromBytes(raw.replace(bytes.fromhex("1801"), bytes.fromhex("1802")))
        self.assertIn("images=2", str(e.exception))

    def test_resumeMarker(self) -> None:
        """Marker 3, RESUME, with a sequence: only on link version 4."""
        header = wire.RemoteHeader("", "", 0, 0, None, 4, session="t", marker=wire.Marker.RESUME, sequence=7)
        raw = header.toBytes()[4:]
        self.assertIn(bytes.fromhex("4803") + bytes.fromhex("5007"), raw)  # fields 9 and 10
        parsed = wire.RemoteHeader.fromBytes(raw)
        self.assertEqual((parsed, parsed.isMarker, parsed.isEndOfDump), (header, True, False))
        with self.assertRaises(ProtocolError) as e:
            wire.RemoteHeader.fromBytes(attrs.evolve(header, linkVersion=3).toBytes()[4:])
        self.assertIn("RESUME marker on link version 3", str(e.exception))

    def test_linkStatus(self) -> None:
        hello = wire.LinkStatus(wire.LinkStatusKind.HELLO, version=1)
        self.assertEqual(hello.toBytes().hex(), "0400000008011001")
        received = wire.LinkStatus(wire.LinkStatusKind.DUMP_RECEIVED, images=3, size=99)
        done = wire.LinkStatus(wire.LinkStatusKind.SESSION_DONE)
        for status in [hello, received, done]:
            self.assertEqual(wire.LinkStatus.fromBytes(status.toBytes()[4:]), status)
        with self.assertRaises(ProtocolError) as e:
            wire.LinkStatus.fromBytes(bytes.fromhex("0863"))
        self.assertIn("unknown link status 99", str(e.exception))
        with self.assertRaises(ProtocolError):  # a TLS alert is not a status
            wire.LinkStatus.fromBytes(bytes.fromhex("15030300020246")[4:])

    def test_snapshotIdMayBeAPath(self) -> None:
        """criu's snapshot id is its -D argument as typed."""
        request = wire.LocalRequest("a.img", "/var/lib/criu/out", 1)
        self.assertEqual(wire.LocalRequest.fromBytes(request.toBytes()[4:]), request)
        with self.assertRaises(ProtocolError):
            wire.LocalRequest.fromBytes(wire.LocalRequest("a.img", "a\0", 1).toBytes()[4:])

    def test_snapshotIds(self) -> None:
        data = wire.encodeSnapshotId("snap1") + wire.encodeSnapshotId("snap2")
        self.assertEqual(data.hex(), "070000000a05736e617031070000000a05736e617032")
        self.assertEqual(wire.decodeSnapshotIds(data), ["snap1", "snap2"])
        self.assertEqual(wire.decodeSnapshotIds(b""), [])

    def test_replies(self) -> None:
        self.assertEqual(wire.REPLY_OK.hex(), "020000000800")
        self.assertEqual(wire.REPLY_ENOENT.hex(), "020000000802")
        self.assertEqual(wire.Reply.fromBytes(wire.REPLY_ENOENT[4:]).error, 2)


class Utf8Tests(SynchronousTestCase):
    def test_invalidUtf8Refused(self) -> None:
        """proto2 strings are not checked by the parser: we do."""
        raw = wire.LocalRequest("ab.img", "s", 1).toBytes()[4:].replace(b"ab", b"\xff\xfe")
        with self.assertRaises(ProtocolError) as e:
            wire.LocalRequest.fromBytes(raw)
        self.assertIn("local_image_entry.name is not valid UTF-8", str(e.exception))
        raw = wire.StreamRequest("ab.img").toBytes()[4:].replace(b"ab", b"\xc3")
        with self.assertRaises(ProtocolError):
            wire.StreamRequest.fromBytes(raw)
