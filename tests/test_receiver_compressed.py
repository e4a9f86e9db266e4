"""
Compressed chunks on the link (link extension version 4), as the cache
receives them: L{twisted_criu.link.receiver} with
L{twisted_criu.link.decompress}.
"""

from __future__ import annotations

import os

import zstandard
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from twisted_criu import wire
from twisted_criu.errors import ProtocolError
from twisted_criu.link.decompress import ChunkDecoder
from twisted_criu.storage.spill import SpillStore

from .test_receiver import _ReceiverCase


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data)


def _image(name: str, *chunks: tuple[bytes, bool], codec: wire.Codec = wire.Codec.ZSTD) -> bytes:
    """A chunked image whose chunks are sent compressed (C{True}) or raw."""
    out = wire.RemoteHeader(
        name, "snap1", wire.O_WRONLY, 0, None, wire.LINK_EXTENSION_VERSION, True, compression=codec
    ).toBytes()
    for body, compressed in chunks:
        out += wire.chunkWord(len(body), compressed) + body
    return out + wire.CHUNK_LENGTH.pack(wire.CHUNK_END)


TEXT = b"".join(b"user:%06d,state=active,cart=[item-%d]\n" % (i, i % 7) for i in range(3000))
NOISE = os.urandom(5000)


class CompressedChunkTests(_ReceiverCase):

    def test_byteExact(self) -> None:
        """Compressed chunks are stored decompressed, byte for byte."""
        receiver, transport = self.connect()
        receiver.dataReceived(_image("pages.img", (_zstd(TEXT[:50000]), True), (_zstd(TEXT[50000:]), True)))
        self.assertEqual(self.stored("pages.img"), TEXT)
        self.assertFalse(transport.disconnected)

    def test_mixedEverySplitPoint(self) -> None:
        """Raw and compressed chunks of one image, cut at any byte, give the same image."""
        small = TEXT[:2000]
        data = _image("pages.img", (_zstd(small), True), (NOISE[:300], False), (_zstd(small), True))
        expected = small + NOISE[:300] + small
        for cut in range(0, len(data) + 1, 7):
            self.setUp()
            receiver, transport = self.connect()
            receiver.dataReceived(data[:cut])
            receiver.dataReceived(data[cut:])
            self.assertEqual(self.stored("pages.img"), expected, cut)
            self.assertFalse(transport.disconnected)

    def test_wireBytesCounted(self) -> None:
        """The cache counts the image's raw bytes and the (fewer) bytes on the wire."""
        receiver, _ = self.connect()
        frame = _zstd(TEXT)
        receiver.dataReceived(_image("pages.img", (frame, True), (b"raw", False)))
        activity = self.sink.activity
        self.assertEqual(list(activity.linkRawBytes.values()), [len(TEXT) + 3])
        self.assertEqual(list(activity.wireBytes.values()), [len(frame) + 3])
        infos = [e["log_format"].format(**e) for e in self.events if "received" in e["log_format"]]
        self.assertIn(f"({len(TEXT) + 3} bytes, {len(frame) + 3} on the wire, zstd)", infos[-1])

    def assertDropped(self, data: bytes, why: str) -> None:
        receiver, transport = self.connect()
        receiver.dataReceived(data)
        self.assertTrue(transport.disconnected)
        receiver.connectionLost(Failure(ConnectionLost()))
        self.assertIsNone(self.stored("pages.img"))
        errors = self.errors()
        self.assertTrue(any(why in e for e in errors), errors)
        self.assertTrue(any("bad frame from the proxy, dropping the link" in e for e in errors), errors)

    def test_bomb(self) -> None:
        """A frame that would inflate past MAX_CHUNK drops the link; nothing is stored."""
        bomb = _zstd(bytes(wire.MAX_CHUNK + 1))
        self.assertLess(len(bomb), 1 << 16)
        self.assertDropped(
            _image("pages.img", (_zstd(b"fine"), True), (bomb, True)),
            f"would decompress to {wire.MAX_CHUNK + 1}",
        )

    def test_bombWithoutItsSize(self) -> None:
        """A frame that does not say its size is refused before it is decompressed."""
        frame = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(1000))
        self.assertDropped(_image("pages.img", (frame, True)), "does not say its decompressed size")

    def test_corruptFrame(self) -> None:
        frame = bytearray(_zstd(TEXT))
        frame[len(frame) // 2] ^= 0xFF
        self.assertDropped(_image("pages.img", (bytes(frame), True)), "pages.img")

    def test_notAFrame(self) -> None:
        self.assertDropped(_image("pages.img", (b"garbage" * 10, True)), "not a zstd frame")

    def test_twoFrames(self) -> None:
        """A chunk is one whole frame: a second one after it is refused."""
        self.assertDropped(
            _image("pages.img", (_zstd(b"one") + _zstd(b"two"), True)), "not one whole frame"
        )

    def test_compressedChunkWithoutCodec(self) -> None:
        """A compressed chunk in an image whose header named no codec is a protocol error."""
        self.assertDropped(
            _image("pages.img", (_zstd(TEXT), True), codec=wire.Codec.NONE),
            "a compressed chunk in an image sent without compression",
        )

    def test_unknownCodecInHeader(self) -> None:
        """An image compressed with a codec this cache does not decode is refused at its header."""
        self.assertDropped(
            _image("pages.img", (b"x", False), codec=wire.Codec.LZ4),
            "compressed with lz4, which this cache does not decode",
        )

    def test_roomCountsRawBytes(self) -> None:
        """Room is checked for the bytes a chunk decompresses to, not its frame."""
        self.sink.store = SpillStore(100, self.mktemp())  # type: ignore[assignment]
        self.patch(self.sink.store, "room", lambda: 10000)
        frame = _zstd(TEXT[:20000])
        self.assertLess(len(frame), 10000)
        receiver, transport = self.connect()
        receiver.dataReceived(_image("pages.img", (frame, True)))
        self.assertTrue(transport.disconnected)
        self.assertIn("refusing snap1/pages.img: 20000 bytes so far, room for 10000", self.errors()[-1])


class DecoderTests(_ReceiverCase):

    def test_sizeMismatch(self) -> None:
        """A frame whose header lies about its size is refused."""
        frame = bytearray(_zstd(bytes(range(256)) * 8))
        params = zstandard.get_frame_parameters(bytes(frame))
        self.assertEqual(params.content_size, 2048)
        header = zstandard.frame_header_size(bytes(frame))
        # The content size is the header's last two bytes (2048 - 256, little-endian).
        self.assertEqual(frame[header - 2 : header], (2048 - 256).to_bytes(2, "little"))
        frame[header - 2 : header] = (1024 - 256).to_bytes(2, "little")
        self.assertRaises(ProtocolError, ChunkDecoder(wire.Codec.ZSTD).decode, bytes(frame))
