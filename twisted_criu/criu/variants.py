# -*- test-case-name: tests.test_images -*-
"""Which data variant a reader of the local leg expects: the bytes inline on the socket, or in a pipe."""

from __future__ import annotations

from enum import Enum

from twisted_criu import wire


class ReadVariant(Enum):
    """
    How image bytes reach criu on a read.

    C{AUTO}: inline for C{parent} (empty snapshot id) and for every image of
    a session that used the 2015 seed's markers; through a pipe otherwise.
    """

    AUTO = "auto"
    PIPE = "pipe"
    INLINE = "inline"


def readsInline(variant: ReadVariant, request: wire.LocalRequest, seedSession: bool) -> bool:
    if variant is ReadVariant.INLINE:
        return True
    if request.snapshotId == "":
        return True
    if variant is ReadVariant.PIPE:
        return False
    return request.isSeed or seedSession
