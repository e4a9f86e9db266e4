# -*- test-case-name: tests.test_failures,tests.test_registry -*-
"""Exceptions shared by the wire, the flow of bytes, the registry and the daemons."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.error import ConnectionLost

if TYPE_CHECKING:
    from twisted_criu.keys import ImageKey


class ProtocolError(Exception):
    """A peer sent something the protocol does not allow."""


class ImageNotFound(Exception):
    """No such image, and none will come: criu gets ENOENT."""

    def __init__(self, key: ImageKey) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        snapshotId, name = self.key
        return f"no image {snapshotId}/{name}"


class ImageAborted(Exception):
    """An image's write or transfer broke off before it was complete: discard it."""


class StoreFailed(ConnectionLost):
    """
    The store could not take an image's bytes (disk full, I/O error, no
    descriptor left): what ends the pipe criu was writing them into.

    @ivar error: the store's L{OSError}.
    """

    def __init__(self, error: OSError) -> None:
        super().__init__(f"cannot store the data: {error}")
        self.error = error


class DumpAborted(Exception):
    """
    The session criu is dumping into was aborted: its remaining writes are
    refused (criu's dump fails) until criu finishes or starts a new dump.
    """


class ImageSizeMismatch(Exception):
    """An image's reader produced more or fewer bytes than its size."""


class SessionBusy(Exception):
    """The session is in use (a dump or restore is under way)."""


class HookRefused(Exception):
    """C{twisted-criu-hook} asked a daemon for something it cannot do now; the message says why."""
