# -*- test-case-name: tests.test_receiver_compressed -*-
"""
The cache's side of compression on the link (link extension version 4):
a compressed chunk is one whole frame of its image's codec, and
decompresses to at most L{wire.MAX_CHUNK} bytes, or the link is dropped.
"""

from __future__ import annotations

import zstandard

from twisted_criu import wire
from twisted_criu.errors import ProtocolError


class ChunkDecoder:
    """Decompresses the compressed chunks of one image."""

    def __init__(self, codec: wire.Codec) -> None:
        if codec is not wire.Codec.ZSTD:
            raise ProtocolError(f"an image compressed with {codec.name.lower()}, which this cache does not decode")
        self.codec = codec
        self._zstd = zstandard.ZstdDecompressor()

    def decode(self, frame: bytes | bytearray) -> bytes:
        """
        The raw bytes of one compressed chunk; L{ProtocolError} if it is
        not exactly one frame, or would decompress past L{wire.MAX_CHUNK}.
        """
        try:
            size = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as e:
            raise ProtocolError(f"a compressed chunk that is not a zstd frame ({e})") from None
        if size < 0:
            raise ProtocolError("a compressed chunk that does not say its decompressed size")
        if size > wire.MAX_CHUNK or size == 0:
            raise ProtocolError(
                f"a compressed chunk of {len(frame)} bytes that would decompress to {size}"
                f" (between 1 and {wire.MAX_CHUNK})"
            )
        # One call into a buffer of exactly the frame's size: a stream
        # decoder grows its output in steps and joins them (20 % slower).
        # zstd checks the frame's checksum, and refuses a cut frame.
        try:
            raw: bytes = self._zstd.decompress(frame, allow_extra_data=False)
        except zstandard.ZstdError as e:
            if "unused data" in str(e):
                raise ProtocolError(f"a compressed chunk that is not one whole frame of {size} bytes ({e})") from None
            raise ProtocolError(f"a corrupt compressed chunk ({e})") from None
        if len(raw) != size:
            raise ProtocolError(
                f"a compressed chunk that is not one whole frame of {size} bytes ({len(raw)} decompressed)"
            )
        return raw
