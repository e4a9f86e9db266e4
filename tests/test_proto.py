"""
The protobuf schema: the messages match the wire contract
(shared/protocol/remote-images.md §1 and stream.md), and L{twisted_criu.wire}
encodes the exact frames recorded from real criu (criu-traces README,
"Exact frames").  L{tests.slow.test_proto} checks that the committed
generated code is what admin/regen-proto makes of proto/criu_image.proto.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import wire
from twisted_criu._pb import criu_image_pb2

_F = descriptor_pb2.FieldDescriptorProto

#: message -> [(number, name, type)]; every field proto2 required.
CONTRACT = {
    "local_image_entry": [
        (1, "name", _F.TYPE_STRING),
        (2, "snapshot_id", _F.TYPE_STRING),
        (3, "open_mode", _F.TYPE_UINT32),
    ],
    "remote_image_entry": [
        (1, "name", _F.TYPE_STRING),
        (2, "snapshot_id", _F.TYPE_STRING),
        (3, "open_mode", _F.TYPE_UINT32),
        (4, "size", _F.TYPE_UINT64),
    ],
    "local_image_reply_entry": [(1, "error", _F.TYPE_UINT32)],
    "snapshot_id_entry": [(1, "snapshot_id", _F.TYPE_STRING)],
    "img_streamer_request_entry": [(1, "filename", _F.TYPE_STRING)],
    "img_streamer_reply_entry": [(1, "exists", _F.TYPE_BOOL)],
}


def h(text: str) -> bytes:
    """Hex as the protocol documents write it, with spaces between groups."""
    return bytes.fromhex(text.replace(" ", ""))


#: twisted-criu's own optional fields, invisible to CRIU's C peers.
EXTENSIONS = {
    "remote_image_entry": [
        (5, "sha256", _F.TYPE_BYTES),
        (6, "link_version", _F.TYPE_UINT32),
        (7, "chunked", _F.TYPE_BOOL),
        (8, "session", _F.TYPE_STRING),
        (9, "marker", _F.TYPE_UINT32),
        (10, "sequence", _F.TYPE_UINT64),
        (11, "compression", _F.TYPE_UINT32),
        (12, "offset", _F.TYPE_UINT64),
    ]
}

#: twisted-criu's own message, sent only between twisted-criu daemons: its
#: fields, and which of them are required.
OWN_MESSAGES = {
    "link_status_entry": [
        (1, "kind", _F.TYPE_UINT32, _F.LABEL_REQUIRED),
        (2, "version", _F.TYPE_UINT32, _F.LABEL_OPTIONAL),
        (3, "images", _F.TYPE_UINT64, _F.LABEL_OPTIONAL),
        (4, "bytes", _F.TYPE_UINT64, _F.LABEL_OPTIONAL),
        (5, "sequence", _F.TYPE_UINT64, _F.LABEL_OPTIONAL),
        (6, "name", _F.TYPE_STRING, _F.LABEL_OPTIONAL),
        (7, "snapshot_id", _F.TYPE_STRING, _F.LABEL_OPTIONAL),
    ]
}


class ContractTests(SynchronousTestCase):
    """Field numbers, types and labels, read from the descriptors."""

    def setUp(self) -> None:
        self.file = descriptor_pb2.FileDescriptorProto()
        criu_image_pb2.DESCRIPTOR.CopyToProto(self.file)

    def test_proto2(self) -> None:
        # proto2 files leave "syntax" empty in the descriptor.
        self.assertIn(self.file.syntax, ("", "proto2"))

    def test_messages(self) -> None:
        self.assertEqual(
            sorted(m.name for m in self.file.message_type), sorted([*CONTRACT, *OWN_MESSAGES])
        )

    def test_fields(self) -> None:
        for message in self.file.message_type:
            if message.name in OWN_MESSAGES:
                self.assertEqual(
                    [(f.number, f.name, f.type, f.label) for f in message.field],
                    OWN_MESSAGES[message.name],
                )
                continue
            fields = [(f.number, f.name, f.type) for f in message.field]
            extension = EXTENSIONS.get(message.name, [])
            self.assertEqual(fields, CONTRACT[message.name] + extension, message.name)
            for field in message.field:
                label = _F.LABEL_OPTIONAL if (field.number, field.name, field.type) in extension else _F.LABEL_REQUIRED
                self.assertEqual(field.label, label, f"{message.name}.{field.name}")


class ExactFrameTests(SynchronousTestCase):
    """
    The byte examples of remote-images.md §1 and of the criu-traces
    README's "Exact frames" table, encoded with L{twisted_criu.wire}.
    """

    # -- remote-images.md §1 ---------------------------------------------

    def test_replies(self) -> None:
        self.assertEqual(wire.Reply(0).toBytes(), h("02000000 0800"))
        self.assertEqual(wire.Reply(wire.ENOENT).toBytes(), h("02000000 0802"))
        self.assertEqual(wire.REPLY_OK, h("02000000 0800"))
        self.assertEqual(wire.REPLY_ENOENT, h("02000000 0802"))

    def test_localRequest(self) -> None:
        self.assertEqual(
            wire.LocalRequest("foo.img", "X", 1).toBytes(),
            h("0e000000 0a07666f6f2e696d67 120158 1801"),
        )

    def test_remoteHeader(self) -> None:
        self.assertEqual(
            wire.RemoteHeader("after.img", "X", 1, 19).toBytes(),
            h("12000000 0a0961667465722e696d67 120158 1801 2013"),
        )

    def test_dumpFinish(self) -> None:
        frame = wire.LocalRequest("", "", wire.O_WRONLY).toBytes()
        self.assertEqual(frame, h("06000000 0a00 1200 1801"))

    # -- criu-traces README, "Exact frames" --------------------------------

    def test_writeHeader(self) -> None:
        self.assertEqual(
            wire.LocalRequest("inventory.img", "snap1", wire.O_WRONLY).toBytes(),
            h("18000000 0a0d696e76656e746f72792e696d67 1205736e617031 1801"),
        )

    def test_readHeader(self) -> None:
        self.assertEqual(
            wire.LocalRequest("pages-1.img", "snap1", wire.O_RDONLY).toBytes(),
            h("16000000 0a0b70616765732d312e696d67 1205736e617031 1800"),
        )

    def test_parentAppendHeader(self) -> None:
        self.assertEqual(
            wire.LocalRequest(wire.PARENT_IMAGE, "", wire.O_APPEND).toBytes(),
            h("0d000000 0a06706172656e74 1200 188008"),
        )

    def test_parentAppendPayload(self) -> None:
        self.assertEqual(wire.encodeSnapshotId("snap1"), h("07000000 0a05736e617031"))

    def test_parentReadHeader(self) -> None:
        self.assertEqual(
            wire.LocalRequest(wire.PARENT_IMAGE, "", wire.O_RDONLY).toBytes(),
            h("0c000000 0a06706172656e74 1200 1800"),
        )

    def test_parentReadPayload(self) -> None:
        payload = h("070000000a05736e617031 070000000a05736e617032")
        self.assertEqual(
            wire.encodeSnapshotId("snap1") + wire.encodeSnapshotId("snap2"), payload
        )
        self.assertEqual(wire.decodeSnapshotIds(payload), ["snap1", "snap2"])

    def test_restoreFinish(self) -> None:
        self.assertEqual(
            wire.LocalRequest("", "", wire.O_RDONLY).toBytes(),
            h("06000000 0a00 1200 1800"),
        )

    def test_streamRequest(self) -> None:
        self.assertEqual(
            wire.StreamRequest("inventory.img").toBytes(),
            h("0f000000 0a0d696e76656e746f72792e696d67"),
        )

    def test_streamReplies(self) -> None:
        self.assertEqual(wire.StreamReply(True).toBytes(), h("02000000 0801"))
        # exists=false goes on the wire explicitly (proto2 required).
        self.assertEqual(wire.StreamReply(False).toBytes(), h("02000000 0800"))

    def test_parsesBack(self) -> None:
        """Each frame's payload parses back to the same value."""
        for value in (
            wire.LocalRequest("inventory.img", "snap1", wire.O_WRONLY),
            wire.LocalRequest(wire.PARENT_IMAGE, "", wire.O_APPEND),
            wire.LocalRequest("", "", wire.O_RDONLY),
            wire.RemoteHeader("after.img", "X", 1, 19),
            wire.Reply(wire.ENOENT),
            wire.StreamRequest("inventory.img"),
            wire.StreamReply(False),
        ):
            raw = value.toBytes()
            (length,) = wire.U32.unpack_from(raw)
            self.assertEqual(length, len(raw) - wire.U32.size)
            self.assertEqual(type(value).fromBytes(raw[wire.U32.size :]), value)
