"""Exceptions shared by the wire, the registry and the daemons."""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

ImageKey = Tuple[str, str]
"""(snapshot_id, name): how images are addressed on both daemons."""


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
    """An image's transfer broke off before it was complete."""


class SourceBusy(Exception):
    """
    A file source's next bytes are still on their way from a disk: try
    again once C{whenReady} has fired (in the reactor thread).
    """

    def __init__(self, whenReady: Deferred[None]) -> None:
        super().__init__("waiting for the disk")
        self.whenReady = whenReady
