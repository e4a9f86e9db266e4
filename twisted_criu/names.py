# -*- test-case-name: tests.test_wire -*-
"""
Which image names and snapshot ids the daemons accept, whatever protocol
brought them (criu's requests, the link's headers, the stream protocol).
"""

from __future__ import annotations

import re

from twisted_criu.errors import ProtocolError

#: Longest image name we accept: a file name (NAME_MAX).
MAX_NAME_LENGTH = 255

#: Longest snapshot id we accept: criu's -D argument, a path (PATH_MAX - 1).
MAX_SNAPSHOT_ID_LENGTH = 4095

#: C0 and C1 control characters (and DEL), and Unicode's bidirectional
#: controls: never in a CRIU file name or path, and a terminal or a log
#: reader would act on them (a right-to-left override shows
#: "pages-1\u202egmi.exe" as "pages-1exe.img").
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def checkName(name: str) -> str:
    """
    Refuse image names that could never be a CRIU image file name.

    Names are only ever used as keys, never as paths, but an image set must
    be extractable into one directory, so names are flat; and they are
    shown in logs and listings, so they hold no control characters.
    """
    if not name:
        raise ProtocolError("empty image name")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_LENGTH:
        raise ProtocolError(f"image name longer than {MAX_NAME_LENGTH} bytes")
    if "\0" in name or "/" in name or name in (".", ".."):
        raise ProtocolError(f"hostile image name {name[:64]!r}")
    if _CONTROL.search(name):
        raise ProtocolError(f"image name with a control character {name[:64]!r}")
    return name


def checkSnapshotId(snapshotId: str) -> str:
    """Refuse snapshot ids with NUL bytes or other control characters, or of absurd length."""
    if len(snapshotId.encode("utf-8", "surrogatepass")) > MAX_SNAPSHOT_ID_LENGTH:
        raise ProtocolError(f"snapshot id longer than {MAX_SNAPSHOT_ID_LENGTH} bytes")
    if "\0" in snapshotId:
        raise ProtocolError("snapshot id contains a NUL byte")
    if _CONTROL.search(snapshotId):
        raise ProtocolError(f"snapshot id with a control character {snapshotId[:64]!r}")
    return snapshotId
